"""The native block ops: ``gather_blocks`` and ``scatter_blocks``.

On the CPU and on Apple GPUs (Metal) these are the compiled MLX primitives
from ``blockpool._ext``. A CUDA build of mlx has no native GPU kernel for
them, so there GPU streams fall back to :mod:`blockpool.reference`.

Rule for in-place writes: ``scatter_blocks`` reuses a pool's buffer only if,
when the graph is evaluated, nothing but the scatter itself references the
old pool array. Rebind the name that held the pool to the result before
evaluating (``pool = scatter_blocks([pool], ...)[0]``) and keep no other
copies, or the whole pool is copied.
"""

from __future__ import annotations

import mlx.core as mx

from blockpool import _ext, reference

__all__ = ["ensure_cache_limit", "gather_blocks", "gather_dequantize_blocks", "native_gpu_kernels", "scatter_blocks"]

#: Whether this build has native GPU kernels (Metal). False on Linux.
native_gpu_kernels: bool = mx.metal.is_available()


def _on_gpu(stream: mx.Stream | mx.Device | None) -> bool:
    device = stream.device if isinstance(stream, mx.Stream) else stream
    if device is None:
        device = mx.default_device()
    return device.type == mx.gpu


def ensure_cache_limit(nbytes: int) -> int:
    """Raise MLX's allocator cache limit to at least ``nbytes``; never lower it.

    MLX's CPU allocator keeps freed buffers for reuse only up to its cache
    limit (32 MiB by default). Beyond it, freed buffers go back to the C
    allocator, which returns chunks over 32 MiB to the OS, so the next
    reconstruction of that size pays a page fault per page: measured here,
    a gather into 64 MiB outputs ran 5x slower than with a warm cache. Call
    this with the bytes one reconstruction produces.

    Returns:
        The limit in force before the call.
    """
    previous = mx.set_cache_limit(nbytes)
    if previous > nbytes:
        mx.set_cache_limit(previous)
    return previous


if native_gpu_kernels or not mx.cuda.is_available():
    gather_blocks = _ext.gather_blocks
    scatter_blocks = _ext.scatter_blocks
    gather_dequantize_blocks = _ext.gather_dequantize_blocks
else:  # pragma: no cover - CUDA builds of mlx only

    def gather_blocks(pools, block_ids, *, stream=None):  # type: ignore[no-redef]
        """Native gather on CPU streams, the pure-MLX reference on CUDA."""
        if _on_gpu(stream):
            with mx.stream(stream or mx.default_device()):
                return reference.gather_blocks(pools, block_ids)
        return _ext.gather_blocks(pools, block_ids, stream=stream)

    def gather_dequantize_blocks(packed, scales, biases, block_ids, *, group_size=64, bits=4, stream=None):  # type: ignore[no-redef]
        """Native fused gather + dequantize on CPU streams, the pure-MLX reference on CUDA."""
        if _on_gpu(stream):
            with mx.stream(stream or mx.default_device()):
                return reference.gather_dequantize_blocks(packed, scales, biases, block_ids, group_size, bits)
        return _ext.gather_dequantize_blocks(packed, scales, biases, block_ids, group_size=group_size, bits=bits, stream=stream)

    def scatter_blocks(pools, block_ids, sources, offsets=None, *, stream=None):  # type: ignore[no-redef]
        """Native scatter on CPU streams, the pure-MLX reference on CUDA."""
        if _on_gpu(stream):
            with mx.stream(stream or mx.default_device()):
                return reference.scatter_blocks(pools, block_ids, sources, offsets)
        return _ext.scatter_blocks(pools, block_ids, sources, offsets, stream=stream)
