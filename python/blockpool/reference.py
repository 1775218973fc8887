"""Pure-MLX versions of the native block ops.

They define what the native ops must compute and serve as the test oracle.
They are also what :mod:`blockpool.ops` runs where the native kernels are
not used: GPU streams without working native kernels (CUDA builds of mlx, a
Mac whose Metal build failed) and ``BLOCKPOOL_OPS=reference``. They are
written for clarity, not speed, and they do not validate their input:
``blockpool.ops`` checks every call with the native op functions first.
"""

from __future__ import annotations

from collections.abc import Sequence

import mlx.core as mx

BlockIdList = Sequence[int] | mx.array


def _ids(block_ids: BlockIdList) -> mx.array:
    return mx.array(block_ids, dtype=mx.int32) if not isinstance(block_ids, mx.array) else block_ids.astype(mx.int32)


def gather_blocks(pools: Sequence[mx.array], block_ids: Sequence[BlockIdList]) -> list[mx.array]:
    """Reference gather: ``out[i] = concat(pools[i][ids])`` on the token axis."""
    outputs = []
    for pool, ids in zip(pools, block_ids, strict=True):
        _, heads, block, dim = pool.shape
        blocks = mx.take(pool, _ids(ids), axis=0)  # [n, H, B, D]
        n = blocks.shape[0]
        outputs.append(blocks.transpose(1, 0, 2, 3).reshape(1, heads, n * block, dim))
    return outputs


