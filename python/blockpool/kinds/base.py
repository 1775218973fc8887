"""The interface every cache kind implements, and the arithmetic they share.

A *cache kind* is one kind of mlx-lm layer cache (a ``KVCache``, a
``RotatingKVCache``, an ``ArraysCache``, ...). Its handler is the one place
that knows the kind's rules: what the layer stores in the pool and which of
it an agent keeps, which prefixes it can resume from, how much working
memory its mlx-lm cache takes, how that cache is rebuilt from the pool and
read back, and how it batches (merge, grow, read one row). Everything else
(block handles, planning, conversion, the prefix index, persistence, the
engine) asks the layer's handler, so adding a kind means adding a handler,
not editing the engine. This mirrors vLLM v1, which has one manager per
attention type.

Kinds come in two storage families, which is all the pool and the
conversion code need to know:

- ``"tokens"`` (:class:`~blockpool.kinds.tokens.TokenKind`): K and V token
  by token, in blocks of ``block_tokens`` tokens (full, sliding-window and
  chunked attention);
- ``"state"`` (:class:`~blockpool.kinds.recurrent.RecurrentState`):
  fixed-size arrays per sequence (conv and SSM state), stored as snapshots
  at chosen positions (*checkpoints*).

In a spec, "layer" means one cache *entry*: a model layer, or one part of a
composite (``CacheList``) layer.

Handlers are immutable values: equal parameters give equal handlers, so a
layout (``ModelCacheSpec``) compares by value.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import mlx.core as mx

Source = tuple[mx.array, mx.array, int]
"""One token layer's tokens in time order: keys, values ``[1, H, T, D]`` and the position of token 0."""


def arrays_in(value: Any) -> list[mx.array]:
    """Every array inside a cache's state (arrays, and lists and tuples of them, nested)."""
    if isinstance(value, mx.array):
        return [value]
    if isinstance(value, (list, tuple)):
        return [a for item in value for a in arrays_in(item)]
    return []


