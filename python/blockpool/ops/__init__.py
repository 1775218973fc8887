"""The block ops, and which implementation runs them on each device.

Pooled ops (a pool array ``[num_blocks, H, B, D]`` and block ids):
``gather_blocks``, ``scatter_blocks``, ``gather_dequantize_blocks``.
Per-block ops (one array ``[H, B, D]`` per block): ``concat_blocks``,
``concat_dequantize_blocks``, ``split_blocks``. Each call builds one graph
node for all its entries (``scatter_blocks``: one per distinct pool;
``split_blocks``: one per 128 new blocks, since every output of an MLX node
references all its siblings). Paged attention over per-block arrays:
``paged_attention`` (one node) and ``write_tokens`` (one node per write, so
that a block nothing else holds is written in place).

Backends. ``native`` is the compiled MLX primitives of ``blockpool._ext``;
``reference`` is the pure-MLX :mod:`blockpool.reference`. CPU streams use
native. GPU streams use native only where this build has GPU kernels
(Metal) and each op passed a self-check: the first GPU use of an op in a
process runs it on a tiny case against the reference, and on a mismatch or
an error warns once and uses the reference for that op from then on. CUDA
builds of mlx, and Macs whose Metal build failed, use the reference on the
GPU. The environment variable ``BLOCKPOOL_OPS`` overrides this:
``reference`` uses the reference for every op on every device; ``native``
uses the compiled primitives everywhere, without a self-check (a GPU
without kernels then fails at evaluation); unset, empty or ``auto`` is the
default. :func:`backend` tells which one a device gets.

Errors. Bad input raises :class:`~blockpool.errors.InvalidRequestError`
(a ``ValueError``) when the op is called, before any graph is built, in
both backends: every call is checked by the native op function. Block ids
traced by ``mx.compile`` (ids passed as arguments of the compiled function)
are only known at evaluation: a bad one makes ``mx.eval`` raise
``RuntimeError`` before anything is written, on CPU streams; on GPU streams
the native ops refuse traced ids when the graph is built, because a GPU
kernel cannot check before it writes. ``mx.compile(..., shapeless=True)``
is supported: shapes are read from the arrays at evaluation and checked
again there (``RuntimeError`` on a mismatch); ``split_blocks`` refuses a
shapeless call whose entries would need a different number of blocks.

Rule for in-place writes: ``scatter_blocks`` reuses a pool's buffer only if,
when the graph is evaluated, nothing but the scatter itself references the
old pool array. Rebind the name that held the pool to the result before
evaluating (``pool = scatter_blocks([pool], ...)[0]``) and keep no other
copies, or the whole pool is copied.

Modules: :mod:`.block_copy` (the six copy ops), :mod:`.attention`
(``paged_attention``, ``write_tokens``), :mod:`.backends` (the choice
above and the call path every op takes), :mod:`.self_check`.
"""

from __future__ import annotations

import mlx.core as mx

from blockpool.ops.attention import GPU_HEAD_DIM as GPU_HEAD_DIM
from blockpool.ops.attention import QuantizedPlanes as QuantizedPlanes
from blockpool.ops.attention import TokenWrite as TokenWrite
from blockpool.ops.attention import paged_attention, write_tokens
from blockpool.ops.backends import OPS, backend, device_of, native_gpu_kernels
from blockpool.ops.backends import BlockIdList as BlockIdList
from blockpool.ops.backends import StreamLike as StreamLike
from blockpool.ops.block_copy import (
    concat_blocks,
    concat_dequantize_blocks,
    ensure_cache_limit,
    gather_blocks,
    gather_dequantize_blocks,
    scatter_blocks,
    split_blocks,
)
from blockpool.ops.self_check import ENV_VAR as ENV_VAR
from blockpool.ops.self_check import cases, flatten, same

__all__ = [
    "OPS",
    "backend",
    "concat_blocks",
    "concat_dequantize_blocks",
    "ensure_cache_limit",
    "gather_blocks",
    "gather_dequantize_blocks",
    "native_gpu_kernels",
    "paged_attention",
    "scatter_blocks",
    "split_blocks",
    "verify",
    "write_tokens",
]


# ------------------------------------------------------------------ self-check


def verify(device: mx.Device | mx.DeviceType | None = None) -> dict[str, str]:
    """Run every op as callers get it (through :func:`backend`'s choice) on a small case and
    compare it with the pure-MLX reference, bit for bit.

    Returns:
        Per op, ``"ok"`` or why it failed. ``blockpool doctor`` prints it.
    """
    dev = device_of(device)
    results = {}
    for op in OPS:
        try:
            with mx.stream(dev):
                args, kwargs, expected = cases(op)
                got = flatten(globals()[op](*args, stream=dev, **kwargs))
                want = flatten(expected())
                mx.eval(got, want)
            results[op] = "ok" if same(op, got, want, dev) else "differs from the reference"
        except Exception as e:  # a report, not a crash: say what failed
            results[op] = f"{type(e).__name__}: {e}"
    return results
