"""Conversion between an agent's blocks and mlx-lm's per-layer caches.

Reconstruction (:func:`to_mlx_caches`) gathers every layer in one native
call; extraction (:func:`from_mlx_caches`) writes only the tokens not stored
yet, every layer in one native call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache

from blockpool.block import AgentBlocks, KVBlock
from blockpool.pool import BlockPool, BlockWrite


def to_mlx_caches(pool: BlockPool, agent: AgentBlocks) -> list[Any]:
    """Rebuild the mlx-lm caches an agent's blocks hold.

    Full-attention layers become a ``KVCache`` of ``offset = total_tokens``;
    sliding-window layers a ``RotatingKVCache`` holding the last ``window``
    tokens, in the physical order the original cache had, so that decoding
    continues exactly as if the cache had never left.
    """
    spec = agent.spec
    caches: list[Any] = []
    total = agent.total_tokens
    data = pool.read({layer: blocks for layer, blocks in agent.blocks.items() if blocks}) if total else {}
    for layer_id, layer in enumerate(spec.layers):
        if layer.window is None:
            cache = KVCache()
            if total:
                cache.keys, cache.values = data[layer_id]
                cache.offset = total
        else:
            cache = RotatingKVCache(max_size=layer.window, keep=0)
            if total:
                keys, values = data[layer_id]
                n = min(total, layer.window)
                start = total - n - agent.first_block(layer_id) * spec.block_tokens
                keys, values = keys[..., start : start + n, :], values[..., start : start + n, :]
                ring = agent.ring_index.get(layer_id)
                if ring is not None:  # restore the ring's physical order
                    keys, values = mx.roll(keys, ring, axis=2), mx.roll(values, ring, axis=2)
                cache.keys, cache.values = keys, values
                cache.offset = total
                cache._idx = n if ring is None else ring
        caches.append(cache)
    return caches


def blocks_to_reserve(pool: BlockPool, agent: AgentBlocks, final_tokens: int) -> dict[int, int]:
    """New blocks per layer that extending ``agent`` to ``final_tokens`` tokens may need.

    An upper bound that holds for any final length up to ``final_tokens``:
    a sliding layer never needs more than ``ceil(window / B) + 1`` new blocks.
    A full layer whose partial last block is shared needs one more (copy on
    write).
    """
    spec = agent.spec
    held_hi = -(-agent.total_tokens // spec.block_tokens)
    _, hi = spec.block_range(0, final_tokens)
    counts = {}
    for layer_id in range(spec.num_layers):
        need = max(0, hi - held_hi)
        cap = spec.max_blocks(layer_id)
        if cap is not None:
            need = min(need, cap)
        elif _shared_partial_block(pool, agent, layer_id) is not None:
            need += 1
        counts[layer_id] = need
    return counts


def from_mlx_caches(
    pool: BlockPool,
    caches: Sequence[Any],
    token_ids: Sequence[int],
    base: AgentBlocks,
    reserved: Mapping[int, list[KVBlock]] | None = None,
) -> AgentBlocks:
    """Store the tokens of ``caches`` that ``base`` does not hold yet, and return the new handle.

    ``base`` is consumed: its blocks move into the returned handle, except
    sliding-layer blocks that fell out of the window, which are freed. New
    blocks come from ``reserved`` first, then from the pool; reserved blocks
    left over are freed.

    Args:
        pool: The pool holding ``base``'s blocks.
        caches: The model's per-layer mlx-lm caches, ``len(token_ids)`` tokens long.
        token_ids: Every token the caches hold, history first.
        base: The agent's handle before these tokens (``AgentBlocks.empty`` for a new agent).
        reserved: Blocks allocated to the agent ahead of time, per layer.

    Raises:
        PoolExhaustedError: More blocks were needed than reserved and free;
            nothing was written and ``base`` is unchanged.
    """
    spec = base.spec
    b = spec.block_tokens
    total, stored = len(token_ids), base.total_tokens
    if list(token_ids[:stored]) != base.token_ids:
        raise ValueError("token_ids do not extend the tokens the blocks hold")
    if len(caches) != spec.num_layers:
        raise ValueError(f"{len(caches)} caches for a model of {spec.num_layers} layers")
    spare = {layer: list(blocks) for layer, blocks in (reserved or {}).items()}
    held_hi = -(-stored // b)

    plans = []  # (layer, first logical block, kept, to free, new blocks needed, first position written, source)
    valid_from: dict[int, int] = {}
    extra: dict[int, int] = {}
    for layer_id, cache in enumerate(caches):
        if cache.offset != total:
            raise ValueError(f"layer {layer_id} cache holds {cache.offset} tokens, expected {total}")
        lo, hi = spec.block_range(layer_id, total)
        held = list(base.blocks[layer_id])
        first = held_hi - len(held)  # logical index of the first held block
        window = spec.layers[layer_id].window
        write_from = stored if window is None else max(stored, total - window)
        n_drop = max(0, lo - first)  # sliding blocks that fell out of the window
        kept, dropped = held[n_drop:], held[:n_drop]
        # A shared block is read-only: its tokens go into a fresh copy.
        shared = _shared_partial_block(pool, base, layer_id)
        if shared is not None and kept and kept[-1] == shared and write_from < min(total, held_hi * b):
            kept, write_from = kept[:-1], (held_hi - 1) * b
            dropped.append(shared)
        fresh = hi - (lo + len(kept))  # kept blocks start at logical index lo
        if window is not None:  # what the sliding layer's blocks will really hold
            held_from = base.valid_start(layer_id) if stored else 0
            valid_from[layer_id] = max(held_from, lo * b) if write_from <= stored else write_from
        have = len(spare.get(layer_id, []))
        if fresh > have:
            extra[layer_id] = fresh - have
        source = None
        if write_from < total:
            keys, values, start = _time_ordered(cache)
            if start > write_from:
                raise ValueError(f"layer {layer_id} cache no longer holds token {write_from}")
            source = (keys[..., write_from - start : total - start, :], values[..., write_from - start : total - start, :])
        plans.append((layer_id, lo, kept, dropped, fresh, write_from, source))

    # Checks are done; only the pool can still refuse (no free blocks).
    got = pool.reserve(extra, base.agent_id) if extra else {}
    for layer_id, extra_blocks in got.items():
        spare.setdefault(layer_id, []).extend(extra_blocks)

    blocks: dict[int, list[KVBlock]] = {}
    writes = []
    release: list[KVBlock] = []
    for layer_id, lo, kept, dropped, fresh, write_from, source in plans:
        new, spare[layer_id] = spare.get(layer_id, [])[:fresh], spare.get(layer_id, [])[fresh:]
        blocks[layer_id] = kept + new
        release += dropped
        if source is not None:
            j0 = write_from // b - lo
            writes.append(BlockWrite(layer_id, blocks[layer_id][j0:], *source, offset=write_from % b))
    try:
        pool.write(writes)
    except Exception:
        if got:
            pool.free([blk for extra_blocks in got.values() for blk in extra_blocks], base.agent_id)
        raise
    ring = {layer_id: r for layer_id, cache in enumerate(caches) if (r := _ring_index(cache)) is not None}
    release += [blk for rest in spare.values() for blk in rest]
    if release:
        pool.free(release, base.agent_id)
    return AgentBlocks(base.agent_id, spec, blocks, total, list(token_ids), ring, valid_from)


def truncate(pool: BlockPool, agent: AgentBlocks, tokens: int) -> AgentBlocks | None:
    """Cut an agent's cache back to its first ``tokens`` tokens, freeing whole blocks past them.

    The partly used block at the cut is kept; the tokens past the cut in it
    are overwritten by the next extraction. ``agent`` is consumed.

    Returns:
        The shorter handle, or None (and nothing freed) when a sliding
        layer does not hold the window that ends at the cut (its older
        tokens were dropped or never stored), so the cache cannot serve
        that prefix; as with mlx-lm's ``RotatingKVCache``, which cannot be
        trimmed once it has wrapped.
    """
    if tokens >= agent.total_tokens:
        return agent
    spec = agent.spec
    blocks, drop, valid_from = {}, [], {}
    for layer_id, held in agent.blocks.items():
        lo, hi = spec.block_range(layer_id, tokens)
        first = agent.first_block(layer_id)
        window = spec.layers[layer_id].window
        if window is not None:
            if agent.valid_start(layer_id) > max(0, tokens - window):
                return None
            valid_from[layer_id] = max(agent.valid_start(layer_id), lo * spec.block_tokens)
        blocks[layer_id] = held[lo - first : hi - first]
        drop += held[: lo - first] + held[hi - first :]
    if drop:
        pool.free(drop, agent.agent_id)
    return AgentBlocks(agent.agent_id, spec, blocks, tokens, agent.token_ids[:tokens], valid_from=valid_from)


def _shared_partial_block(pool: BlockPool, agent: AgentBlocks, layer_id: int) -> KVBlock | None:
    """The layer's last block if it is partly filled and shared with another agent."""
    blocks = agent.blocks[layer_id]
    if not blocks or agent.total_tokens % agent.spec.block_tokens == 0:
        return None
    last = blocks[-1]
    return last if pool.refcount(last) > 1 else None


def _time_ordered(cache: Any) -> tuple[mx.array, mx.array, int]:
    """A cache's tokens in time order, and the position of the first one."""
    keys, values, offset = cache.keys, cache.values, cache.offset
    if type(cache) is KVCache:
        return keys[..., :offset, :], values[..., :offset, :], 0
    idx, size = cache._idx, keys.shape[2]
    if idx == size or idx >= offset:
        keys, values = keys[..., :idx, :], values[..., :idx, :]
    else:  # a full ring: oldest tokens start at the write index
        keys = mx.concatenate([keys[..., idx:, :], keys[..., :idx, :]], axis=2)
        values = mx.concatenate([values[..., idx:, :], values[..., :idx, :]], axis=2)
    return keys, values, offset - keys.shape[2]


def _ring_index(cache: Any) -> int | None:
    """The write index of a rotating cache that is a full, rotated ring, else None."""
    if type(cache) is not RotatingKVCache:
        return None
    size = cache.keys.shape[2]
    if size == cache.max_size and 0 < cache._idx < size and cache.offset > size:
        return cache._idx
    return None
