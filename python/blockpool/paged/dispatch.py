"""Where mlx-lm's models call attention, a paged layer's cache attends over its blocks.

mlx-lm's model files import ``scaled_dot_product_attention`` from
``mlx_lm.models.base`` and call it with the layer's cache. :func:`install`
replaces that name, in the modules a model's classes come from (and in
``base``), with :func:`scaled_dot_product_attention` below: for a
:class:`~blockpool.paged.layer.PagedLayer` cache it runs the paged kernel,
for any other cache it calls mlx-lm's own function with the same
arguments, so the model files are not forked and every other caller gets
exactly what it got before. Families whose attention does not call it
(multi-head latent attention, say) are found by the engine's support check
and keep the gather path.
"""

from __future__ import annotations

import sys
import threading
from typing import Any

import mlx.core as mx
from mlx_lm.models import base

from blockpool.paged.layer import PagedLayer

_lock = threading.Lock()


def scaled_dot_product_attention(
    queries: mx.array,
    keys: Any,
    values: Any,
    cache: Any,
    scale: float,
    mask: Any,
    sinks: mx.array | None = None,
) -> mx.array:
    """mlx-lm's ``scaled_dot_product_attention``, or the paged kernel for a paged layer's cache."""
    if isinstance(cache, PagedLayer):
        return cache.attend(queries, scale=scale, mask=mask, sinks=sinks)
    return ORIGINAL(queries, keys, values, cache=cache, scale=scale, mask=mask, sinks=sinks)


#: mlx-lm's own function, called for every cache that is not a paged layer's (found also if this
#: module is imported again after it replaced the name in ``base``).
ORIGINAL = getattr(base.scaled_dot_product_attention, "blockpool_original", base.scaled_dot_product_attention)
scaled_dot_product_attention.blockpool_original = ORIGINAL  # type: ignore[attr-defined]


def install(model: Any) -> list[str]:
    """Route the attention of ``model``'s modules through :func:`scaled_dot_product_attention`.

    Idempotent. Returns the module names that call it now.
    """
    names = {type(model).__module__, base.__name__}
    names.update(type(m).__module__ for m in model.modules())
    routed = []
    with _lock:
        for name in sorted(names):
            module = sys.modules.get(name)
            current = getattr(module, "scaled_dot_product_attention", None) if module is not None else None
            if current is ORIGINAL:
                module.scaled_dot_product_attention = scaled_dot_product_attention
            if current in (ORIGINAL, scaled_dot_product_attention):
                routed.append(name)
    return routed