def blocks_for(tokens: int, block_tokens: int) -> int:
    """Blocks needed to hold positions ``[0, tokens)``."""
    return -(-tokens // block_tokens)


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's blocks change when an agent's history grows to ``total`` tokens.

    ``kept`` blocks stay, ``dropped`` ones are freed, and ``fresh`` new ones
    are allocated after the kept ones. Token layers: ``kept`` starts at
    logical block ``lo``; tokens from ``write_from`` on are copied in;
    ``valid_from`` is the first position the blocks will really hold. State
    layers: ``positions`` are the positions of the kept blocks and then of
    the fresh ones (``write_positions``, whose snapshots are copied in).
    """

    layer_id: int
    lo: int
    kept: tuple[Any, ...]
    dropped: tuple[Any, ...]
    fresh: int
    write_from: int
    valid_from: int
    positions: tuple[int, ...] = ()
    write_positions: tuple[int, ...] = ()


class CacheKind(ABC):
    """The rules of one kind of layer cache. Subclasses are frozen dataclasses."""

    #: A short name (``"full"``, ``"sliding"``, ``"chunked"``, ``"recurrent"``), as ``LayerSpec.attention`` reports it.
    name: ClassVar[str]
    #: How messages name it (``"full-attention"``).
    label: ClassVar[str]
    #: ``"tokens"`` or ``"state"`` (see the module docstring).
    storage: ClassVar[str]
    #: Whether several sequences of this kind decode in one batch (mlx-lm can merge its caches).
    batchable: ClassVar[bool] = True
    #: The attention window, for kinds that have one (None: unbounded).
    window: int | None = None

    @classmethod
    @abstractmethod
    def recognise(cls, cache: Any) -> CacheKind | str | None:
        """This kind's handler for a live mlx-lm cache (as ``make_cache`` made it) if the cache is
        of this kind; a reason if it is a variant of it that cannot be stored; else None."""

    @abstractmethod
    def geometry_of(self, cache: Any) -> Any:
        """What one block of the layer stores, read off its cache after a forward pass."""

    @abstractmethod
    def describe(self) -> dict[str, Any]:
        """The kind's parameters as JSON-ready fields of a layer description."""

    @abstractmethod
    def keeps(self) -> str:
        """What a layer of this kind keeps of an agent's history, in words (``blockpool doctor`` says it)."""

    # ------------------------------------------------------------ sizes

    @abstractmethod
    def blocks_held(self, tokens: int, block_tokens: int) -> int:
        """Blocks an agent of ``tokens`` tokens holds at least (checkpoints come on top)."""

    @abstractmethod
    def max_blocks(self, block_tokens: int) -> int | None:
        """Most blocks the layer ever holds (None: it grows with the history)."""

    @abstractmethod
    def working_bytes(self, geometry: Any, total: int, block_tokens: int, prefill_step: int) -> int:
        """Bytes of one sequence's working cache of this layer at ``total`` tokens, at its largest
        (the engine budgets with it)."""

    # ------------------------------------------------------------ histories

    @abstractmethod
    def check(self, agent: Any, layer_id: int) -> None:
        """Raise ``ValueError`` unless the handle's blocks of this layer are consistent with its tokens."""

    @abstractmethod
    def resume_point(self, history: Any, layer_id: int, tokens: int) -> int:
        """The largest position ``p <= tokens`` that a history (a handle or an agent file) can resume
        this layer from exactly (0 always works: nothing is resumed)."""

    @abstractmethod
    def plan(
        self, pool: Any, base: Any, layer_id: int, total: int, pending: Any = (), every: int | None = None
    ) -> LayerPlan:
        """Plan the layer's blocks when ``base`` grows to ``total`` tokens (pure: the pool is only asked
        which blocks are shared). State layers: ``pending`` are ``(position, block)`` snapshots taken
        meanwhile, ``every`` the checkpoint grid (in tokens) whose snapshots stay."""

    @abstractmethod
    def truncate(self, agent: Any, layer_id: int, tokens: int) -> tuple[list, list, dict[str, Any]] | None:
        """The layer's blocks for the first ``tokens`` tokens: ``(kept, freed, fields)``, where
        ``fields`` are the handle's per-layer records (``valid_from``, ``positions``); None when
        the layer cannot serve that prefix (nothing changes)."""

    @abstractmethod
    def index_units(self, agent: Any, layer_id: int) -> dict[int, tuple[Any, int]]:
        """What the prefix index may record for this layer: logical block ``j`` (the chain key of the
        tokens up to ``(j + 1) * B``) -> ``(block, first valid position)``."""

    def partial_units(self, agent: Any, layer_id: int) -> dict[int, tuple[Any, int]]:
        """Blocks whose first tokens another agent may take, down to a part of one (a shared block is
        copied before it is written): logical block ``j`` -> ``(block, first valid position)``,
        the last, partly filled block included. None by default: a state layer's state exists
        only at its checkpoints, so it cannot be shared from inside a block."""
        return {}

    @abstractmethod
    def lookup_units(
        self, chain: list[dict[int, tuple[Any, int]]], layer_id: int, length: int, block_tokens: int
    ) -> list | None:
        """The blocks an agent resuming at ``length`` (a multiple of B) needs, from the live index
        entries along the chain (``chain[j][layer_id] = (block, valid from)``); None if one is missing."""

    def chain_required(self) -> bool:
        """Whether a shared prefix needs this layer's block at every block of it (a full layer)."""
        return False

    # ------------------------------------------------------------ mlx-lm caches

    @abstractmethod
    def new_cache(self) -> Any:
        """An empty mlx-lm cache of this kind."""

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
        """A one-row batch cache holding ``cache``'s contents."""
        return self.merge([cache])

    @abstractmethod
    def read_row(self, cache: Any, index: int) -> tuple[Any, int | None]:
        """Row ``index`` of a batch cache, as :meth:`read` gives a one-sequence cache, and its ring index."""

    @abstractmethod
    def read(self, cache: Any) -> Any:
        """What a one-sequence cache holds, for writing to the pool (tokens in time order, or its state)."""

    def growth_tokens(self, cache: Any) -> int:
        """Token capacity the cache adds when the next token is written (0: it has room, or is fixed)."""
        return 0

    def grow(self, cache: Any, tokens: int = 1) -> None:  # noqa: B027 - most kinds grow inside the model call
        """Give the cache room for ``tokens`` more now, as its own update would, if it grows by
        reallocation; a kind whose cache grows inside the model call does nothing here."""
