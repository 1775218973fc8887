"""The values the pool hands out: accounting snapshots and write requests."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import mlx.core as mx

from blockpool.block import KVBlock


@dataclass(frozen=True)
class AgentUsage:
    """Blocks and bytes one agent holds (a shared block counts for each holder)."""

    blocks: int
    bytes: int


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool's accounting. Physical totals count a shared block once.

    ``used_bytes`` is everything charged to the budget: ``block_bytes``
    (held and cached-free blocks) plus ``working_bytes`` plus
    ``transient_bytes``. ``used_blocks``/``free_blocks`` express the same
    in blocks of the pool's unit (``total_bytes / total_blocks``).
    """

    total_blocks: int
    free_blocks: int
    used_blocks: int
    shared_blocks: int
    total_bytes: int
    used_bytes: int
    agents: dict[str, AgentUsage]
    block_bytes: int = 0
    working_bytes: int = 0
    transient_bytes: int = 0
    cached_free_blocks: int = 0


@dataclass
class BlockWrite:
    """Tokens to write into one layer's blocks.

    ``keys``/``values`` are ``[1, H, T, D]``; their token 0 lands at position
    ``offset`` of ``blocks[0]``, and later tokens run on through the blocks.
    """

    layer_id: int
    blocks: Sequence[KVBlock]
    keys: mx.array
    values: mx.array
    offset: int = 0
