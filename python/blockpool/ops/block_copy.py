"""The block copy ops: blocks gathered into contiguous caches and written back, pooled or per block."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import mlx.core as mx

from blockpool import reference
from blockpool.errors import InvalidRequestError
from blockpool.ops.backends import BlockIdList, StreamLike, run


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


def _check_entries(op: str, name: str, entries: Sequence[Any]) -> None:
    """An entry that is itself an array would be iterated into sub-arrays: refuse it."""
    for i, entry in enumerate(entries):
        if isinstance(entry, mx.array):
            raise InvalidRequestError(
                f"{op}: {name}[{i}] is an mx.array; each entry must be a list of block arrays "
                f"({name}=[[b0, b1, ...], ...])"
            )


def gather_blocks(
    pools: Sequence[mx.array], block_ids: Sequence[BlockIdList], *, stream: StreamLike = None
) -> list[mx.array]:
    """Gather blocks of each pool into contiguous KV arrays, every entry in one graph node.

    Args:
        pools: Arrays ``[num_blocks, H, B, D]``, any dtype. The same array
            may appear in several entries.
        block_ids: For each entry, the block indices to read, in order: a
            list of ints, or an integer ``mx.array`` or numpy array of any
            layout (strided, broadcast, transposed views included).
        stream: Stream or device to run on.

    Returns:
        For each entry, ``[1, H, len(block_ids[i]) * B, D]`` holding block
        ``block_ids[i][j]`` at tokens ``j*B:(j+1)*B``.

    Raises:
        InvalidRequestError: Ids out of range, a pool not of rank 4, or
            list lengths that differ.
    """
    return run("gather_blocks", stream, (pools, block_ids), {}, lambda: reference.gather_blocks(pools, block_ids))


def scatter_blocks(
    pools: Sequence[mx.array],
    block_ids: Sequence[BlockIdList],
    sources: Sequence[mx.array],
    offsets: Sequence[int] | None = None,
    *,
    stream: StreamLike = None,
) -> list[mx.array]:
    """Write contiguous KV arrays back into blocks of each pool.

    Source token ``t`` of entry ``i`` goes to position ``offsets[i] + t`` of
    the entry's blocks: block ``block_ids[i][(offsets[i] + t) // B]``.
    Positions no source token reaches keep their old contents. Entries that
    pass the same pool array write into one updated copy of it, and each of
    them gets that array back; an unreferenced pool is updated in place
    (see the module's rule for in-place writes).

    Args:
        pools: Arrays ``[num_blocks, H, B, D]``.
        block_ids: For each entry, the block indices to write (as for
            :func:`gather_blocks`). No id may repeat within one pool in one call.
        sources: Arrays ``[1, H, T, D]`` of the pool's dtype, any strides.
        offsets: Position of source token 0 inside the first block, in
            ``[0, B)``; zero for every entry when omitted.
        stream: Stream or device to run on.

    Returns:
        The updated pool for each entry.

    Raises:
        InvalidRequestError: Ids out of range or repeated, shape, dtype or
            rank mismatch, more tokens than the blocks hold, or list lengths
            that differ.
    """
    return run(
        "scatter_blocks",
        stream,
        (pools, block_ids, sources, offsets),
        {},
        lambda: reference.scatter_blocks(pools, block_ids, sources, offsets),
    )


def gather_dequantize_blocks(
    packed: Sequence[mx.array],
    scales: Sequence[mx.array],
    biases: Sequence[mx.array],
    block_ids: Sequence[BlockIdList],
    *,
    group_size: int = 64,
    bits: int = 4,
    stream: StreamLike = None,
) -> list[mx.array]:
    """Gather blocks of affine-quantized pools and dequantize them in one pass.

    The pools use ``mx.quantize``'s layout along the head dim: ``packed``
    ``[num_blocks, H, B, D * bits / 32]`` (uint32), ``scales`` and
    ``biases`` ``[num_blocks, H, B, D / group_size]``. The result equals
    ``mx.dequantize`` of the gathered planes, bit for bit.

    Args:
        packed: Packed pools, one per entry (the same pool may repeat).
        scales: The matching scales pools (float16, bfloat16 or float32;
            entries may differ).
        biases: The matching biases pools, each of its scales' dtype.
        block_ids: For each entry, the block indices to read, in order.
        group_size: 32, 64 or 128, as given to ``mx.quantize``.
        bits: 2, 4 or 8, as given to ``mx.quantize``.
        stream: Stream or device to run on.

    Returns:
        For each entry, ``[1, H, len(block_ids[i]) * B, D]`` in that
        entry's scales dtype.

    Raises:
        InvalidRequestError: Ids out of range, shapes or dtypes that do not
            match, bits or group_size not supported, or list lengths that differ.
    """
    return run(
        "gather_dequantize_blocks",
        stream,
        (packed, scales, biases, block_ids),
        {"group_size": group_size, "bits": bits},
        lambda: reference.gather_dequantize_blocks(packed, scales, biases, block_ids, group_size, bits),
    )


def concat_blocks(blocks: Sequence[Sequence[mx.array]], *, stream: StreamLike = None) -> list[mx.array]:
    """Join each entry's block arrays on the token axis, every entry in one graph node.

    Args:
        blocks: For each entry (a layer's K or V plane, say), its blocks
            ``[H, B, D]`` in token order: at least one, all of one shape and
            dtype. The same array may appear several times.
        stream: Stream or device to run on.

    Returns:
        For each entry, a new ``[1, H, len(blocks[i]) * B, D]`` array with
        block ``j`` at tokens ``j*B:(j+1)*B``. An empty ``blocks`` gives ``[]``.

    Raises:
        InvalidRequestError: An entry with no blocks (its shape would be
            unknown), a block not of rank 3, or blocks of one entry that
            differ in shape or dtype.
    """
    _check_entries("concat_blocks", "blocks", blocks)
    return run("concat_blocks", stream, (blocks,), {}, lambda: reference.concat_blocks(blocks))


def concat_dequantize_blocks(
    packed: Sequence[Sequence[mx.array]],
    scales: Sequence[Sequence[mx.array]],
    biases: Sequence[Sequence[mx.array]],
    *,
    group_size: int = 64,
    bits: int = 4,
    stream: StreamLike = None,
) -> list[mx.array]:
    """Join and dequantize each entry's quantized blocks, bit-identical to ``mx.dequantize``.

    Args:
        packed: For each entry, its packed blocks ``[H, B, D * bits / 32]``
            (uint32), in token order, at least one.
        scales: The matching scales blocks ``[H, B, D / group_size]``
            (float16, bfloat16 or float32: one dtype per entry, entries may differ).
        biases: The matching biases blocks, of the scales' shape and dtype.
        group_size: 32, 64 or 128, as given to ``mx.quantize``.
        bits: 2, 4 or 8, as given to ``mx.quantize``.
        stream: Stream or device to run on.

    Returns:
        For each entry, ``[1, H, n * B, D]`` in that entry's scales dtype.

    Raises:
        InvalidRequestError: An empty entry, shapes or dtypes that do not
            match, bits or group_size not supported, or lengths that differ.
    """
    for name, planes in (("packed", packed), ("scales", scales), ("biases", biases)):
        _check_entries("concat_dequantize_blocks", name, planes)
    return run(
        "concat_dequantize_blocks",
        stream,
        (packed, scales, biases),
        {"group_size": group_size, "bits": bits},
        lambda: reference.concat_dequantize_blocks(packed, scales, biases, group_size, bits),
    )


def split_blocks(
    sources: Sequence[mx.array],
    offsets: Sequence[int],
    heads: Sequence[mx.array | None],
    *,
    block_tokens: int = 256,
    stream: StreamLike = None,
) -> list[list[mx.array]]:
    """Cut each source into new block arrays: the inverse of :func:`concat_blocks`.

    Entry ``i`` returns ``ceil((offsets[i] + T) / block_tokens)`` new arrays
    ``[H, block_tokens, D]``. Position ``p`` over them (0-based) holds source
    token ``p - offsets[i]`` for ``offsets[i] <= p < offsets[i] + T``;
    positions before ``offsets[i]`` are copied from ``heads[i]`` (zeros when
    it is None); positions after the source are zeros. ``T = 0`` is allowed:
    it gives no block when ``offsets[i]`` is 0, else one block holding the
    head's first ``offsets[i]`` tokens. With ``offsets[i] = 0`` the head is
    checked but unused. Every returned block is a separate array with its
    own buffer, so dropping one frees it.

    Args:
        sources: Arrays ``[1, H, T, D]``, any strides.
        offsets: For each source, the position of its token 0 in the first
            block, in ``[0, block_tokens)``.
        heads: For each source, a block ``[H, block_tokens, D]`` of its
            dtype (an agent's partly filled last block), or None.
        block_tokens: Tokens per block (the pool's B).
        stream: Stream or device to run on.

    Returns:
        For each source, its list of new blocks.

    Raises:
        InvalidRequestError: A source not ``[1, H, T, D]``, an offset out of
            range, a head of the wrong shape or dtype, ``block_tokens < 1``,
            or lengths that differ.
    """
    return run(
        "split_blocks",
        stream,
        (sources, offsets, heads),
        {"block_tokens": block_tokens},
        lambda: reference.split_blocks(sources, offsets, heads, block_tokens),
    )
