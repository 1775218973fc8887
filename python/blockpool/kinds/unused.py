"""A layer whose cache the model never fills (Nemotron-NAS's linear-replaced layers get a ``KVCache`` they never use).

It stores nothing and needs nothing: it resumes from any prefix, and its
cache is rebuilt empty. The spec recognises it after its probe forward
pass: a token cache that stayed empty.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from blockpool.kinds.base import LayerPlan, Source
from blockpool.kinds.geometry import Geometry
from blockpool.kinds.tokens import TokenKind


@dataclass(frozen=True)
class UnusedCache(TokenKind):
    """A ``KVCache`` the model leaves empty."""

    name: ClassVar[str] = "unused"
    label: ClassVar[str] = "unused-cache"

    @classmethod
    def recognise(cls, cache: Any) -> UnusedCache | str | None:
        return None  # only the spec's probe can tell (see the module docstring)

    def geometry_of(self, cache: Any) -> Geometry:
        return Geometry(0, 0, 0, "float32")

    def describe(self) -> dict[str, Any]:
        return {"window": None, "kind": "unused"}

    def keeps(self) -> str:
        return "nothing: the model never fills it"

    def first_needed(self, tokens: int) -> int:
        return tokens

    def block_range(self, tokens: int, block_tokens: int) -> tuple[int, int]:
        return 0, 0

    def max_blocks(self, block_tokens: int) -> int | None:
        return 0

    def working_tokens(self, total: int, block_tokens: int, prefill_step: int) -> int:
        return 0

    def valid_start(self, agent: Any, layer_id: int) -> int:
        return agent.total_tokens

    def check(self, agent: Any, layer_id: int) -> None:
        if agent.blocks[layer_id]:
            raise ValueError(f"layer {layer_id} (unused) holds blocks")

    def resume_point(self, history: Any, layer_id: int, tokens: int) -> int:
        return tokens

    def plan(
        self, pool: Any, base: Any, layer_id: int, total: int, pending: Any = (), every: int | None = None
    ) -> LayerPlan:
        return LayerPlan(layer_id, 0, (), (), 0, total, total)

    def truncate(self, agent: Any, layer_id: int, tokens: int) -> tuple[list, list, dict[str, Any]]:
        return [], [], {"valid_from": tokens}

    def index_units(self, agent: Any, layer_id: int) -> dict[int, tuple[Any, int]]:
        return {}

    def lookup_units(self, chain: Any, layer_id: int, length: int, block_tokens: int) -> list | None:
        return []

    def new_cache(self) -> KVCache:
        return KVCache()

    def room(self, total: int, spare_tokens: int, block_tokens: int) -> int:
        return 0

    def rebuild(self, keys: mx.array, values: mx.array, total: int, data_start: int, ring: int | None) -> KVCache:
        return KVCache()

    def read(self, cache: Any) -> Source:
        return mx.zeros((1, 0, 0, 0)), mx.zeros((1, 0, 0, 0)), 0

    def merge(self, caches: list[Any]) -> BatchKVCache:
        return BatchKVCache([0] * len(caches))

    def read_row(self, cache: Any, index: int) -> tuple[Source, int | None]:
        return self.read(cache), None
