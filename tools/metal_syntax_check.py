"""Syntax-check the Metal path on Linux (issue 13, item 3).

Two checks, with clang (``-fsyntax-only``, nothing is built or run):

1. The host code, ``csrc/metal/*.cpp`` with ``BLOCKPOOL_METAL`` defined,
   against MLX's real Metal headers (shipped in the mlx wheel) and Apple's
   real metal-cpp headers (from the ``pymetal-cpp`` source distribution on
   PyPI). Apple's system headers that metal-cpp includes (objc, CoreFoundation,
   ...) are replaced by minimal stand-ins in ``tools/metal_syntax/apple``.
   This catches what a Mac's C++ compiler would reject in our code.
2. The kernels, ``csrc/metal/*.metal``, compiled as C++ with their
   ``[[attributes]]`` removed and a stand-in ``<metal_stdlib>``
   (``tools/metal_syntax/msl``). This catches wrong names, types and calls
   (into ``csrc/block_index.h``'s MSL branch too), not MSL's own rules.

Neither proves the Metal path builds or runs: only a Mac can (see
``.github/workflows/macos.yml``). Usage::

    python tools/metal_syntax_check.py [--metal-cpp DIR]

Exit status 0 when both checks pass, 1 when one fails, 2 when a tool or the
headers are missing.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STUBS = ROOT / "tools" / "metal_syntax"
PYMETAL = "pymetal-cpp==0.1.5"  # its sdist carries Apple's metal-cpp
CACHE = Path.home() / ".cache" / "blockpool" / "metal-cpp-0.1.5"


class Missing(Exception):
    """A tool or header set the check needs is not available."""


def clang() -> str:
    for name in ("clang++", "clang++-19", "clang++-18", "clang++-17", "clang++-16", "clang++-15", "clang++-14"):
        if path := shutil.which(name):
            return path
    raise Missing("clang++ not found (Debian: apt-get install clang)")


def mlx_include() -> Path:
    import mlx.core as mx  # the wheel's headers sit next to its extension

    include = Path(mx.__file__).parent / "include"
    if not (include / "mlx" / "backend" / "metal" / "device.h").exists():
        raise Missing(f"MLX's Metal headers are not in {include}")
    return include


def metal_cpp(explicit: Path | None) -> Path:
    """Apple's metal-cpp headers: given, cached, or taken from pymetal-cpp's sdist."""
    for candidate in (explicit, CACHE):
        if candidate and (candidate / "Metal" / "Metal.hpp").exists():
            return candidate
    with tempfile.TemporaryDirectory() as tmp:
        result = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", PYMETAL, "-d", tmp],
            capture_output=True, text=True,
        )  # fmt: skip
        sdists = list(Path(tmp).glob("*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise Missing(f"could not download the {PYMETAL} sdist: {result.stderr.strip()[-300:]}")
        with tarfile.open(sdists[0]) as tar:
            members = [m for m in tar.getmembers() if "/thirdparty/metal-cpp/" in m.name and m.isfile()]
            for m in members:
                m.name = m.name.split("/thirdparty/metal-cpp/", 1)[1]
                tar.extract(m, CACHE, filter="data")
    if not (CACHE / "Metal" / "Metal.hpp").exists():
        raise Missing(f"{PYMETAL}'s sdist has no thirdparty/metal-cpp/Metal/Metal.hpp")
    return CACHE


def run(cmd: list[str], what: str) -> bool:
    result = subprocess.run(cmd, capture_output=True, text=True)
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    status = "ok" if result.returncode == 0 else "FAILED"
    print(f"[{status}] {what}")
    for line in errors[:20]:
        print(f"    {line}")
    return result.returncode == 0


def check_host(compiler: str, mlx: Path, metal: Path) -> bool:
    ok = True
    for source in sorted((ROOT / "csrc" / "metal").glob("*.cpp")):
        cmd = [compiler, "-std=c++20", "-fblocks", "-fsyntax-only", "-Wall", "-Wextra", "-Werror",
               "-DBLOCKPOOL_METAL", f"-I{ROOT / 'csrc'}", "-isystem", str(mlx), "-isystem", str(metal),
               "-isystem", str(STUBS / "apple"), str(source)]  # fmt: skip
        ok &= run(cmd, f"host code {source.relative_to(ROOT)} against MLX's Metal headers and metal-cpp")
    return ok


def without_attributes(text: str) -> str:
    """MSL attributes removed; the project's own Metal headers (``#include "metal/..."``) inlined, likewise."""

    def inline(match: re.Match) -> str:
        header = (ROOT / "csrc" / match.group(1)).read_text().replace("#pragma once", "")
        return without_attributes(header)

    text = re.sub(r'^#include "(metal/[^"]+)"$', inline, text, flags=re.M)
    return re.sub(r"\[\[[^\[\]]*\]\]", "", text)


def check_kernels(compiler: str) -> bool:
    ok = True
    for kernels in sorted((ROOT / "csrc" / "metal").glob("*.metal")):
        text = without_attributes(kernels.read_text())
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp) / f"{kernels.stem}_kernels.cpp"
            source.write_text(f'#line 1 "{kernels}"\n{text}')
            cmd = [compiler, "-std=c++17", "-fsyntax-only", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter",
                   f"-I{STUBS / 'msl'}", f"-I{ROOT / 'csrc'}", str(source)]  # fmt: skip
            what = f"kernels {kernels.relative_to(ROOT)} as C++ (attributes removed, <metal_stdlib> stand-in)"
            ok &= run(cmd, what)
    return ok


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--metal-cpp", type=Path, help="a metal-cpp checkout (default: download pymetal-cpp's sdist)")
    args = parser.parse_args(argv)
    try:
        compiler = clang()
        host = check_host(compiler, mlx_include(), metal_cpp(args.metal_cpp))
    except Missing as e:
        print(f"metal_syntax_check: cannot run: {e}", file=sys.stderr)
        return 2
    kernels = check_kernels(compiler)
    return 0 if host and kernels else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
