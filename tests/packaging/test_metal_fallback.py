"""The Metal build is attempted, not required: CMake's decision, simulated on Linux.

Each case configures the project in probe mode (BLOCKPOOL_METAL_PROBE=ON
stops after the Metal decision, so no nanobind or full build is needed) with
BLOCKPOOL_METAL_TEST_BROKEN making one step fail for real: the C++ compiler
stands in for the Metal compiler on tests/packaging/broken_kernel.metal, or
try_compile fails on tests/packaging/broken_host.cpp. The full check, that such
a package installs, imports and reports the reference backend on the GPU,
is tools/check_metal_fallback.sh (a pip install, about a minute).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(
    shutil.which("cmake") is None or shutil.which("c++") is None,
    reason="needs cmake and a C++ compiler on PATH (as building blockpool does)",
)


def configure(tmp_path: Path, *options: str) -> subprocess.CompletedProcess:
    args = ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), f"-DPython_EXECUTABLE={sys.executable}",
            "-DBLOCKPOOL_METAL_PROBE=ON", *options]  # fmt: skip
    return subprocess.run(args, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("broken, failure", [
    ("kernel", "the Metal kernels did not compile"),
    ("host", "the Metal host code did not compile"),
])  # fmt: skip
def test_auto_builds_without_metal_when_a_step_fails(tmp_path, broken, failure):
    result = configure(tmp_path, f"-DBLOCKPOOL_METAL_TEST_BROKEN={broken}")
    assert result.returncode == 0, result.stderr
    # "(1)" or similar: the Metal compiler's exit status or error
    assert re.search(
        f"blockpool: {failure}( \\(.*?\\))?; building WITHOUT the Metal kernels", " ".join(result.stderr.split())
    )
    assert "error" in result.stderr  # the compiler's own first errors are shown
    assert f"blockpool: Metal kernels: failed: {failure}" in result.stdout


def test_on_makes_a_failing_step_fatal(tmp_path):
    result = configure(tmp_path, "-DBLOCKPOOL_METAL=ON", "-DBLOCKPOOL_METAL_TEST_BROKEN=kernel")
    assert result.returncode != 0
    assert re.search(
        r"the Metal kernels did not compile \(.*?\) and BLOCKPOOL_METAL=ON", " ".join(result.stderr.split())
    )


def test_off_and_unavailable_skip_the_attempt(tmp_path):
    off = configure(tmp_path / "off", "-DBLOCKPOOL_METAL=OFF", "-DBLOCKPOOL_METAL_TEST_BROKEN=kernel")
    assert off.returncode == 0 and "Metal kernels: off (BLOCKPOOL_METAL=OFF)" in off.stdout
    auto = configure(tmp_path / "auto")
    assert auto.returncode == 0
    if "MLX_BUILD_METAL" not in auto.stdout and sys.platform != "darwin":
        assert "Metal kernels: unavailable (mlx has no Metal here)" in auto.stdout


def test_bad_option_values_are_refused(tmp_path):
    result = configure(tmp_path, "-DBLOCKPOOL_METAL=maybe")
    assert result.returncode != 0
    assert "BLOCKPOOL_METAL must be AUTO, ON or OFF, got 'MAYBE'" in result.stderr
