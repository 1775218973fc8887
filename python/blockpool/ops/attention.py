"""Attention over K and V kept in blocks (read in place), and new tokens written into blocks."""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

from blockpool import reference
from blockpool.ops.backends import StreamLike, device_of, run

QuantizedPlanes = tuple[mx.array, mx.array, mx.array]

#: The widest head dim the GPU kernel of paged attention takes (32 lanes x 8).
GPU_HEAD_DIM = 256


def paged_attention(
    queries: mx.array,
    key_blocks: Sequence[mx.array],
    value_blocks: Sequence[mx.array],
    block_tables: Sequence[Sequence[int]],
    context_lengths: Sequence[int],
    query_starts: Sequence[int] | None = None,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    sinks: mx.array | None = None,
    ring_bases: Sequence[int] | None = None,
    quantized_keys: Sequence[QuantizedPlanes] | None = None,
    quantized_values: Sequence[QuantizedPlanes] | None = None,
    group_size: int = 64,
    bits: int | None = None,
    stream: StreamLike = None,
) -> mx.array:
    """Attention over keys and values stored in blocks, read in place: no copy of the history.

    Row ``b``'s query ``i`` sits at position ``query_starts[b] + i`` and
    attends to the row's positions up to its own (and, with ``window``, to
    the last ``window`` of them), never past ``context_lengths[b] - 1``.
    Position ``p`` of row ``b`` is in block ``block_tables[b][p // B]``: an
    index into ``key_blocks``/``value_blocks`` and then into the quantized
    blocks. The result equals, bit for bit, MLX's
    ``mx.fast.scaled_dot_product_attention`` on the CPU over the same keys
    in the order mlx-lm's cache holds them (:func:`blockpool.reference.paged_attention`).

    Args:
        queries: ``[B, Hq, N, D]`` float32, float16 or bfloat16, any strides.
        key_blocks: Blocks ``[Hkv, B, D]`` of the queries' dtype, contiguous.
        value_blocks: The matching value blocks ``[Hkv, B, Dv]``.
        block_tables: Per row, its blocks in position order; ``-1`` for a
            block it does not hold (before a sliding window), never read.
        context_lengths: Per row, the tokens it holds (the new ones included).
        query_starts: Per row, the position of its first query; by default
            ``context_lengths[b] - N`` (the queries are the row's last tokens).
        scale: The queries' scale (``head_dim ** -0.5`` for most models).
        window: Attend to at most this many positions (a sliding-window layer).
        softcap: Scores become ``softcap * tanh(score / softcap)``.
        sinks: ``[Hq]``: one extra logit per head that takes weight and gives no value.
        ring_bases: For one-token steps of a sliding-window layer: per row,
            its token count after its last multi-token step (0 while that was
            under ``window``), so that sums run in the order of mlx-lm's
            ``RotatingKVCache`` ring; -1 or None for time order.
        quantized_keys: ``(packed, scales, biases)`` per quantized block
            (``mx.quantize``'s layout, scales of the queries' dtype).
        quantized_values: The matching value planes.
        group_size: The quantized blocks' group size.
        bits: The quantized blocks' bits (4 or 8, say).
        stream: Stream or device to run on.

    Returns:
        ``[B, Hq, N, Dv]`` in the queries' dtype.

    Raises:
        InvalidRequestError: Shapes, dtypes or tables that do not match, a
            position a query reads that no block holds, or lists of other lengths.
    """
    n = queries.shape[2] if queries.ndim == 4 else 0
    starts = [length - n for length in context_lengths] if query_starts is None else list(query_starts)
    quantized = bool(quantized_keys)
    native_kwargs = {
        "scale": scale,
        "window": window or 0,
        "softcap": softcap or 0.0,
        "sinks": sinks,
        "ring_bases": ring_bases,
        "quantized_keys": quantized_keys or None,
        "quantized_values": quantized_values or None,
        "group_size": group_size,
        "bits": (bits or 0) if quantized else 0,
    }
    args = (queries, key_blocks, value_blocks, block_tables, context_lengths, starts)
    # The Metal kernel takes head dims up to GPU_HEAD_DIM: wider ones run the reference on a GPU.
    dims = [queries.shape[-1] if queries.ndim else 0] + [b.shape[-1] for b in value_blocks[:1]]
    wide = device_of(stream).type == mx.gpu and max(dims) > GPU_HEAD_DIM

    def run_reference() -> mx.array:
        return reference.paged_attention(
            *args[:5],
            starts,
            scale,
            window or 0,
            softcap or 0.0,
            sinks,
            ring_bases,
            quantized_keys or (),
            quantized_values or (),
            group_size,
            bits or 0,
        )

    return run("paged_attention", stream, args, native_kwargs, run_reference, reference_only=wide)


TokenWrite = tuple[int, mx.array | None, int, int, int, int]


def write_tokens(
    sources: Sequence[mx.array], writes: Sequence[TokenWrite], *, block_tokens: int = 256, stream: StreamLike = None
) -> list[mx.array]:
    """Write tokens into blocks: each write gives a new block array, in place when it can.

    Write ``(source, dest, row, source_start, count, offset)`` puts tokens
    ``source_start .. source_start + count - 1`` of row ``row`` of
    ``sources[source]`` (``[R, H, T, D]``, any strides) at rows
    ``offset .. offset + count - 1`` of ``dest`` (``[H, block_tokens, D]``
    of the source's dtype), keeping its other rows; with no ``dest``, of a
    new block of zeros. Each write is its own graph node, so when nothing
    but the write references ``dest`` at evaluation its buffer is reused
    (rebind the name that held it to the result, as for
    :func:`scatter_blocks`); otherwise the block is copied first
    (``blockpool._ext.copied_writes()`` counts those).

    Returns:
        The written blocks, one per write.

    Raises:
        InvalidRequestError: A source not of rank 4, or a write that names
            another source, a row or tokens the source lacks, or rows past
            the block, or a destination of another shape or dtype.
    """
    return run(
        "write_tokens",
        stream,
        (sources, writes),
        {"block_tokens": block_tokens},
        lambda: reference.write_tokens(sources, writes, block_tokens),
    )
