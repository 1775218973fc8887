"""Planning a history's blocks: pure decisions, taken from each layer's cache kind.

:func:`plan_extension` says, per layer, which of an agent's blocks stay,
which are dropped, how many new ones follow and from which position tokens
must be copied in, when its history grows; :func:`can_resume` whether a
cache can serve a prefix of its history. Nothing here allocates, copies or
frees: the pool is only asked which blocks are shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from blockpool.block import AgentBlocks, KVBlock
from blockpool.kinds import blocks_for


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's blocks change when an agent's history grows to ``total`` tokens.

    ``kept`` blocks stay (from logical block ``lo``), ``dropped`` ones are
    freed (out of a sliding window, or a shared partial block replaced by a
    copy), ``fresh`` new blocks follow the kept ones, and tokens from
    ``write_from`` on are copied in. ``valid_from`` is the first position
    the layer's blocks will really hold.
    """

    layer_id: int
    lo: int
    kept: tuple[KVBlock, ...]
    dropped: tuple[KVBlock, ...]
    fresh: int
    write_from: int
    valid_from: int


def plan_extension(pool: Any, base: AgentBlocks, total: int) -> list[LayerPlan]:
    """Plan the blocks of ``base`` grown to ``total`` tokens (``total >= base.total_tokens``).

    A shared block is read-only, so a shared, partly filled last block is
    replaced by a copy.
    """
    spec, b, stored = base.spec, base.spec.block_tokens, base.total_tokens
    if total < stored:
        raise ValueError(f"cannot extend {stored} tokens to {total}")
    held_hi = blocks_for(stored, b)
    plans = []
    for layer_id in range(spec.num_layers):
        kind = spec.kind(layer_id)
        lo, hi = kind.block_range(total, b)
        held = list(base.blocks[layer_id])
        first = held_hi - len(held)  # logical index of the first held block
        write_from = max(stored, kind.first_needed(total))
        n_drop = max(0, min(lo, held_hi) - first)  # blocks that fell out of what the layer keeps
        kept, dropped = held[n_drop:], held[:n_drop]
        shared = _shared_partial_block(pool, base, layer_id)
        if shared is not None and kept and kept[-1] == shared and write_from < min(total, held_hi * b):
            kept, write_from = kept[:-1], (held_hi - 1) * b
            dropped.append(shared)
        if lo > held_hi:  # what the layer keeps moved past every held block
            kept = []
        held_from = base.valid_start(layer_id) if stored else 0
        valid_from = max(held_from, lo * b) if write_from <= stored else write_from
        fresh = hi - (lo + len(kept))
        plans.append(LayerPlan(layer_id, lo, tuple(kept), tuple(dropped), fresh, write_from, valid_from))
    return plans


def fresh_blocks(plans: Sequence[LayerPlan]) -> dict[int, int]:
    """New blocks per layer a plan needs."""
    return {p.layer_id: p.fresh for p in plans if p.fresh}


def can_resume(history: AgentBlocks | Any, tokens: int) -> bool:
    """Whether a cache (a handle, or an ``AgentFile``) can serve its first ``tokens`` tokens.

    Every layer must still hold the positions a ``tokens``-token cache
    needs: a sliding layer whose older tokens fell out of the window (or
    were never stored) cannot serve a shorter prefix, as with mlx-lm's
    ``RotatingKVCache``, which cannot be trimmed once it has wrapped.
    """
    spec = history.spec
    for layer_id in range(spec.num_layers):
        held_from = history.valid_start(layer_id) if isinstance(history, AgentBlocks) else history.first_token[layer_id]
        if held_from > spec.kind(layer_id).first_needed(tokens):
            return False
    return True


def _shared_partial_block(pool: Any, agent: AgentBlocks, layer_id: int) -> KVBlock | None:
    """The layer's last block if it is partly filled and shared with another agent."""
    blocks = agent.blocks[layer_id]
    if not blocks or agent.total_tokens % agent.spec.block_tokens == 0:
        return None
    last = blocks[-1]
    return last if pool.refcount(last) > 1 else None
