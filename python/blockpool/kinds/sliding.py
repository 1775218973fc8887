"""Sliding-window attention: a layer that attends to the last ``window`` tokens only.

mlx-lm keeps it in a ``RotatingKVCache`` (``BatchRotatingKVCache`` in a
batch) that, once full, is a ring written in place. Its physical order
matters for exact decoding, so it is recorded (:meth:`SlidingWindow.ring_index`)
and restored when the cache is rebuilt. Older tokens fall out of the
window, so the layer keeps only the blocks covering its last ``window``
tokens, and a block may hold valid tokens only from some position on.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx
from mlx_lm.models.cache import BatchRotatingKVCache, RotatingKVCache

from blockpool.kinds.base import Source, blocks_for
from blockpool.kinds.tokens import TokenKind


@dataclass(frozen=True)
class SlidingWindow(TokenKind):
    """The last ``window`` tokens are kept."""

    window: int
    name: ClassVar[str] = "sliding"
    label: ClassVar[str] = "sliding-window"

    @classmethod
    def recognise(cls, cache: Any) -> SlidingWindow | str | None:
        """The kind of a live mlx-lm cache if it is this kind's; a reason when it is a variant
        that cannot be stored (kept tokens at the start of the ring)."""
        if type(cache) is not RotatingKVCache:
            return None
        return cls(cache.max_size) if cache.keep == 0 else f"RotatingKVCache with keep={cache.keep}"

    def first_needed(self, tokens: int) -> int:
        return max(0, tokens - self.window)

    def keeps(self) -> str:
        return f"K and V of the last {self.window} tokens"

    def max_blocks(self, block_tokens: int) -> int | None:
        # A window that starts mid-block straddles one more block than it fills.
        return blocks_for(self.window, block_tokens) + 1

    def cache_tokens(self, tokens: int) -> int:
        return min(tokens, self.window)

    def working_tokens(self, total: int, block_tokens: int, prefill_step: int) -> int:
        # The window, a step of growth, and a prefill chunk while it prefills.
        return self.window + block_tokens + min(prefill_step, total)

    def new_cache(self) -> RotatingKVCache:
        return RotatingKVCache(max_size=self.window, keep=0)

    def room(self, total: int, spare_tokens: int, block_tokens: int) -> int:
        return 0  # a rotating cache grows inside the model call, bounded by its window

    def rebuild(
        self, keys: mx.array, values: mx.array, total: int, data_start: int, ring: int | None
    ) -> RotatingKVCache:
        n = min(total, self.window)
        start = total - n - data_start
        keys, values = keys[..., start : start + n, :], values[..., start : start + n, :]
        if ring is not None:  # restore the ring's physical order
            keys, values = mx.roll(keys, ring, axis=2), mx.roll(values, ring, axis=2)
        cache = RotatingKVCache(max_size=self.window, keep=0)
        cache.state = (keys, values, total, 0, self.window, n if ring is None else ring)
        return cache

    def read(self, cache: Any) -> Source:
        keys, values, offset, _, _, idx = cache.state
        size = keys.shape[2]
        if idx == size or idx >= offset:
            keys, values = keys[..., :idx, :], values[..., :idx, :]
        else:  # a full ring: the oldest token sits at the write index
            keys = mx.concatenate([keys[..., idx:, :], keys[..., :idx, :]], axis=2)
            values = mx.concatenate([values[..., idx:, :], values[..., :idx, :]], axis=2)
        return keys, values, offset - keys.shape[2]

    def ring_index(self, cache: Any) -> int | None:
        keys, _, offset, _, max_size, idx = cache.state
        size = keys.shape[2]
        if size == max_size and 0 < idx < size and offset > size:
            return idx
        return None

    def check_ring_index(self, value: Any, total: int) -> None:
        # As mlx-lm's RotatingKVCache: a rotated ring only exists once the window is full.
        if type(value) is not int or not 0 < value < self.window or total <= self.window:
            raise ValueError(f"ring index {value!r} is out of range for window {self.window} and {total} tokens")

    def merge(self, caches: list[Any]) -> BatchRotatingKVCache:
        return BatchRotatingKVCache.merge(caches)

    def read_row(self, cache: Any, index: int) -> tuple[Source, int | None]:
        plain = cache.extract(index)
        return self.read(plain), self.ring_index(plain)

    def growth_tokens(self, cache: Any) -> int:
        state = cache.state
        keys, max_size = state[0], state[4]
        offset = state[2] if isinstance(cache, RotatingKVCache) else state[5]
        if keys is None or (offset >= keys.shape[2] and keys.shape[2] < max_size):
            return min(RotatingKVCache.step, max_size - offset)
        return 0

    def describe(self) -> dict[str, Any]:
        return {"window": self.window}
