"""The block ops' self-check: each op on a tiny case, compared with the pure-MLX reference, bit for bit
(paged attention on a GPU: within a tolerance, see :data:`TOLERANT`).

:func:`self_check` is what :mod:`blockpool.ops` runs the first time an op
is used on a GPU device (native kernels that fail it are not used there);
``blockpool.ops.verify`` runs every op as callers get it, for ``blockpool doctor``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, Literal

import mlx.core as mx

from blockpool import _ext, reference

Backend = Literal["native", "reference"]
ENV_VAR = "BLOCKPOOL_OPS"


def cases(op: str) -> tuple[tuple, dict, Callable[[], Any]]:
    """A tiny call of ``op`` (native args, kwargs) and its reference result."""
    key = mx.random.key(7)
    pool = mx.random.normal((5, 2, 4, 16), key=key).astype(mx.float16)
    source = mx.swapaxes(mx.random.normal((1, 6, 2, 16), key=key).astype(mx.float16), 1, 2)  # strided
    blocks = [pool[i] for i in range(5)]
    if op == "gather_blocks":
        args = ([pool, pool], [[3, 0, 4], [1]])
        return args, {}, lambda: reference.gather_blocks(*args)
    if op == "scatter_blocks":
        args = ([pool], [[2, 4]], [source], [1])
        return args, {}, lambda: reference.scatter_blocks(*args)
    if op == "concat_blocks":
        args = ([blocks[3:], blocks[:2] + blocks[:1]],)
        return args, {}, lambda: reference.concat_blocks(*args)
    if op == "split_blocks":
        args = ([source, source[:, :, :0]], [3, 2], [blocks[1], None])
        return args, {"block_tokens": 4}, lambda: reference.split_blocks(*args, block_tokens=4)
    if op == "paged_attention":
        queries = mx.random.normal((2, 4, 2, 16), key=key).astype(mx.float16)
        values = [mx.swapaxes(b, 0, 0) * 2 for b in blocks]
        args = (queries, blocks, values, [[0, 3], [-1, 4, 1]], [6, 11], [4, 9])
        kwargs = {"scale": 0.25, "window": 5}
        return (
            args,
            kwargs,
            lambda: reference.paged_attention(*args, scale=0.25, window=5),
        )
    if op == "write_tokens":
        args = ([source], [(0, blocks[2], 0, 1, 2, 1), (0, None, 0, 0, 3, 0)])
        return args, {"block_tokens": 4}, lambda: reference.write_tokens(*args, block_tokens=4)
    x = mx.random.normal((5, 2, 4, 64), key=key)
    q, s, b = mx.quantize(x, group_size=32, bits=4)  # float32 scales
    q16, s16, b16 = mx.quantize(x.astype(mx.float16), group_size=32, bits=4)  # float16 scales
    if op == "gather_dequantize_blocks":
        args = ([q, q16], [s, s16], [b, b16], [[4, 1], [0]])
        kwargs = {"group_size": 32, "bits": 4}
        return args, kwargs, lambda: reference.gather_dequantize_blocks(*args, 32, 4)
    # concat_dequantize_blocks
    args = ([[q[4], q[1]], [q16[0]]], [[s[4], s[1]], [s16[0]]], [[b[4], b[1]], [b16[0]]])
    kwargs = {"group_size": 32, "bits": 4}
    return args, kwargs, lambda: reference.concat_dequantize_blocks(*args, 32, 4)


#: Ops whose GPU kernels sum in another order than the reference (MLX's own GPU attention): they are
#: compared within this relative tolerance there; every other op, and every op on the CPU, bit for bit.
TOLERANT = {"paged_attention": 1e-2}


def same(op: str, got: list[mx.array], want: list[mx.array], device: mx.Device) -> bool:
    """Whether an op's results equal the reference's: bit for bit, or within its tolerance on a GPU."""
    if len(got) != len(want) or any(g.shape != w.shape or g.dtype != w.dtype for g, w in zip(got, want)):
        return False
    tolerance = TOLERANT.get(op) if device.type == mx.gpu else None
    if tolerance is None:
        return all(mx.array_equal(g, w).item() for g, w in zip(got, want))
    return all(
        mx.allclose(g.astype(mx.float32), w.astype(mx.float32), rtol=tolerance, atol=tolerance).item()
        for g, w in zip(got, want)
    )


def flatten(result: Any) -> list[mx.array]:
    if isinstance(result, mx.array):
        return [result]
    return [a for item in result for a in flatten(item)]


def self_check(op: str, device: mx.Device) -> Backend:
    """Run ``op`` natively on ``device`` against the reference; warn and fall back on failure."""
    try:
        with mx.stream(device):
            args, kwargs, expected = cases(op)
            got = flatten(getattr(_ext, op)(*args, stream=device, **kwargs))
            want = flatten(expected())
            mx.eval(got, want)
        agrees = same(op, got, want, device)
        reason = "" if agrees else "its result differs from the reference"
    except Exception as e:  # any failure of the kernel means: do not use it
        agrees, reason = False, f"{type(e).__name__}: {e}"
    if agrees:
        return "native"
    warnings.warn(
        f"blockpool: the native {op} failed its self-check on {device} ({reason}); "
        f"using the pure-MLX reference for {op} on this device from now on. "
        f"Results stay correct; set {ENV_VAR}=reference to silence this.",
        RuntimeWarning,
        stacklevel=4,
    )
    return "reference"
