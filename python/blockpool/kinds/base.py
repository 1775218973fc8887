"""The interface every cache kind implements, and the arithmetic they share.

A *cache kind* is one kind of mlx-lm layer cache (a ``KVCache``, a
``RotatingKVCache``, ...). Its handler is the one place that knows the
kind's rules: which token positions the layer must keep and so which
logical blocks it holds, how much working memory its mlx-lm cache takes,
how that cache is rebuilt from gathered blocks and read back in time order,
and how it batches (merge, grow, read one row). Everything else (block
handles, planning, conversion, the prefix index, persistence, the engine)
asks the layer's handler, so adding a kind means adding a handler, not
editing the engine. This mirrors vLLM v1, which has one manager per
attention type.

Handlers are immutable values: equal parameters give equal handlers, so a
layout (``ModelCacheSpec``) compares by value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

import mlx.core as mx

Source = tuple[mx.array, mx.array, int]
"""One layer's tokens in time order: keys, values ``[1, H, T, D]`` and the position of token 0."""


def blocks_for(tokens: int, block_tokens: int) -> int:
    """Blocks needed to hold positions ``[0, tokens)``."""
    return -(-tokens // block_tokens)


class CacheKind(ABC):
    """The rules of one kind of layer cache. Subclasses are frozen dataclasses."""

    #: A short name (``"full"``, ``"sliding"``), as ``LayerSpec.attention`` reports it.
    name: ClassVar[str]
    #: How messages name it (``"full-attention"``).
    label: ClassVar[str]
    #: The attention window, for kinds that have one (None: unbounded).
    window: int | None = None

    @classmethod
    @abstractmethod
    def recognise(cls, cache: Any) -> CacheKind | str | None:
        """This kind's handler for a live mlx-lm cache (as ``make_cache`` made it) if the cache is
        of this kind; a reason if it is a variant of it that cannot be stored; else None."""

    # ------------------------------------------------------------ what the layer keeps

    @abstractmethod
    def first_needed(self, tokens: int) -> int:
        """First position a cache of ``tokens`` tokens must hold."""

    def block_range(self, tokens: int, block_tokens: int) -> tuple[int, int]:
        """Logical blocks ``[lo, hi)`` the layer keeps for ``tokens`` tokens."""
        return self.first_needed(tokens) // block_tokens, blocks_for(tokens, block_tokens)

    @abstractmethod
    def max_blocks(self, block_tokens: int) -> int | None:
        """Most blocks the layer ever holds (None: it grows with the history)."""

    @abstractmethod
    def cache_tokens(self, tokens: int) -> int:
        """Tokens the layer's mlx-lm cache holds after ``tokens`` tokens."""

    @abstractmethod
    def working_tokens(self, total: int, block_tokens: int, prefill_step: int) -> int:
        """Token capacity of the layer's working cache at ``total`` tokens, at its largest
        (the engine budgets with it)."""

    # ------------------------------------------------------------ mlx-lm caches

    @abstractmethod
    def new_cache(self) -> Any:
        """An empty mlx-lm cache of this kind."""

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

    def ring_index(self, cache: Any) -> int | None:
        """The physical write position of a cache whose order is not time order (None: it is)."""
        return None

    def check_ring_index(self, value: Any, total: int) -> None:
        """Raise ``ValueError`` unless ``value`` is a ring index a ``total``-token cache can have
        (a persisted file is checked with it)."""
        raise ValueError(f"a {self.label} layer has no ring index")

    # ------------------------------------------------------------ batching

    @abstractmethod
    def merge(self, caches: list[Any]) -> Any:
        """One batch cache of several sequences' one-sequence caches."""

    def as_batch(self, cache: Any) -> Any:
        """A one-row batch cache holding ``cache``'s tokens."""
        return self.merge([cache])

    @abstractmethod
    def read_row(self, cache: Any, index: int) -> tuple[Source, int | None]:
        """Row ``index`` of a batch cache: its tokens in time order, and its ring index."""

    @abstractmethod
    def growth_tokens(self, cache: Any) -> int:
        """Token capacity the cache adds when the next token is written (0: it has room)."""

    def grow(self, cache: Any, tokens: int = 1) -> None:  # noqa: B027 - most kinds grow inside the model call
        """Give the cache room for ``tokens`` more now, as its own update would, if it grows by
        reallocation; a kind whose cache grows inside the model call does nothing here."""

    # ------------------------------------------------------------ description

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The kind's parameters as JSON-ready fields of a layer description."""
