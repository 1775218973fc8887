"""Cache kinds: one handler per kind of mlx-lm layer cache (see :mod:`blockpool.kinds.base`).

:func:`kind_of_cache` recognises a live cache's kind; :func:`kind_for`
and :func:`kind_from_dict` give the handler a layer description names. To
add a kind, write its handler (a :class:`CacheKind`) and list it in
:data:`KINDS`.
"""

from __future__ import annotations

from typing import Any

from blockpool.errors import UnsupportedModelError
from blockpool.kinds.base import CacheKind, LayerPlan, Source, arrays_in, blocks_for
from blockpool.kinds.chunked import ChunkedAttention
from blockpool.kinds.full import FullAttention
from blockpool.kinds.geometry import BLOCK_TOKENS, Geometry, StateGeometry
from blockpool.kinds.recurrent import RecurrentState
from blockpool.kinds.sliding import SlidingWindow
from blockpool.kinds.tokens import TokenKind
from blockpool.kinds.unused import UnusedCache

#: Every kind blockpool stores, asked in order which one a live cache is.
KINDS: tuple[type[CacheKind], ...] = (FullAttention, SlidingWindow, ChunkedAttention, RecurrentState)

_BY_WINDOW: dict[int | None, CacheKind] = {}


def kind_for(window: int | None) -> CacheKind:
    """The handler of an attention layer with this window (None: full attention). Shared: handlers are immutable."""
    kind = _BY_WINDOW.get(window)
    if kind is None:
        kind = _BY_WINDOW[window] = FullAttention() if window is None else SlidingWindow(window)
    return kind


def kind_from_dict(fields: dict[str, Any]) -> CacheKind:
    """The handler a layer description (``ModelCacheSpec.to_dict``) names.

    Raises:
        ValueError: An unknown kind or bad parameters.
    """
    name = fields.get("kind", "attention")
    if name == "attention":
        window = fields.get("window")
        if window is not None and (type(window) is not int or window < 1):
            raise ValueError(f"window {window!r} is not a positive integer")
        return kind_for(window)
    if name == "chunked" and type(fields.get("chunk")) is int and fields["chunk"] > 0:
        return ChunkedAttention(fields["chunk"])
    if name == "recurrent" and type(fields.get("slots")) is int and fields["slots"] > 0:
        return RecurrentState(fields["slots"])
    if name == "unused":
        return UnusedCache()
    raise ValueError(f"unknown cache kind {fields!r}")


def kind_of_cache(layer_id: int, cache: Any) -> CacheKind:
    """The kind of a layer's live mlx-lm cache (as ``model.make_cache()`` made it).

    Raises:
        UnsupportedModelError: No handler stores this cache; the message names its class.
    """
    reasons = []
    for kind_class in KINDS:
        found = kind_class.recognise(cache)
        if isinstance(found, CacheKind):
            return found
        if found is not None:
            reasons.append(found)
    what = reasons[0] if reasons else type(cache).__name__
    raise UnsupportedModelError(
        f"layer {layer_id} uses {what}, which blockpool does not store "
        "(it stores KVCache, RotatingKVCache without kept tokens, ChunkedKVCache, ArraysCache, "
        "and CacheList of those)"
    )


__all__ = [
    "BLOCK_TOKENS",
    "KINDS",
    "CacheKind",
    "ChunkedAttention",
    "FullAttention",
    "Geometry",
    "LayerPlan",
    "RecurrentState",
    "SlidingWindow",
    "Source",
    "StateGeometry",
    "TokenKind",
    "UnusedCache",
    "arrays_in",
    "blocks_for",
    "kind_for",
    "kind_from_dict",
    "kind_of_cache",
]
