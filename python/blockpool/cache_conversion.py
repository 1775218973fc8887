"""Conversion between an agent's blocks and mlx-lm's per-layer caches.

Reconstruction (:func:`to_mlx_caches`) gathers every layer in one native
call, straight into the cache the model will write into next (with spare
room for the tokens to come). Write-back is two steps: :func:`plan_extension`
decides, from the layers' attention rules alone, which blocks an agent keeps,
drops and needs for a longer history; :func:`extend_blocks` then allocates,
copies only the tokens not stored yet, and frees. :func:`from_mlx_caches`
is both, for mlx-lm caches.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from blockpool.attention import blocks_for
from blockpool.block import AgentBlocks, KVBlock
from blockpool.pool import BlockPool, BlockWrite

Source = tuple[mx.array, mx.array, int]
"""One layer's tokens in time order: keys, values ``[1, H, T, D]`` and the position of token 0."""


def to_mlx_caches(pool: BlockPool, agent: AgentBlocks, spare_tokens: int = 0) -> list[Any]:
    """Rebuild the mlx-lm caches an agent's blocks hold.

    Full-attention layers become a ``KVCache`` of ``offset = total_tokens``
    with room for ``spare_tokens`` more tokens; sliding-window layers a
    ``RotatingKVCache`` holding the last ``window`` tokens, in the physical
    order the original cache had, so that decoding continues exactly as if
    the cache had never left.
    """
    spec, total, b = agent.spec, agent.total_tokens, agent.spec.block_tokens
    spare: dict[int, int] = {}
    for layer_id in range(spec.num_layers):
        if spec.rules(layer_id).window is None:
            spare[layer_id] = blocks_for(total + spare_tokens, b) - len(agent.blocks[layer_id])
    wanted = {layer: blocks for layer, blocks in agent.blocks.items() if blocks or spare.get(layer)}
    data = pool.read(wanted, spare) if total or spare_tokens else {}
    caches: list[Any] = []
    for layer_id in range(spec.num_layers):
        rules = spec.rules(layer_id)
        if layer_id not in data:
            caches.append(rules.new_cache())
            continue
        keys, values = data[layer_id]
        start = agent.first_block(layer_id) * b
        caches.append(rules.rebuild(keys, values, total, start, agent.ring_index.get(layer_id)))
    return caches


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's blocks change when an agent's history grows to ``total`` tokens.

    ``kept`` blocks stay (from logical block ``lo``), ``dropped`` ones are
    freed (out of a sliding window, or a shared partial block replaced by a
    copy), ``fresh`` new blocks follow the kept ones, and tokens from
    ``write_from`` on are copied in. ``valid_from`` is the first position a
    sliding layer's blocks will really hold.
    """

    layer_id: int
    lo: int
    kept: tuple[KVBlock, ...]
    dropped: tuple[KVBlock, ...]
    fresh: int
    write_from: int
    valid_from: int | None


def plan_extension(pool: BlockPool, base: AgentBlocks, total: int) -> list[LayerPlan]:
    """Plan the blocks of ``base`` grown to ``total`` tokens (``total >= base.total_tokens``).

    Pure: the pool is only asked which blocks are shared. A shared block is
    read-only, so a shared partly filled last block is replaced by a copy.
    """
    spec, b, stored = base.spec, base.spec.block_tokens, base.total_tokens
    if total < stored:
        raise ValueError(f"cannot extend {stored} tokens to {total}")
    held_hi = blocks_for(stored, b)
    plans = []
    for layer_id in range(spec.num_layers):
        rules = spec.rules(layer_id)
        lo, hi = rules.block_range(total, b)
        held = list(base.blocks[layer_id])
        first = held_hi - len(held)  # logical index of the first held block
        write_from = max(stored, rules.first_needed(total))
        n_drop = max(0, min(lo, held_hi) - first)  # blocks that fell out of the window
        kept, dropped = held[n_drop:], held[:n_drop]
        shared = _shared_partial_block(pool, base, layer_id)
        if shared is not None and kept and kept[-1] == shared and write_from < min(total, held_hi * b):
            kept, write_from = kept[:-1], (held_hi - 1) * b
            dropped.append(shared)
        if lo > held_hi:  # the window moved past every held block
            kept = []
        valid_from = None
        if rules.window is not None:
            held_from = base.valid_start(layer_id) if stored else 0
            valid_from = max(held_from, lo * b) if write_from <= stored else write_from
        fresh = hi - (lo + len(kept))
        plans.append(LayerPlan(layer_id, lo, tuple(kept), tuple(dropped), fresh, write_from, valid_from))
    return plans


def fresh_blocks(plans: Sequence[LayerPlan]) -> dict[int, int]:
    """New blocks per layer a plan needs."""
    return {p.layer_id: p.fresh for p in plans if p.fresh}


def extend_blocks(
    pool: BlockPool,
    base: AgentBlocks,
    plans: Sequence[LayerPlan],
    sources: Mapping[int, Source],
    token_ids: Sequence[int],
    ring_index: Mapping[int, int] | None = None,
    *,
    force: bool = False,
) -> AgentBlocks:
    """Carry out :func:`plan_extension`: allocate, copy the new tokens, free what is dropped.

    ``base`` is consumed (its blocks move into the returned handle). All or
    nothing: if allocation or the copy fails, nothing is allocated or freed
    and ``base`` is unchanged.

    Args:
        sources: Per layer, its tokens in time order; they must cover the
            layer's ``write_from`` up to ``len(token_ids)``.
        force: Allocate past the budget (the caller frees at least as much
            right after, as a write-back does with its working cache).

    Raises:
        PoolExhaustedError: The new blocks do not fit; nothing changed.
        ValueError: A source does not cover what must be written.
    """
    spec, b, total = base.spec, base.spec.block_tokens, len(token_ids)
    if list(token_ids[: base.total_tokens]) != base.token_ids:
        raise ValueError("token_ids do not extend the tokens the blocks hold")
    cut = []
    for plan in plans:
        if plan.write_from < total:
            keys, values, start = sources[plan.layer_id]
            if start > plan.write_from or start + keys.shape[2] < total:
                raise ValueError(f"layer {plan.layer_id} source covers [{start}, {start + keys.shape[2]}), "
                                 f"needs [{plan.write_from}, {total})")
            cut.append((keys[..., plan.write_from - start : total - start, :], values[..., plan.write_from - start : total - start, :]))
        else:
            cut.append(None)
    got = pool.reserve(fresh_blocks(plans), base.agent_id, force=force)
    blocks: dict[int, list[KVBlock]] = {}
    writes, release = [], []
    valid_from: dict[int, int] = {}
    for plan, source in zip(plans, cut):
        blocks[plan.layer_id] = list(plan.kept) + got.get(plan.layer_id, [])
        release += plan.dropped
        if plan.valid_from is not None:
            valid_from[plan.layer_id] = plan.valid_from
        if source is not None:
            j0 = plan.write_from // b - plan.lo
            writes.append(BlockWrite(plan.layer_id, blocks[plan.layer_id][j0:], *source, offset=plan.write_from % b))
    try:
        pool.write(writes)
    except BaseException:
        if got:
            pool.free([blk for new in got.values() for blk in new], base.agent_id)
        raise
    if release:
        pool.free(release, base.agent_id)
    base.consumed = True
    return AgentBlocks(
        base.agent_id, spec, blocks, total, list(token_ids), dict(ring_index or {}), valid_from,
        pool_id=pool.id, generation=pool.new_handle_generation(base.agent_id),
    )


def from_mlx_caches(pool: BlockPool, caches: Sequence[Any], token_ids: Sequence[int], base: AgentBlocks) -> AgentBlocks:
    """Store the tokens of ``caches`` that ``base`` does not hold yet, and return the new handle.

    ``base`` is consumed: its blocks move into the returned handle, except
    sliding-layer blocks that fell out of the window, which are freed.

    Args:
        pool: The pool holding ``base``'s blocks.
        caches: The model's per-layer mlx-lm caches, ``len(token_ids)`` tokens long.
        token_ids: Every token the caches hold, history first.
        base: The agent's handle before these tokens (``AgentBlocks.empty`` for a new agent).

    Raises:
        PoolExhaustedError: The new blocks do not fit; nothing was written
            and ``base`` is unchanged.
        ValueError: The caches do not match ``token_ids`` or the model.
    """
    spec, total = base.spec, len(token_ids)
    if len(caches) != spec.num_layers:
        raise ValueError(f"{len(caches)} caches for a model of {spec.num_layers} layers")
    sources: dict[int, Source] = {}
    ring: dict[int, int] = {}
    for layer_id, cache in enumerate(caches):
        if cache.offset != total:
            raise ValueError(f"layer {layer_id} cache holds {cache.offset} tokens, expected {total}")
        rules = spec.rules(layer_id)
        if total:
            sources[layer_id] = rules.read(cache)
            if (r := rules.ring_index(cache)) is not None:
                ring[layer_id] = r
    plans = plan_extension(pool, base, total)
    return extend_blocks(pool, base, plans, sources, token_ids, ring)


def truncate(pool: BlockPool, agent: AgentBlocks, tokens: int) -> AgentBlocks | None:
    """Cut an agent's cache back to its first ``tokens`` tokens, freeing whole blocks past them.

    The partly used block at the cut is kept; the tokens past the cut in it
    are overwritten by the next extension. ``agent`` is consumed.

    Returns:
        The shorter handle, or None (and nothing freed) when a sliding
        layer does not hold the window that ends at the cut (its older
        tokens were dropped or never stored), so the cache cannot serve
        that prefix; as with mlx-lm's ``RotatingKVCache``, which cannot be
        trimmed once it has wrapped.
    """
    if tokens >= agent.total_tokens:
        return agent
    spec, b = agent.spec, agent.spec.block_tokens
    blocks, drop, valid_from = {}, [], {}
    for layer_id, held in agent.blocks.items():
        rules = spec.rules(layer_id)
        lo, hi = rules.block_range(tokens, b)
        first = agent.first_block(layer_id)
        if rules.window is not None:
            if agent.valid_start(layer_id) > rules.first_needed(tokens):
                return None
            valid_from[layer_id] = max(agent.valid_start(layer_id), lo * b)
        blocks[layer_id] = held[lo - first : hi - first]
        drop += held[: lo - first] + held[hi - first :]
    if drop:
        pool.free(drop, agent.agent_id)
    agent.consumed = True
    return AgentBlocks(
        agent.agent_id, spec, blocks, tokens, agent.token_ids[:tokens], valid_from=valid_from,
        pool_id=pool.id, generation=pool.new_handle_generation(agent.agent_id),
    )


def can_resume(history: AgentBlocks | Any, tokens: int) -> bool:
    """Whether a cache (a handle, or an ``AgentFile``) can serve its first ``tokens`` tokens.

    Full layers always can. A sliding layer can only if it still holds the
    window that ends there: once older tokens fell out of the window (or were
    never stored), a shorter prefix cannot be served, as with mlx-lm's
    ``RotatingKVCache``, which cannot be trimmed once it has wrapped.
    """
    spec = history.spec
    for layer_id in range(spec.num_layers):
        rules = spec.rules(layer_id)
        if rules.window is None:
            continue
        held_from = history.valid_start(layer_id) if isinstance(history, AgentBlocks) else history.first_token[layer_id]
        if held_from > rules.first_needed(tokens):
            return False
    return True


def _shared_partial_block(pool: BlockPool, agent: AgentBlocks, layer_id: int) -> KVBlock | None:
    """The layer's last block if it is partly filled and shared with another agent."""
    blocks = agent.blocks[layer_id]
    if not blocks or agent.total_tokens % agent.spec.block_tokens == 0:
        return None
    last = blocks[-1]
    return last if pool.refcount(last) > 1 else None


