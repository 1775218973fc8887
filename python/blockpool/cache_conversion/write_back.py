"""Write-back: store what an agent's blocks do not hold yet, or cut a history back.

:func:`extend_blocks` carries out a :func:`~blockpool.cache_conversion.plan_extension`:
it allocates, copies only the new tokens (and, for a recurrent layer, the
state at the history's end) and frees what the plan drops, all or nothing.
:func:`from_mlx_caches` is both steps for mlx-lm caches; :func:`truncate`
cuts a history back to a prefix.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from blockpool.block import AgentBlocks, KVBlock
from blockpool.cache_conversion.planning import LayerPlan, fresh_blocks, plan_extension
from blockpool.pool import BlockPool, BlockWrite


def extend_blocks(
    pool: BlockPool,
    base: AgentBlocks,
    plans: Sequence[LayerPlan],
    sources: Mapping[int, Any],
    token_ids: Sequence[int],
    ring_index: Mapping[int, int] | None = None,
    *,
    force: bool = False,
) -> AgentBlocks:
    """Carry out :func:`plan_extension`: allocate, copy what is new, free what is dropped.

    ``base`` is consumed (its blocks, and any pending snapshots the plans
    keep, move into the returned handle). All or nothing: if allocation or
    a copy fails, nothing is allocated or freed and ``base`` is unchanged.

    Args:
        sources: Per layer, what its cache holds: a token layer's tokens in
            time order ``(keys, values, first position)``, covering its
            ``write_from`` up to ``len(token_ids)``; a state layer's state at
            ``len(token_ids)`` (a list of arrays, one per slot).
        force: Allocate past the budget (the caller frees at least as much
            right after, as a write-back does with its working cache).

    Raises:
        PoolExhaustedError: The new blocks do not fit; nothing changed.
        ValueError: A source does not cover what must be written.
    """
    spec, b, total = base.spec, base.spec.block_tokens, len(token_ids)
    if list(token_ids[: base.total_tokens]) != base.token_ids:
        raise ValueError("token_ids do not extend the tokens the blocks hold")
    cut = [_cut(plan, sources, total) if spec.kind(plan.layer_id).storage == "tokens" else None for plan in plans]
    got = pool.reserve(fresh_blocks(plans), base.agent_id, force=force)
    blocks: dict[int, list[KVBlock]] = {}
    writes, state_writes, release = [], [], []
    valid_from: dict[int, int] = {}
    positions: dict[int, list[int]] = {}
    for plan, source in zip(plans, cut):
        fresh = got.get(plan.layer_id, [])
        blocks[plan.layer_id] = list(plan.kept) + fresh
        release += plan.dropped
        if spec.kind(plan.layer_id).storage == "state":
            positions[plan.layer_id] = list(plan.positions)
            if plan.write_positions:
                state_writes.append((plan.layer_id, fresh, [sources[plan.layer_id]]))
            continue
        valid_from[plan.layer_id] = plan.valid_from
        if source is not None:
            j0 = plan.write_from // b - plan.lo
            writes.append(BlockWrite(plan.layer_id, blocks[plan.layer_id][j0:], *source, offset=plan.write_from % b))
    try:
        pool.write_states(state_writes)  # fresh blocks only: first, so that a failure leaves no old block changed
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
        positions=positions,
    )


def _cut(plan: LayerPlan, sources: Mapping[int, Any], total: int) -> tuple[Any, Any] | None:
    """The part of a token layer's source the plan writes."""
    if plan.write_from >= total:
        return None
    keys, values, start = sources[plan.layer_id]
    if start > plan.write_from or start + keys.shape[2] < total:
        raise ValueError(
            f"layer {plan.layer_id} source covers [{start}, {start + keys.shape[2]}), "
            f"needs [{plan.write_from}, {total})"
        )
    return keys[..., plan.write_from - start : total - start, :], values[
        ..., plan.write_from - start : total - start, :
    ]


def from_mlx_caches(pool: BlockPool, caches: Sequence[Any], token_ids: Sequence[int], base: AgentBlocks) -> AgentBlocks:
    """Store what ``caches`` hold that ``base`` does not yet, and return the new handle.

    ``base`` is consumed: its blocks move into the returned handle, except
    sliding-layer blocks that fell out of the window (and a recurrent
    layer's superseded snapshot), which are freed.

    Args:
        pool: The pool holding ``base``'s blocks.
        caches: The model's mlx-lm caches (one per model layer, as
            ``make_prompt_cache`` makes them), ``len(token_ids)`` tokens long.
        token_ids: Every token the caches hold, history first.
        base: The agent's handle before these tokens (``AgentBlocks.empty`` for a new agent).

    Raises:
        PoolExhaustedError: The new blocks do not fit; nothing was written
            and ``base`` is unchanged.
        ValueError: The caches do not match ``token_ids`` or the model.
    """
    spec, total = base.spec, len(token_ids)
    entries = spec.disassemble(list(caches))
    sources: dict[int, Any] = {}
    ring: dict[int, int] = {}
    for layer_id, cache in enumerate(entries):
        kind = spec.kind(layer_id)
        offset = getattr(cache, "offset", None)
        if offset is not None and offset != total:
            raise ValueError(f"layer {layer_id} cache holds {offset} tokens, expected {total}")
        if total:
            sources[layer_id] = kind.read(cache)
            if (r := kind.ring_index(cache)) is not None:
                ring[layer_id] = r
    plans = plan_extension(pool, base, total)
    return extend_blocks(pool, base, plans, sources, token_ids, ring)


def truncate(pool: BlockPool, agent: AgentBlocks, tokens: int) -> AgentBlocks | None:
    """Cut an agent's cache back to its first ``tokens`` tokens, freeing the blocks past them.

    A token layer keeps the partly used block at the cut (the tokens past
    the cut in it are overwritten by the next extension); a recurrent layer
    keeps its snapshots up to the cut. ``agent`` is consumed.

    Returns:
        The shorter handle, or None (and nothing freed) when a layer cannot
        serve that prefix (see :func:`~blockpool.cache_conversion.resume_point`):
        a sliding layer whose window ending at the cut was dropped, or a
        recurrent layer without a snapshot at the cut.
    """
    if tokens >= agent.total_tokens:
        return agent
    spec = agent.spec
    blocks, drop, valid_from, positions = {}, [], {}, {}
    for layer_id in range(spec.num_layers):
        cut = spec.kind(layer_id).truncate(agent, layer_id, tokens)
        if cut is None:
            return None
        kept, freed, fields = cut
        blocks[layer_id] = kept
        drop += freed
        if "valid_from" in fields:
            valid_from[layer_id] = fields["valid_from"]
        if "positions" in fields:
            positions[layer_id] = fields["positions"]
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
        positions=positions,
    )
