"""Cache kinds: one handler per kind of mlx-lm layer cache (see :mod:`blockpool.kinds.base`).

:func:`kind_of_cache` recognises a live cache's kind; :func:`kind_for`
gives the handler a layer description names. To add a kind, write its
handler (a :class:`CacheKind`) and list it in :data:`KINDS`.
"""

from __future__ import annotations

from typing import Any

from blockpool.errors import UnsupportedModelError
from blockpool.kinds.base import CacheKind, Source, blocks_for
from blockpool.kinds.full import FullAttention
from blockpool.kinds.sliding import SlidingWindow

#: Every kind blockpool stores, asked in order which one a live cache is.
KINDS: tuple[type[CacheKind], ...] = (FullAttention, SlidingWindow)

_BY_WINDOW: dict[int | None, CacheKind] = {}


def kind_for(window: int | None) -> CacheKind:
    """The handler of an attention layer with this window (None: full attention). Shared: handlers are immutable."""
    kind = _BY_WINDOW.get(window)
    if kind is None:
        kind = _BY_WINDOW[window] = FullAttention() if window is None else SlidingWindow(window)
    return kind


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
        f"layer {layer_id} uses {what}; blockpool stores only plain attention KV caches "
        "(KVCache, or RotatingKVCache without kept tokens)"
    )


__all__ = ["KINDS", "CacheKind", "FullAttention", "SlidingWindow", "Source", "blocks_for", "kind_for", "kind_of_cache"]
