"""Chunked attention (Llama 4): a layer whose tokens attend only within their chunk of ``chunk`` positions.

mlx-lm keeps it in a ``ChunkedKVCache``: at the start of each forward pass
it trims itself to the last ``chunk`` tokens, and the model masks keys
outside the query's chunk. The next token's chunk starts at
``(tokens // chunk) * chunk``, so that is all the layer keeps: the blocks
from there on. A cache rebuilt from them (``start_position`` at the chunk's
start) gives the same attention as mlx-lm's own: the positions it leaves
out are the ones the mask hides.

mlx-lm cannot batch it (``ChunkedKVCache`` has no ``merge``, and Llama 4's
mask uses one offset for the whole batch), so a model with chunked layers
decodes one sequence at a time.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
from mlx_lm.models.cache import ChunkedKVCache

from blockpool.kinds.base import Source, blocks_for
from blockpool.kinds.tokens import TokenKind


@dataclass(frozen=True)
class ChunkedAttention(TokenKind):
    """Only the current chunk's tokens are kept."""

    chunk: int
    name: ClassVar[str] = "chunked"
    label: ClassVar[str] = "chunked-attention"
    batchable: ClassVar[bool] = False

    @classmethod
    def recognise(cls, cache: Any) -> ChunkedAttention | str | None:
        return cls(cache.chunk_size) if type(cache) is ChunkedKVCache else None

    def first_needed(self, tokens: int) -> int:
        return (tokens // self.chunk) * self.chunk

    def needs_nothing_at(self, tokens: int) -> int:
        return self.first_needed(tokens)  # a chunk's start: the last one at or before ``tokens``

    def keeps(self) -> str:
        return f"K and V of the current chunk of {self.chunk} tokens"

    def max_blocks(self, block_tokens: int) -> int | None:
        return blocks_for(self.chunk, block_tokens) + 1

    def working_tokens(self, total: int, block_tokens: int, prefill_step: int) -> int:
        # The last chunk, a step of growth, and a prefill chunk while it prefills (it trims only between calls).
        return min(total, self.chunk) + block_tokens + min(prefill_step, total)

    def new_cache(self) -> ChunkedKVCache:
        return ChunkedKVCache(self.chunk)

    def empty_at(self, total: int) -> ChunkedKVCache:
        cache = ChunkedKVCache(self.chunk)
        cache.state = (None, None, total, self.chunk, total)
        return cache

    def room(self, total: int, spare_tokens: int, block_tokens: int) -> int:
        return 0  # it grows by concatenation inside the model call, and trims itself

    def rebuild(
        self, keys: mx.array, values: mx.array, total: int, data_start: int, ring: int | None
    ) -> ChunkedKVCache:
        start = self.first_needed(total)
        cache = ChunkedKVCache(self.chunk)
        if total > start:
            keys, values = (
                keys[..., start - data_start : total - data_start, :],
                values[..., start - data_start : total - data_start, :],
            )
            cache.state = (keys, values, total, self.chunk, start)
        else:
            cache.state = (None, None, total, self.chunk, start)
        return cache

    def read(self, cache: Any) -> Source:
        keys, values, offset, _, start = cache.state
        if keys is None:
            return mx.zeros((1, 1, 0, 1)), mx.zeros((1, 1, 0, 1)), offset
        return keys[..., : offset - start, :], values[..., : offset - start, :], start

    def merge(self, caches: list[Any]) -> Any:
        raise TypeError(
            "mlx-lm cannot batch ChunkedKVCache: a model with chunked layers decodes one sequence at a time"
        )

    def as_batch(self, cache: Any) -> Any:
        return cache  # one sequence: the batch is the cache itself

    def read_row(self, cache: Any, index: int) -> tuple[Source, int | None]:
        return self.read(cache), None

    def growth_tokens(self, cache: Any) -> int:
        keys, _, offset, _, start = cache.state
        if keys is None or offset - start + 1 > keys.shape[2]:
            return ChunkedKVCache.step
        return 0

    def describe(self) -> dict[str, Any]:
        return {"window": None, "kind": "chunked", "chunk": self.chunk}
