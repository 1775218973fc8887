"""Recurrent state (Mamba, gated delta nets, RWKV, ...): fixed-size arrays per sequence, in mlx-lm's ``ArraysCache``.

A recurrent layer has no per-token history to gather: its state after
position ``p`` is all a continuation needs, and it can resume only from a
position where that state was kept. So the layer's blocks are *snapshots*:
each holds the state after one position (``AgentBlocks.positions``), in
the model's dtype (the pool's quantization is for K and V only).

An agent keeps, per recurrent layer:

- the state at its last token (the *tail*), so that a returning agent
  resumes exactly where its last turn ended;
- *checkpoints* the engine took while prefilling, on the block grid every
  ``checkpoint_every`` tokens and where a prompt ended, so that a prompt
  that diverges from the history (or a shared prefix) resumes from the last
  checkpoint at or before the divergence and recomputes only the rest;
- the tail of its previous turn.

When the history grows, the grid checkpoints stay; other older snapshots
are dropped. A snapshot is a copy of the live arrays (mlx-lm's
``ArraysCache.state`` is the live, mutable list): it is never aliased. A
grid checkpoint is indexed, and shared, with the block that ends at its
position.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from blockpool.kinds.base import CacheKind, LayerPlan
from blockpool.kinds.geometry import StateGeometry

State = list[mx.array | None]
"""One sequence's state: per slot of the ``ArraysCache``, an array without the batch axis (or None)."""


@dataclass(frozen=True)
class RecurrentState(CacheKind):
    """A layer whose cache is an ``ArraysCache`` of ``slots`` arrays."""

    slots: int
    name: ClassVar[str] = "recurrent"
    label: ClassVar[str] = "recurrent-state"
    storage: ClassVar[str] = "state"

    @classmethod
    def recognise(cls, cache: Any) -> RecurrentState | str | None:
        return cls(len(cache.cache)) if type(cache) is ArraysCache else None

    def geometry_of(self, cache: Any) -> StateGeometry:
        shapes = tuple(None if a is None else tuple(a.shape[1:]) for a in cache.cache)
        dtypes = tuple(None if a is None else str(a.dtype).removeprefix("mlx.core.") for a in cache.cache)
        return StateGeometry(shapes, dtypes)

    def describe(self) -> dict[str, Any]:
        return {"kind": "recurrent", "slots": self.slots}

    def keeps(self) -> str:
        return f"snapshots of its {self.slots}-slot state: at the last token, on the checkpoint grid, where prompts end"

    # ------------------------------------------------------------ sizes

    def blocks_held(self, tokens: int, block_tokens: int) -> int:
        return 1 if tokens else 0

    def max_blocks(self, block_tokens: int) -> int | None:
        return None

    def working_bytes(self, geometry: Any, total: int, block_tokens: int, prefill_step: int) -> int:
        return 2 * geometry.bytes_per_block()  # the state, and the next one while a step computes it

    # ------------------------------------------------------------ histories

    def check(self, agent: Any, layer_id: int) -> None:
        blocks, positions = agent.blocks[layer_id], agent.positions.get(layer_id, [])
        if len(positions) != len(blocks):
            raise ValueError(
                f"layer {layer_id} ({self.name}) has {len(blocks)} snapshots at {len(positions)} positions"
            )
        if any(b <= a for a, b in zip(positions, positions[1:])) or any(
            p < 1 or p > agent.total_tokens for p in positions
        ):
            raise ValueError(f"layer {layer_id} snapshot positions {positions} are not increasing within the history")
        if agent.total_tokens and (not positions or positions[-1] != agent.total_tokens):
            raise ValueError(f"layer {layer_id} has no snapshot at its last token ({agent.total_tokens})")

    def resume_point(self, history: Any, layer_id: int, tokens: int) -> int:
        return max((p for p in history.positions.get(layer_id, []) if p <= tokens), default=0)

    def plan(
        self, pool: Any, base: Any, layer_id: int, total: int, pending: Any = (), every: int | None = None
    ) -> LayerPlan:
        stored = base.total_tokens
        kept, dropped = [], []
        for p, block in zip(base.positions.get(layer_id, []), base.blocks[layer_id]):
            # The grid stays; of the rest only the last tail (the end of the turn before) does.
            (kept if (every and p % every == 0) or p == stored else dropped).append((p, block))
        kept += [(p, block) for p, block in pending if p not in {q for q, _ in kept}]
        kept.sort(key=lambda pair: pair[0])
        write = () if total in {p for p, _ in kept} or not total else (total,)
        positions = tuple(p for p, _ in kept) + write
        return LayerPlan(
            layer_id, 0, tuple(b for _, b in kept), tuple(b for _, b in dropped), len(write), total, 0, positions, write
        )

    def truncate(self, agent: Any, layer_id: int, tokens: int) -> tuple[list, list, dict[str, Any]] | None:
        pairs = list(zip(agent.positions.get(layer_id, []), agent.blocks[layer_id]))
        if tokens and tokens not in {p for p, _ in pairs}:
            return None
        kept = [(p, b) for p, b in pairs if p <= tokens]
        freed = [b for p, b in pairs if p > tokens]
        return [b for _, b in kept], freed, {"positions": [p for p, _ in kept]}

    def index_units(self, agent: Any, layer_id: int) -> dict[int, tuple[Any, int]]:
        b = agent.spec.block_tokens
        return {
            p // b - 1: (block, p)
            for p, block in zip(agent.positions.get(layer_id, []), agent.blocks[layer_id])
            if p % b == 0
        }

    def lookup_units(
        self, chain: list[dict[int, tuple[Any, int]]], layer_id: int, length: int, block_tokens: int
    ) -> list | None:
        found = chain[length // block_tokens - 1].get(layer_id)
        return None if found is None or found[1] != length else [found[0]]

    # ------------------------------------------------------------ mlx-lm caches

    def new_cache(self) -> ArraysCache:
        return ArraysCache(self.slots)

    def rebuild(self, state: State) -> ArraysCache:
        """The cache of one sequence holding ``state`` (new array objects: the pool's are never aliased)."""
        cache = ArraysCache(self.slots)
        cache.cache = [None if a is None else a[None] for a in state]
        return cache

    def read(self, cache: Any) -> State:
        """A copy of a one-sequence cache's state."""
        return [None if a is None else mx.array(a[0]) for a in cache.cache]

    def merge(self, caches: list[Any]) -> ArraysCache:
        return ArraysCache.merge(caches)

    def read_row(self, cache: Any, index: int) -> tuple[State, int | None]:
        return [None if a is None else mx.array(a[index]) for a in cache.cache], None