def scatter_blocks(
    pools: Sequence[mx.array],
    block_ids: Sequence[BlockIdList],
    sources: Sequence[mx.array],
    offsets: Sequence[int] | None = None,
) -> list[mx.array]:
    """Reference scatter: token ``t`` of ``sources[i]`` goes to position
    ``offsets[i] + t`` of the blocks ``block_ids[i]``; entries that pass the
    same pool array update one shared result."""
    offsets = [0] * len(pools) if offsets is None else list(offsets)
    updated: dict[int, mx.array] = {}
    first_seen: dict[int, int] = {}
    for i, (pool, ids, src, first) in enumerate(zip(pools, block_ids, sources, offsets, strict=True)):
        key = first_seen.setdefault(id(pool), i)
        current = updated.get(key, pool)
        _, heads, block, dim = pool.shape
        tokens = src.shape[2]
        if tokens == 0:
            updated[key] = current
            continue
        positions = mx.arange(first, first + tokens)
        ids_arr = _ids(ids)
        rows = ids_arr[positions // block] * block + positions % block  # flat token row
        flat = current.transpose(0, 2, 1, 3).reshape(-1, heads, dim)  # [NB*B, H, D]
        flat[rows] = src[0].transpose(1, 0, 2)
        num_blocks = pool.shape[0]
        updated[key] = flat.reshape(num_blocks, block, heads, dim).transpose(0, 2, 1, 3)
    return [updated[first_seen[id(pool)]] for pool in pools]


def gather_dequantize_blocks(
    packed: Sequence[mx.array],
    scales: Sequence[mx.array],
    biases: Sequence[mx.array],
    block_ids: Sequence[BlockIdList],
    group_size: int = 64,
    bits: int = 4,
) -> list[mx.array]:
    """Reference fused gather + dequantize: gather each plane, then ``mx.dequantize``."""
    out = []
    for qi, si, bi in zip(*(gather_blocks(planes, block_ids) for planes in (packed, scales, biases))):
        if qi.shape[2] == 0:  # mx.dequantize cannot reshape an empty array
            out.append(mx.zeros(qi.shape[:3] + (qi.shape[3] * 32 // bits,), dtype=si.dtype))
        else:
            out.append(mx.dequantize(qi, si, bi, group_size=group_size, bits=bits))
    return out


def concat_blocks(blocks: Sequence[Sequence[mx.array]]) -> list[mx.array]:
    """Reference concat: each entry's ``[H, B, D]`` blocks joined into ``[1, H, n*B, D]``."""
    return [mx.concatenate(list(entry), axis=1)[None] for entry in blocks]


def concat_dequantize_blocks(
    packed: Sequence[Sequence[mx.array]],
    scales: Sequence[Sequence[mx.array]],
    biases: Sequence[Sequence[mx.array]],
    group_size: int = 64,
    bits: int = 4,
) -> list[mx.array]:
    """Reference concat + dequantize: join each plane, then ``mx.dequantize``."""
    out = []
    for q, s, b in zip(packed, scales, biases, strict=True):
        q, s, b = (mx.concatenate(list(plane), axis=1) for plane in (q, s, b))
        out.append(mx.dequantize(q, s, b, group_size=group_size, bits=bits)[None])
    return out


def split_blocks(
    sources: Sequence[mx.array],
    offsets: Sequence[int],
    heads: Sequence[mx.array | None],
    block_tokens: int = 256,
) -> list[list[mx.array]]:
    """Reference split: position ``p`` of entry ``i``'s new blocks holds source
    token ``p - offsets[i]``; earlier positions come from ``heads[i]`` (or are
    zero), later ones are zero. Every block is its own new array."""
    out = []
    for src, first, head in zip(sources, offsets, heads, strict=True):
        _, heads_n, tokens, dim = src.shape
        blocks = []
        for k in range(-(-(first + tokens) // block_tokens)):
            start = k * block_tokens
            block = mx.zeros((heads_n, block_tokens, dim), dtype=src.dtype)
            if start < first and head is not None:
                block[:, : first - start] = head[:, : first - start]
            lo, hi = max(start, first), min(start + block_tokens, first + tokens)
            if lo < hi:
                block[:, lo - start : hi - start] = src[0, :, lo - first : hi - first]
            blocks.append(block)
        out.append(blocks)
    return out


def paged_attention(
    queries: mx.array,
    key_blocks: Sequence[mx.array],
    value_blocks: Sequence[mx.array],
    block_tables: Sequence[Sequence[int]],
    context_lengths: Sequence[int],
    query_starts: Sequence[int],
    scale: float,
    window: int = 0,
    softcap: float = 0.0,
    sinks: mx.array | None = None,
    ring_bases: Sequence[int] | None = None,
    quantized_keys: Sequence[tuple[mx.array, mx.array, mx.array]] = (),
    quantized_values: Sequence[tuple[mx.array, mx.array, mx.array]] = (),
    group_size: int = 64,
    bits: int = 0,
) -> mx.array:
    """Reference paged attention: each row's blocks joined (and dequantized), its keys put in the
    order mlx-lm's cache holds them, then MLX's own ``scaled_dot_product_attention`` with the mask
    of the row's causal positions and window (a manual softmax when there is a softcap)."""

    def dequantized(planes: Sequence[tuple[mx.array, mx.array, mx.array]]) -> list[mx.array]:
        return [mx.dequantize(*p, group_size=group_size, bits=bits) for p in planes]

    keys = list(key_blocks) + dequantized(quantized_keys)
    values = list(value_blocks) + dequantized(quantized_values)
    rows, q_heads, n, _ = queries.shape
    v_dim = values[0].shape[2]
    out = []
    for b in range(rows):
        length, start = context_lengths[b], query_starts[b]
        if length == 0:
            out.append(mx.zeros((1, q_heads, n, v_dim), dtype=queries.dtype))
            continue
        table = list(block_tables[b])
        some = next(i for i in table if i >= 0)
        k = mx.concatenate([keys[i if i >= 0 else some] for i in table], axis=1)[:, :length]
        v = mx.concatenate([values[i if i >= 0 else some] for i in table], axis=1)[:, :length]
        positions = mx.arange(length)
        ring = -1 if ring_bases is None else ring_bases[b]
        if window and ring >= 0 and n == 1:
            # mlx-lm's ring: slot s holds the position p with (p - ring) % window == s
            lo = max(0, start - window + 1)
            first = (ring - lo) % window
            count = min(start, length - 1) - lo + 1
            first = first if first < count else 0
            order = mx.array([lo + (first + i) % count for i in range(count)])
            k, v, positions = k[:, order], v[:, order], order
        query_positions = mx.arange(start, start + n)[:, None]
        mask = positions[None] <= query_positions
        if window:
            mask = mask & (positions[None] > query_positions - window)
        q = queries[b : b + 1]
        seen = mask.any(axis=-1)[:, None]  # a padding query past the row's end may see no key: zeros
        if not softcap:
            attended = mx.fast.scaled_dot_product_attention(q, k[None], v[None], scale=scale, mask=mask, sinks=sinks)
            out.append(mx.where(seen, attended, mx.zeros_like(attended)))
            continue
        repeats = q_heads // k.shape[0]
        kk, vv = mx.repeat(k, repeats, axis=0)[None], mx.repeat(v, repeats, axis=0)[None]
        scores = (q * mx.array(scale, dtype=q.dtype)) @ kk.swapaxes(-1, -2)
        scores = (mx.tanh(scores.astype(mx.float32) / softcap) * softcap).astype(q.dtype)
        scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
        if sinks is not None:
            column = mx.broadcast_to(sinks.astype(q.dtype)[None, :, None, None], scores.shape[:3] + (1,))
            scores = mx.concatenate([column, scores], axis=-1)
        weights = mx.softmax(scores, axis=-1, precise=True)
        if sinks is not None:
            weights = weights[..., 1:]
        attended = weights @ vv
        out.append(mx.where(seen, attended, mx.zeros_like(attended)))
    return mx.concatenate(out, axis=0)


def write_tokens(
    sources: Sequence[mx.array],
    writes: Sequence[tuple[int, mx.array | None, int, int, int, int]],
    block_tokens: int = 256,
) -> list[mx.array]:
    """Reference token writes: ``(source, dest, row, source_start, count, offset)`` puts tokens
    ``source_start .. + count`` of row ``row`` of ``sources[source]`` at rows ``offset ..`` of
    ``dest`` (a new block of zeros when None); every other row is the destination's."""
    out = []
    for source, dest, row, start, count, offset in writes:
        src = sources[source]
        block = mx.zeros((src.shape[1], block_tokens, src.shape[3]), dtype=src.dtype) if dest is None else dest
        new = src[row, :, start : start + count].astype(src.dtype)
        out.append(mx.concatenate([block[:, :offset], new, block[:, offset + count :]], axis=1))
    return out
