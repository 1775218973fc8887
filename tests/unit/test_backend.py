"""Which implementation the block ops use: backend(), BLOCKPOOL_OPS, the GPU self-check, blockpool doctor."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
import warnings

import mlx.core as mx
import pytest

from blockpool import _ext, cli, ops, reference
from blockpool.errors import InvalidRequestError
from blockpool.ops import backends
from blockpool.ops.self_check import cases, flatten, self_check

NATIVE_NODES = [
    "GatherBlocks",
    "ScatterBlocks",
    "GatherDequantizeBlocks",
    "PagedAttention",
    "WriteTokens",
    "ConcatBlocks",
    "ConcatDequantizeBlocks",
    "SplitBlocks",
]


def graph_text(outputs) -> str:
    dot = io.StringIO()
    mx.export_to_dot(dot, *flatten(outputs))
    return dot.getvalue()


@pytest.fixture
def fresh_checks(monkeypatch):
    """Forget the self-checks of this process, and restore them afterwards."""
    monkeypatch.setattr(backends, "_self_checked", {})


def test_cpu_is_native_by_default(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert ops.backend() == "native"
    assert all(ops.backend(mx.cpu, op) == "native" for op in ops.OPS)


@pytest.mark.parametrize("op", ops.OPS)
def test_reference_mode_runs_every_op_in_pure_mlx(op, monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    args, kwargs, expected = cases(op)
    native = getattr(ops, op)(*args, stream=mx.cpu, **kwargs)
    assert any(f'"{name}"' in graph_text(native) for name in NATIVE_NODES)
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert ops.backend() == "reference" and ops.backend(mx.cpu, op) == "reference"
    got = getattr(ops, op)(*args, stream=mx.cpu, **kwargs)
    text = graph_text(got)
    assert not any(f'"{name}"' in text for name in NATIVE_NODES)
    for g, n in zip(flatten(got), flatten(native)):
        assert g.dtype == n.dtype and mx.array_equal(g, n).item()


BAD = {
    "gather_blocks": lambda p: ops.gather_blocks([p], [[9]]),
    "scatter_blocks": lambda p: ops.scatter_blocks([p], [[1, 1]], [p[:1, :, :2]]),
    "concat_blocks": lambda p: ops.concat_blocks([[]]),
    "split_blocks": lambda p: ops.split_blocks([p[:1]], [5], [None], block_tokens=4),
    "gather_dequantize_blocks": lambda p: ops.gather_dequantize_blocks([p], [p], [p], [[0]]),
    "concat_dequantize_blocks": lambda p: ops.concat_dequantize_blocks([[p[0]]], [[p[0]]], [[p[0]]], bits=5),
    "paged_attention": lambda p: ops.paged_attention(p[:1].reshape(1, 2, 4, 3), [p[0]], [p[0]], [[0]], [9], scale=1.0),
    "write_tokens": lambda p: ops.write_tokens([p], [(0, None, 0, 0, 2, 3)], block_tokens=4),
}


@pytest.mark.parametrize("op", sorted(BAD))
def test_reference_mode_refuses_bad_input_with_the_same_error(op, monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    pool = mx.zeros((5, 2, 4, 3))
    with pytest.raises(InvalidRequestError) as native:
        BAD[op](pool)
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    with pytest.raises(InvalidRequestError) as ref:
        BAD[op](pool)
    assert str(ref.value) == str(native.value) and str(ref.value).startswith(op)


def test_an_unknown_mode_is_refused(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "fast")
    with pytest.raises(
        InvalidRequestError, match="BLOCKPOOL_OPS must be 'reference', 'native', 'auto' or unset, got 'fast'"
    ):
        ops.gather_blocks([mx.zeros((2, 1, 1, 1))], [[0]])
    with pytest.raises(InvalidRequestError, match="BLOCKPOOL_OPS"):
        ops.backend()


def test_backend_names_must_be_ops():
    with pytest.raises(InvalidRequestError, match="op must be one of gather_blocks"):
        ops.backend(op="gather")


def test_a_gpu_without_native_kernels_uses_the_reference(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    if _ext.metal_kernels_built and mx.metal.is_available():
        pytest.skip("this build has Metal kernels: the self-check decides (see the next test)")
    # This build has no GPU kernels (Linux: mlx has no Metal; CUDA: none written).
    assert ops.native_gpu_kernels is False
    assert ops.backend(mx.gpu) == "reference"
    assert all(ops.backend(mx.gpu, op) == "reference" for op in ops.OPS)


def test_a_failing_gpu_kernel_falls_back_with_one_warning(monkeypatch, fresh_checks):
    """The first GPU use of an op runs its self-check; a failure warns once, then the reference is used.

    Here the failure is real: this machine has no usable GPU stream (on Linux
    mlx has none), so running the native op on the GPU raises. The flag that
    says this build has GPU kernels is set so that the check runs at all.
    """
    if mx.metal.is_available() or mx.cuda.is_available():
        pytest.skip("a GPU is present: its self-check is exercised by test_gpu_self_check_passes")
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    monkeypatch.setattr(backends, "native_gpu_kernels", True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ops.backend(mx.gpu, "split_blocks") == "reference"
        assert ops.backend(mx.gpu, "split_blocks") == "reference"  # checked once
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1
    assert "native split_blocks failed its self-check on Device(gpu, 0)" in messages[0]
    assert "using the pure-MLX reference" in messages[0]


@pytest.mark.parametrize("op", ops.OPS)
def test_the_self_check_passes_on_working_kernels(op):
    # The same check the first GPU use runs, here on the CPU kernels.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert self_check(op, mx.Device(mx.cpu)) == "native"


@pytest.mark.skipif(not mx.metal.is_available(), reason="needs an Apple GPU (runs in .github/workflows/macos.yml)")
def test_gpu_self_check_passes(fresh_checks):
    # On a Mac CI runner (BLOCKPOOL_REQUIRE_METAL=1) the Metal kernels must
    # build and pass their self-check; elsewhere a fallback is allowed.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        result = {op: ops.backend(mx.gpu, op) for op in ops.OPS}
    if os.environ.get("BLOCKPOOL_REQUIRE_METAL") == "1":
        assert _ext.metal_kernels_built, _ext.metal_build_status
        assert result == {op: "native" for op in ops.OPS}
    else:
        assert set(result.values()) <= {"native", "reference"}


def test_native_mode_forces_the_compiled_primitives(monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "native")
    assert ops.backend(mx.cpu) == "native"
    assert ops.backend(mx.gpu) == "native"  # no self-check, no fallback


def test_build_reports_its_metal_status():
    assert isinstance(_ext.metal_kernels_built, bool)
    assert _ext.metal_build_status == "built" if _ext.metal_kernels_built else _ext.metal_build_status != "built"
    assert ops.native_gpu_kernels == (_ext.metal_kernels_built and mx.metal.is_available())


def test_reference_mode_in_a_fresh_process():
    code = (
        "import mlx.core as mx\n"
        "from blockpool import ops\n"
        "src = mx.arange(24, dtype=mx.float32).reshape(1, 2, 4, 3)\n"
        "blocks = ops.split_blocks([src], [1], [None], block_tokens=4)[0]\n"
        "joined = ops.concat_blocks([blocks])[0]\n"
        "print(ops.backend(), len(blocks), mx.array_equal(joined[:, :, 1:5], src).item())\n"
    )
    env = {**os.environ, ops.ENV_VAR: "reference"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.split() == ["reference", "2", "True"]


def test_doctor_prints_versions_devices_and_backends(capsys, monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)
    assert cli.main(["doctor"]) == 0
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    for label in (
        "python",
        "mlx",
        "mlx-lm",
        "blockpool",
        "default device",
        "metallib",
        "CPU copy threads",
        "BLOCKPOOL_OPS",
    ):
        assert label in lines, lines
    assert lines["mlx"] == mx.__version__
    assert lines["CPU copy threads"] == str(_ext.num_copy_threads())
    assert lines["Metal kernels in this build"] == _ext.metal_build_status
    assert lines[f"block ops on {mx.Device(mx.cpu)}"] == "native"
    assert lines[f"self-check on {mx.Device(mx.cpu)}"] == f"all {len(ops.OPS)} ops equal the reference"


def test_verify_names_an_op_that_disagrees_with_its_reference(monkeypatch):
    real = ops.concat_blocks
    monkeypatch.setattr(ops, "concat_blocks", lambda *a, **k: [x + 1 for x in real(*a, **k)])
    monkeypatch.setattr(ops, "split_blocks", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("kernel fault")))
    result = ops.verify()
    assert result["concat_blocks"] == "differs from the reference"
    assert result["split_blocks"] == "RuntimeError: kernel fault"
    assert all(result[op] == "ok" for op in ops.OPS if op not in ("concat_blocks", "split_blocks"))


def test_doctor_reports_reference_mode_and_refuses_a_bad_mode(capsys, monkeypatch):
    monkeypatch.setenv(ops.ENV_VAR, "reference")
    assert cli.main(["doctor"]) == 0
    lines = dict(re.split(r"\s{2,}", line, maxsplit=1) for line in capsys.readouterr().out.splitlines())
    assert lines[f"block ops on {mx.Device(mx.cpu)}"] == "reference"
    monkeypatch.setenv(ops.ENV_VAR, "bogus")
    assert cli.main(["doctor"]) == 2
    assert "BLOCKPOOL_OPS must be" in capsys.readouterr().err


def test_reference_is_the_oracle_of_the_self_check():
    # The self-check compares against blockpool.reference, not another native run.
    args, kwargs, expected = cases("concat_blocks")
    assert all(mx.array_equal(a, b).item() for a, b in zip(expected(), reference.concat_blocks(*args)))
