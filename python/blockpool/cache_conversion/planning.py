"""Planning a history's blocks: pure decisions, each layer's taken by its cache kind.

:func:`plan_extension` says, per layer, which of an agent's blocks stay,
which are dropped, how many new ones follow and what is copied into them,
when its history grows; :func:`resume_point` the longest prefix a history
can resume from exactly. Nothing here allocates, copies or frees: the pool
is only asked which blocks are shared.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from blockpool.block import AgentBlocks
from blockpool.kinds import LayerPlan

__all__ = ["LayerPlan", "can_resume", "fresh_blocks", "plan_extension", "resume_point"]


def plan_extension(
    pool: Any,
    base: AgentBlocks,
    total: int,
    pending: Mapping[int, Sequence[tuple[int, Any]]] | None = None,
    every: int | None = None,
    written: Mapping[int, LayerPlan] | None = None,
) -> list[LayerPlan]:
    """Plan the blocks of ``base`` grown to ``total`` tokens (``total >= base.total_tokens``).

    ``pending``: per state layer, ``(position, block)`` snapshots taken while
    the history grew (the blocks are allocated and written already);
    ``every``: the checkpoint grid in tokens (its snapshots are kept);
    ``written``: the plans of layers whose new tokens are in blocks already
    (a paged request's, :meth:`blockpool.paged.PagedRows.plans`), taken as they are.
    """
    if total < base.total_tokens:
        raise ValueError(f"cannot extend {base.total_tokens} tokens to {total}")
    pending, written = pending or {}, written or {}
    spec = base.spec
    return [
        written[i] if i in written else spec.kind(i).plan(pool, base, i, total, tuple(pending.get(i, ())), every)
        for i in range(spec.num_layers)
    ]


def fresh_blocks(plans: Sequence[LayerPlan]) -> dict[int, int]:
    """New blocks per layer a plan needs."""
    return {p.layer_id: p.fresh for p in plans if p.fresh}


def resume_point(history: AgentBlocks | Any, tokens: int) -> int:
    """The longest prefix of at most ``tokens`` tokens a cache (a handle, or an ``AgentFile``) can resume from.

    Every layer must serve it exactly: a full layer any prefix; a sliding or
    chunked layer one whose needed positions it still holds (once older
    tokens fell out of the window, a shorter prefix cannot be served, as
    mlx-lm's ``RotatingKVCache`` cannot be trimmed once it has wrapped); a
    recurrent layer only a position it has a snapshot of.
    """
    spec = history.spec
    point = tokens
    while point > 0:
        lower = min((spec.kind(i).resume_point(history, i, point) for i in range(spec.num_layers)), default=point)
        if lower == point:
            return point
        point = lower
    return 0


def can_resume(history: AgentBlocks | Any, tokens: int) -> bool:
    """Whether a cache (a handle, or an ``AgentFile``) can serve exactly its first ``tokens`` tokens."""
    return resume_point(history, tokens) == tokens
