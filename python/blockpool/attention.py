"""The rules of each attention type, in one place.

A layer's rules say which token positions its cache must keep, which
logical blocks hold them, how its mlx-lm cache is rebuilt from gathered
blocks, and how that cache's tokens are read back in time order. There is
one class per attention type, as vLLM v1 has one manager per type:
:class:`FullAttention` keeps every token, :class:`SlidingWindow` only the
last ``window``. Everything else (block handles, conversion, the prefix
index, persistence, the engine) asks a layer's rules, so the window
arithmetic lives here and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache


def blocks_for(tokens: int, block_tokens: int) -> int:
    """Blocks needed to hold positions ``[0, tokens)``."""
    return -(-tokens // block_tokens)


@dataclass(frozen=True)
class FullAttention:
    """A layer that attends to every earlier token: it keeps them all."""

    window = None
    name = "full"

    def first_needed(self, tokens: int) -> int:
        """First position a cache of ``tokens`` tokens must hold."""
        return 0

    def block_range(self, tokens: int, block_tokens: int) -> tuple[int, int]:
        """Logical blocks ``[lo, hi)`` kept for ``tokens`` tokens."""
        return 0, blocks_for(tokens, block_tokens)

    def max_blocks(self, block_tokens: int) -> int | None:
        """Most blocks the layer ever holds (None: unbounded)."""
        return None

    def cache_tokens(self, tokens: int) -> int:
        """Tokens mlx-lm's cache of this layer holds after ``tokens`` tokens."""
        return tokens

    def new_cache(self) -> KVCache:
        """An empty mlx-lm cache of this type."""
        return KVCache()

    def rebuild(self, keys: mx.array, values: mx.array, total: int, data_start: int, ring: int | None) -> KVCache:
        """The mlx-lm cache of a ``total``-token history from gathered K/V.

        ``keys``/``values`` hold positions ``data_start`` onwards (0 here),
        possibly followed by spare capacity: the cache keeps it, so that
        later tokens are written in place rather than by a reallocation.
        """
        cache = KVCache()
        cache.state = (keys, values, total)
        return cache

    def read(self, cache: Any) -> tuple[mx.array, mx.array, int]:
        """The cache's tokens in time order, and the position of the first one."""
        keys, values, offset = cache.state
        return keys[..., :offset, :], values[..., :offset, :], 0

    def ring_index(self, cache: Any) -> int | None:
        """Write index of a rotated ring (sliding layers only)."""
        return None


@dataclass(frozen=True)
class SlidingWindow:
    """A layer that attends to the last ``window`` tokens only: older ones are dropped.

    mlx-lm keeps such a layer in a ``RotatingKVCache`` that, once full,
    is a ring written in place; its physical order matters for exact
    decoding, so it is recorded (``ring_index``) and restored.
    """

    window: int
    name = "sliding"

    def first_needed(self, tokens: int) -> int:
        return max(0, tokens - self.window)

    def block_range(self, tokens: int, block_tokens: int) -> tuple[int, int]:
        return self.first_needed(tokens) // block_tokens, blocks_for(tokens, block_tokens)

    def max_blocks(self, block_tokens: int) -> int | None:
        # A window that starts mid-block straddles one more block than it fills.
        return blocks_for(self.window, block_tokens) + 1

    def cache_tokens(self, tokens: int) -> int:
        return min(tokens, self.window)

    def new_cache(self) -> RotatingKVCache:
        return RotatingKVCache(max_size=self.window, keep=0)

    def rebuild(self, keys: mx.array, values: mx.array, total: int, data_start: int, ring: int | None) -> RotatingKVCache:
        n = min(total, self.window)
        start = total - n - data_start
        keys, values = keys[..., start : start + n, :], values[..., start : start + n, :]
        if ring is not None:  # restore the ring's physical order
            keys, values = mx.roll(keys, ring, axis=2), mx.roll(values, ring, axis=2)
        cache = RotatingKVCache(max_size=self.window, keep=0)
        cache.state = (keys, values, total, 0, self.window, n if ring is None else ring)
        return cache

    def read(self, cache: Any) -> tuple[mx.array, mx.array, int]:
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


AttentionRules = FullAttention | SlidingWindow


_RULES: dict[int | None, AttentionRules] = {}


def rules_for(window: int | None) -> AttentionRules:
    """The rules of a layer with this window (None: full attention). Immutable, so shared."""
    rules = _RULES.get(window)
    if rules is None:
        rules = _RULES[window] = FullAttention() if window is None else SlidingWindow(window)
    return rules
