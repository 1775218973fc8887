"""Full attention: a layer that attends to every earlier token and keeps them all.

mlx-lm keeps it in a ``KVCache`` (``BatchKVCache`` in a batch) whose
capacity grows in steps of 256 tokens: a rebuilt cache gets that spare
room after its data, and the engine grows it one layer at a time, outside
the model call, to the shape mlx-lm's own update would make.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache, KVCache

from blockpool.kinds.base import Source, blocks_for
from blockpool.kinds.tokens import TokenKind

#: Tokens a full cache grows by when it is full (mlx-lm's ``KVCache.step``).
STEP = KVCache.step


@dataclass(frozen=True)
class FullAttention(TokenKind):
    """Every token is kept; the layer's blocks cover ``[0, tokens)``."""

    name: ClassVar[str] = "full"
    label: ClassVar[str] = "full-attention"

    @classmethod
    def recognise(cls, cache: Any) -> FullAttention | str | None:
        """The kind of a live mlx-lm cache, if it is this kind's (exact type: subclasses change the semantics)."""
        return cls() if type(cache) is KVCache else None

    def first_needed(self, tokens: int) -> int:
        return 0

    def max_blocks(self, block_tokens: int) -> int | None:
        return None

    def keeps(self) -> str:
        return "every token's K and V"

    def chain_required(self) -> bool:
        return True

    def cache_tokens(self, tokens: int) -> int:
        return tokens

    def working_tokens(self, total: int, block_tokens: int, prefill_step: int) -> int:
        return blocks_for(total + 1, block_tokens) * block_tokens  # room for the next token, in whole steps

    def new_cache(self) -> KVCache:
        return KVCache()

    def room(self, total: int, spare_tokens: int, block_tokens: int) -> int:
        return blocks_for(total + spare_tokens, block_tokens) * block_tokens - total

    def rebuild(self, keys: mx.array, values: mx.array, total: int, data_start: int, ring: int | None) -> KVCache:
        # The cache keeps the spare capacity after its data, so later tokens are written in place.
        cache = KVCache()
        cache.state = (keys, values, total)
        return cache

    def read(self, cache: Any) -> Source:
        keys, values, offset = cache.state
        return keys[..., :offset, :], values[..., :offset, :], 0

    def merge(self, caches: list[Any]) -> BatchKVCache:
        return BatchKVCache.merge(caches)

    def as_batch(self, cache: Any) -> BatchKVCache:
        # No copy: the one row's arrays become the batch's.
        keys, values, offset = cache.state
        batch = BatchKVCache([0])
        batch.state = (keys, values, mx.array([offset]), mx.array([0]), offset)
        return batch

    def read_row(self, cache: Any, index: int) -> tuple[Source, int | None]:
        keys, values, _, left_padding, end = cache.state
        pad = int(left_padding[index].item())
        return (keys[index : index + 1, :, pad:end, :], values[index : index + 1, :, pad:end, :], 0), None

    def growth_tokens(self, cache: Any) -> int:
        keys, end = _data_end(cache)
        return STEP if keys is None or end + 1 > keys.shape[2] else 0

    def grow(self, cache: Any, tokens: int = 1) -> None:
        keys, end = _data_end(cache)
        if keys is None or end + tokens <= keys.shape[2]:
            return
        state = list(cache.state)
        keys, values = state[0], state[1]
        if end % STEP:  # as mlx-lm's update: cut to the data, then add whole steps
            keys, values = keys[..., :end, :], values[..., :end, :]
        batch, heads, _, k_dim = keys.shape
        extra = -(-tokens // STEP) * STEP
        keys = mx.concatenate([keys, mx.zeros((batch, heads, extra, k_dim), keys.dtype)], axis=2)
        values = mx.concatenate([values, mx.zeros((batch, heads, extra, values.shape[3]), values.dtype)], axis=2)
        mx.eval(keys, values)
        state[0], state[1] = keys, values
        cache.state = tuple(state)

    def describe(self) -> dict[str, Any]:
        return {"window": None}


def _data_end(cache: Any) -> tuple[mx.array | None, int]:
    """A full cache's keys and the end of its data (plain: its offset; batch: its write index)."""
    state = cache.state
    return state[0], state[2] if isinstance(cache, KVCache) else state[4]