def file_to_mlx_caches(file: Any, keep: int, spare_tokens: int = 0) -> list[Any]:
    """The mlx-lm caches of the first ``keep`` tokens of an agent file (``blockpool.persistence.AgentFile``).

    The file's arrays go straight into the caches (dequantized if the file
    is quantized): one copy, the same as a resume from the pool. Full layers
    get room for ``spare_tokens`` more tokens. The caller checks
    :func:`can_resume` first.
    """
    spec, b = file.spec, file.spec.block_tokens
    caches: list[Any] = []
    for layer_id in range(spec.num_layers):
        rules = spec.rules(layer_id)
        if keep == 0:
            caches.append(rules.new_cache())
            continue
        planes = {name: plane.array() if hasattr(plane, "array") else plane for name, plane in file.planes[layer_id].items()}
        first = file.first_token[layer_id]
        if file.kv_bits:
            keys, values = (
                mx.dequantize(planes[n], planes[f"{n}_scales"], planes[f"{n}_biases"], group_size=file.kv_group_size, bits=file.kv_bits)
                for n in ("k", "v")
            )
        else:
            keys, values = planes["k"], planes["v"]
        keys, values = keys[..., : keep - first, :], values[..., : keep - first, :]
        if rules.window is None:
            room = blocks_for(keep + spare_tokens, b) * b - keep
            _, heads, _, _ = keys.shape
            keys = mx.concatenate([keys, mx.zeros((1, heads, room, keys.shape[3]), keys.dtype)], axis=2)
            values = mx.concatenate([values, mx.zeros((1, heads, room, values.shape[3]), values.dtype)], axis=2)
        ring = file.ring_index.get(layer_id) if keep == len(file.token_ids) else None
        caches.append(rules.rebuild(keys, values, keep, first, ring))
    mx.eval([c.state[:2] for c in caches if c.keys is not None])
    return caches
