"""Write-back: store the tokens an agent's blocks do not hold yet, or cut a history back.

:func:`extend_blocks` carries out a :func:`~blockpool.cache_conversion.plan_extension`:
it allocates, copies only the new tokens and frees what the plan drops, all
or nothing. :func:`from_mlx_caches` is both steps for mlx-lm caches;
:func:`truncate` cuts a history back to a prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from blockpool.block import AgentBlocks, KVBlock
from blockpool.cache_conversion.planning import LayerPlan, fresh_blocks, plan_extension
from blockpool.kinds import Source
from blockpool.pool import BlockPool, BlockWrite


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
                raise ValueError(
                    f"layer {plan.layer_id} source covers [{start}, {start + keys.shape[2]}), "
                    f"needs [{plan.write_from}, {total})"
                )
            cut.append(
                (
                    keys[..., plan.write_from - start : total - start, :],
                    values[..., plan.write_from - start : total - start, :],
                )
            )
        else:
            cut.append(None)
    got = pool.reserve(fresh_blocks(plans), base.agent_id, force=force)
    blocks: dict[int, list[KVBlock]] = {}
    writes, release = [], []
    valid_from: dict[int, int] = {}
    for plan, source in zip(plans, cut):
        blocks[plan.layer_id] = list(plan.kept) + got.get(plan.layer_id, [])
        release += plan.dropped
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
        base.agent_id,
        spec,
        blocks,
        total,
        list(token_ids),
        dict(ring_index or {}),
        valid_from,
        pool_id=pool.id,
        generation=pool.new_handle_generation(base.agent_id),
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
        kind = spec.kind(layer_id)
        if total:
            sources[layer_id] = kind.read(cache)
            if (r := kind.ring_index(cache)) is not None:
                ring[layer_id] = r
    plans = plan_extension(pool, base, total)
    return extend_blocks(pool, base, plans, sources, token_ids, ring)


def truncate(pool: BlockPool, agent: AgentBlocks, tokens: int) -> AgentBlocks | None:
    """Cut an agent's cache back to its first ``tokens`` tokens, freeing whole blocks past them.

    The partly used block at the cut is kept; the tokens past the cut in it
    are overwritten by the next extension. ``agent`` is consumed.

    Returns:
        The shorter handle, or None (and nothing freed) when a layer does
        not hold what a cache cut there needs: a sliding layer whose window
        ending at the cut was dropped or never stored cannot serve that
        prefix, as mlx-lm's ``RotatingKVCache`` cannot be trimmed once it
        has wrapped.
    """
    if tokens >= agent.total_tokens:
        return agent
    spec, b = agent.spec, agent.spec.block_tokens
    blocks, drop, valid_from = {}, [], {}
    for layer_id, held in agent.blocks.items():
        kind = spec.kind(layer_id)
        lo, hi = kind.block_range(tokens, b)
        first = agent.first_block(layer_id)
        if agent.valid_start(layer_id) > kind.first_needed(tokens):
            return None
        valid_from[layer_id] = max(agent.valid_start(layer_id), lo * b)
        blocks[layer_id] = held[lo - first : hi - first]
        drop += held[: lo - first] + held[hi - first :]
    if drop:
        pool.free(drop, agent.agent_id)
    agent.consumed = True
    return AgentBlocks(
        agent.agent_id,
        spec,
        blocks,
        tokens,
        agent.token_ids[:tokens],
        valid_from=valid_from,
        pool_id=pool.id,
        generation=pool.new_handle_generation(agent.agent_id),
    )
