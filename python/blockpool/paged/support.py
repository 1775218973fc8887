"""Which path a model's attention takes: in place over its blocks (paged), or gathered into caches.

Paged attention covers the layers whose cache kind is full or
sliding-window attention, in models whose attention code calls mlx-lm's
``scaled_dot_product_attention`` with the layer's cache (most families).
Whether a model does is checked on the model itself, once (the answer is
kept on the model object): a short prompt and two decode steps through
paged layers on a scratch pool, against the same through mlx-lm's own
caches. The model runs paged only if every such layer's attention went
through the paged kernel and the logits agree (on the CPU they are equal
bit for bit; the tolerance is for GPU kernels). Otherwise, and for models
with other K/V layers (Llama 4's chunked attention), every layer gathers,
as before: the reason is kept (``blockpool doctor --model`` prints it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from blockpool.block import AgentBlocks
from blockpool.paged import dispatch
from blockpool.paged.layer import PagedLayer
from blockpool.paged.rows import PagedRows, start_sequence

#: The cache kinds whose layers can read their blocks in place.
PAGED_KINDS = ("full", "sliding")
#: Relative L2 distance of the logits above which paged attention counts as different.
TOLERANCE = 1e-3
_ATTRIBUTE = "_blockpool_paged_support"
_AGENT = "blockpool-paged-check"


@dataclass(frozen=True)
class PagedSupport:
    """The layers that attend over their blocks in place (empty: the model gathers), and why not when not."""

    layers: tuple[int, ...]
    detail: str = ""

    @property
    def paged(self) -> bool:
        return bool(self.layers)


def paged_support(model: Any, spec: Any) -> PagedSupport:
    """Whether (and which of) the model's layers run paged: checked on first use, then kept on the model."""
    try:
        known = vars(model).get(_ATTRIBUTE)
    except TypeError:
        known = None
    if known is None:
        known = check_paged(model, spec)
        try:
            setattr(model, _ATTRIBUTE, known)
        except AttributeError:
            pass
    return known


def check_paged(model: Any, spec: Any) -> PagedSupport:
    """Run the check (see the module docstring) and say what it found."""
    from blockpool.pool import BlockPool

    candidates = tuple(i for i, layer in enumerate(spec.layers) if layer.kind.name in PAGED_KINDS)
    others = sorted(
        {layer.kind.label for layer in spec.layers if layer.kind.storage == "tokens" and layer.kind.name != "unused"}
        - {spec.kind(i).label for i in candidates}
    )
    if not candidates:
        return PagedSupport((), "no full or sliding-window attention layer to page")
    if others:
        return PagedSupport((), f"its {', '.join(others)} layers gather (paging covers full and sliding-window ones)")
    dispatch.install(model)
    prompt = [3 + i % 29 for i in range(24)]
    try:
        expected = _three_steps(model, make_prompt_cache(model), prompt, lambda n: None, lambda: None)
    except Exception as error:  # the model does not run here at all: nothing to compare
        return PagedSupport((), f"not checked ({type(error).__name__}: {error})")
    pool = BlockPool(spec, num_blocks=4 * spec.num_layers)
    rows = PagedRows(pool, candidates, [start_sequence(pool, candidates, AgentBlocks.empty(_AGENT, spec))])
    entries = [PagedLayer(rows, i) if i in candidates else spec.kind(i).new_cache() for i in range(spec.num_layers)]
    try:
        got = _three_steps(model, spec.assemble(entries), prompt, lambda n: rows.prepare([n]), rows.commit)
    except AttributeError as error:  # e.g. layers that share another layer's K/V read the cache's arrays
        return PagedSupport((), f"the model reads its cache's own arrays ({error}), which a paged layer does not hold")
    except Exception as error:
        return PagedSupport((), f"paged attention fails here ({type(error).__name__}: {error})")
    finally:
        rows.abandon(0)
    missing = [i for i in candidates if i not in rows.attended]
    if missing:
        return PagedSupport((), f"layers {missing} do not call mlx-lm's scaled_dot_product_attention with their cache")
    worst = max(_distance(a, b) for a, b in zip(expected, got))
    if not worst <= TOLERANCE:  # NaN counts as different
        return PagedSupport((), f"paged attention changes the logits (relative distance {worst:.3g})")
    return PagedSupport(candidates)


def _three_steps(model: Any, cache: Any, prompt: list[int], before: Any, after: Any) -> list[mx.array]:
    """Logits of a prompt's last position and of two greedy steps after it."""
    out = []
    tokens = mx.array([prompt])
    for _ in range(3):
        before(tokens.shape[1])
        logits = model(tokens, cache=cache)[0, -1].astype(mx.float32)
        after()
        mx.eval(logits)
        out.append(logits)
        tokens = mx.argmax(logits).reshape(1, 1)
    return out


def _distance(a: mx.array, b: mx.array) -> float:
    return (mx.linalg.norm(a - b) / mx.linalg.norm(a)).item()
