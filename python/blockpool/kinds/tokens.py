"""The rules every token kind shares: K and V stored token by token, in blocks.

A token layer's blocks cover logical blocks ``[lo, hi)`` of its history
(``block_range``): a full layer all of them, a layer that forgets older
tokens (a sliding window, an attention chunk) only the last ones. Its first
block may hold valid tokens only from some position on (``valid_from``):
older positions were never written. A prefix can be served only if the
layer still holds every position a cache of that prefix needs.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import Any, ClassVar

import mlx.core as mx

from blockpool.kinds.base import CacheKind, LayerPlan, Source, blocks_for
from blockpool.kinds.geometry import Geometry


class TokenKind(CacheKind):
    """A kind whose layer stores K and V per token (see the module docstring)."""

    storage: ClassVar[str] = "tokens"

    # ------------------------------------------------------------ what the layer keeps

    @abstractmethod
    def first_needed(self, tokens: int) -> int:
        """First position a cache of ``tokens`` tokens must hold."""

    def block_range(self, tokens: int, block_tokens: int) -> tuple[int, int]:
        """Logical blocks ``[lo, hi)`` the layer keeps for ``tokens`` tokens (none when it needs no token)."""
        first, hi = self.first_needed(tokens), blocks_for(tokens, block_tokens)
        return (hi, hi) if first == tokens else (first // block_tokens, hi)

    def blocks_held(self, tokens: int, block_tokens: int) -> int:
        lo, hi = self.block_range(tokens, block_tokens)
        return hi - lo

    @abstractmethod
    def working_tokens(self, total: int, block_tokens: int, prefill_step: int) -> int:
        """Token capacity of the layer's working cache at ``total`` tokens, at its largest."""

    def working_bytes(self, geometry: Any, total: int, block_tokens: int, prefill_step: int) -> int:
        return self.working_tokens(total, block_tokens, prefill_step) * geometry.token_bytes()

    def geometry_of(self, cache: Any) -> Geometry:
        keys, values = cache.keys, cache.values
        return Geometry(keys.shape[1], keys.shape[3], values.shape[3], str(keys.dtype).removeprefix("mlx.core."))

    # ------------------------------------------------------------ histories

    def valid_start(self, agent: Any, layer_id: int) -> int:
        """First position whose tokens the handle's blocks of this layer hold."""
        b = agent.spec.block_tokens
        first = first_block(agent, layer_id) * b
        return max(first, agent.valid_from.get(layer_id, self.first_needed(agent.total_tokens)))

    def check(self, agent: Any, layer_id: int) -> None:
        b, blocks = agent.spec.block_tokens, agent.blocks[layer_id]
        lo, hi = self.block_range(agent.total_tokens, b)
        # A layer may keep older blocks than it needs, never fewer.
        if len(blocks) < hi - lo or len(blocks) > hi:
            raise ValueError(
                f"layer {layer_id} ({self.name}) holds {len(blocks)} blocks; {agent.total_tokens} tokens need {hi - lo}"
            )
        needed = self.first_needed(agent.total_tokens)
        if needed < agent.total_tokens and self.valid_start(agent, layer_id) > needed:
            raise ValueError(f"layer {layer_id} does not hold the tokens from position {needed} on")

    def resume_point(self, history: Any, layer_id: int, tokens: int) -> int:
        return tokens if history.valid_start(layer_id) <= self.first_needed(tokens) else self.needs_nothing_at(tokens)

    def needs_nothing_at(self, tokens: int) -> int:
        """The largest position ``p <= tokens`` at which the layer needs no earlier token (0 for most kinds)."""
        return 0

    def plan(
        self, pool: Any, base: Any, layer_id: int, total: int, pending: Any = (), every: int | None = None
    ) -> LayerPlan:
        b, stored = base.spec.block_tokens, base.total_tokens
        held_hi = blocks_for(stored, b)
        lo, hi = self.block_range(total, b)
        held = list(base.blocks[layer_id])
        first = held_hi - len(held)  # logical index of the first held block
        write_from = max(stored, self.first_needed(total))
        n_drop = max(0, min(lo, held_hi) - first)  # blocks that fell out of what the layer keeps
        kept, dropped = held[n_drop:], held[:n_drop]
        shared = _shared_partial_block(pool, base, layer_id)
        if shared is not None and kept and kept[-1] == shared and write_from < min(total, held_hi * b):
            # A shared block is read-only: a shared, partly filled last block is replaced by a copy.
            kept, write_from = kept[:-1], (held_hi - 1) * b
            dropped.append(shared)
        if lo > held_hi:  # what the layer keeps moved past every held block
            kept = []
        held_from = base.valid_start(layer_id) if stored else 0
        valid_from = max(held_from, lo * b) if write_from <= stored else write_from
        fresh = hi - (lo + len(kept))
        return LayerPlan(layer_id, lo, tuple(kept), tuple(dropped), fresh, write_from, valid_from)

    def truncate(self, agent: Any, layer_id: int, tokens: int) -> tuple[list, list, dict[str, Any]] | None:
        b, held = agent.spec.block_tokens, agent.blocks[layer_id]
        lo, hi = self.block_range(tokens, b)
        first = first_block(agent, layer_id)
        start = self.valid_start(agent, layer_id)
        if self.first_needed(tokens) == tokens:  # it needs no earlier token there (a chunk's start)
            return [], list(held), {"valid_from": tokens}
        if start > self.first_needed(tokens):
            return None
        return (
            held[lo - first : hi - first],
            held[: lo - first] + held[hi - first :],
            {"valid_from": max(start, lo * b)},
        )

    def index_units(self, agent: Any, layer_id: int) -> dict[int, tuple[Any, int]]:
        return self._units(agent, layer_id, agent.total_tokens // agent.spec.block_tokens)

    def partial_units(self, agent: Any, layer_id: int) -> dict[int, tuple[Any, int]]:
        return self._units(agent, layer_id, blocks_for(agent.total_tokens, agent.spec.block_tokens))

    def _units(self, agent: Any, layer_id: int, upto: int) -> dict[int, tuple[Any, int]]:
        # The held blocks before logical block ``upto`` that hold valid tokens, with where they start.
        b = agent.spec.block_tokens
        blocks, first = agent.blocks[layer_id], first_block(agent, layer_id)
        valid = self.valid_start(agent, layer_id)
        return {
            j: (blocks[j - first], max(valid, j * b))
            for j in range(max(first, valid // b), min(upto, first + len(blocks)))
        }

    def lookup_units(
        self, chain: list[dict[int, tuple[Any, int]]], layer_id: int, length: int, block_tokens: int
    ) -> list | None:
        lo, hi = self.block_range(length, block_tokens)
        needed_from = self.first_needed(length)
        picked = [chain[i].get(layer_id) for i in range(lo, hi)]
        if any(p is None or p[1] > max(needed_from, i * block_tokens) for i, p in zip(range(lo, hi), picked)):
            return None
        return [blk for blk, _ in picked]

    # ------------------------------------------------------------ mlx-lm caches

    def empty_at(self, total: int) -> Any:
        """The cache of a ``total``-token history whose layer holds no tokens now (at a chunk's start)."""
        return self.new_cache()

    @abstractmethod
    def room(self, total: int, spare_tokens: int, block_tokens: int) -> int:
        """Spare token capacity a cache rebuilt at ``total`` tokens gets after its data, so that
        the next ``spare_tokens`` are written in place (0 for a cache that grows inside the model)."""

    @abstractmethod
    def rebuild(self, keys: mx.array, values: mx.array, total: int, data_start: int, ring: int | None) -> Any:
        """The mlx-lm cache of a ``total``-token history from gathered K/V.

        ``keys``/``values`` ``[1, H, T, D]`` hold positions ``data_start``
        onwards, followed by any spare room (see :meth:`room`); ``ring`` is
        what :meth:`ring_index` recorded, or None.
        """

    @abstractmethod
    def read(self, cache: Any) -> Source:
        """A one-sequence cache's tokens in time order, and the position of the first."""


def first_block(agent: Any, layer_id: int) -> int:
    """Logical index (token position // block_tokens) of a token layer's first held block."""
    return blocks_for(agent.total_tokens, agent.spec.block_tokens) - len(agent.blocks[layer_id])


def _shared_partial_block(pool: Any, agent: Any, layer_id: int) -> Any:
    """The layer's last block if it is partly filled and shared with another agent."""
    blocks = agent.blocks[layer_id]
    if not blocks or agent.total_tokens % agent.spec.block_tokens == 0:
        return None
    last = blocks[-1]
    return last if pool.refcount(last) > 1 else None
