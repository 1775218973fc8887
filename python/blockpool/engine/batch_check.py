"""Whether a model batches exactly: a one-time check of its mlx-lm code, run on the model itself.

Batching is exact only if the model's own code honours the batch caches:
a row padded during a batched prefill must get the logits it gets alone,
and several rows must decode together at all. Most mlx-lm families do; a
few do not (in mlx-lm 0.32.2 the prefill of afm7, bailing_moe_linear,
jamba, mamba and olmo_hybrid lets the padding into the state or the
attention, minimax_m3_vl's sparse indexer picks padded positions in a
batched decode, and gpt_bigcode cannot decode a batch), and mlx-lm's own
``batch_generate`` gives them other tokens than a lone run. So before it
batches a model, the engine runs this check once (a few forward passes of
at most 40 tokens, kept on the model): two prompts of lengths far apart,
decoded together through the engine's own batch (prefilled apart, then
prefilled together), against each alone. Where the padded prefill is off, prompts are prefilled one at a
time (their decode is still batched); where a batched decode fails, the
engine decodes one sequence at a time. Either way the output stays exact.

A model whose attention runs paged (:mod:`blockpool.paged`) is checked
through paged batches, on a scratch pool: that is how it will batch.

The logits are compared by their relative L2 distance after the first
generated token. Measured on the tiny models of the suite: at most 0.0024
for families that batch exactly (float32, bfloat16 and float16; the gap is
rounding in chunked SSM kernels), at least 0.03 for the ones that do not.
The threshold is 0.01.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

#: Relative L2 distance of logits above which a padded prefill counts as inexact.
TOLERANCE = 0.01
_ATTRIBUTE = "_blockpool_batch_support"


@dataclass(frozen=True)
class BatchSupport:
    """What the engine may batch for a model, and why not where it may not."""

    padded_prefill: bool
    decode: bool
    detail: str = ""


def batch_support(model: Any, spec: Any, paged_layers: tuple[int, ...] = ()) -> BatchSupport:
    """The model's batching support, with these layers paged (checked on first use, then kept on the model object)."""
    try:
        known = vars(model).setdefault(_ATTRIBUTE, {})
    except TypeError:
        known = {}
    if paged_layers not in known:
        known[paged_layers] = _check(model, spec, paged_layers)
    return known[paged_layers]


class _Scratch:
    """What the check's batches are made of: new caches per prompt and, for paged layers, a scratch pool."""

    def __init__(self, spec: Any, paged_layers: tuple[int, ...]):
        from blockpool.pool import BlockPool

        self.spec, self.layers = spec, paged_layers
        self.pool = BlockPool(spec, num_blocks=8 * spec.num_layers) if paged_layers else None
        self.sequences: list[Any] = []

    def caches(self) -> list[Any]:
        return [None if i in self.layers else self.spec.kind(i).new_cache() for i in range(self.spec.num_layers)]

    def sequence(self) -> list[Any]:
        from blockpool.block import AgentBlocks
        from blockpool.paged import start_sequence

        if not self.layers:
            return []
        agent = f"blockpool-batch-check-{len(self.sequences)}"
        self.sequences.append(start_sequence(self.pool, self.layers, AgentBlocks.empty(agent, self.spec)))
        return [self.sequences[-1]]

    def release(self) -> None:
        """Free what the check's rows wrote (a scratch pool, but let nothing linger)."""
        from blockpool.paged import PagedRows

        if self.layers:
            rows = PagedRows(self.pool, self.layers, self.sequences)
            for index in range(len(rows)):
                rows.abandon(index)


def _check(model: Any, spec: Any, paged_layers: tuple[int, ...] = ()) -> BatchSupport:
    from blockpool.engine.batch import DecodeBatch, Row

    if not spec.batchable:
        return BatchSupport(False, False, "a cache kind mlx-lm cannot batch (chunked attention)")
    # Lengths far apart: some models go wrong only once the padding is long (a sparse indexer's top-k).
    prompts = [[3 + i % 29 for i in range(40)], [23, 29, 31]]
    try:
        alone = []  # per prompt: the distributions of its first two generated tokens (greedy)
        for prompt in prompts:
            cache = make_prompt_cache(model)
            first = model(mx.array([prompt]), cache=cache)[0, -1]
            second = model(mx.array([[mx.argmax(first).item()]]), cache=cache)[0, -1]
            alone.append((_logprobs(first), _logprobs(second)))
    except Exception as error:  # the model does not run here at all: nothing to compare
        return BatchSupport(True, True, f"not checked ({type(error).__name__}: {error})")
    scratch = _Scratch(spec, paged_layers)
    try:
        joined = _separate_prefill_joined_decode(model, spec, prompts, DecodeBatch, Row, scratch)
        padded = _padded_prefill(model, spec, prompts, DecodeBatch, Row, scratch)
    except Exception as error:
        return BatchSupport(False, False, f"a batched decode fails ({type(error).__name__}: {error})")
    finally:
        scratch.release()
    worst = max(_distance(a, b) for pair, steps in zip(alone, joined) for a, b in zip(pair, steps))
    if not worst <= TOLERANCE:  # NaN counts as off
        return BatchSupport(False, False, f"a batched decode changes the logits (relative distance {worst:.3g})")
    worst = max(_distance(a, b) for pair, steps in zip(alone, padded) for a, b in zip(pair, steps))
    if not worst <= TOLERANCE:
        return BatchSupport(False, True, f"a padded prefill changes the logits (relative distance {worst:.3g})")
    return BatchSupport(True, True)


def _padded_prefill(
    model: Any, spec: Any, prompts: list[list[int]], batch_class: Any, row_class: Any, scratch: _Scratch
) -> list:
    """Prompts prefilled together (right-padded), then decoded: see :func:`_two_steps`."""
    caches = [scratch.caches() for _ in prompts]
    rows = [row_class(None, None, []) for _ in prompts]
    sequences = [s for _ in prompts for s in scratch.sequence()]
    batch = batch_class.for_prompts(
        model, spec, rows, caches, [p[-1] for p in prompts], scratch.pool, sequences, scratch.layers
    )
    batch.prefill([p[:-1] for p in prompts])
    return _two_steps(batch)


def _separate_prefill_joined_decode(
    model: Any, spec: Any, prompts: list[list[int]], batch_class: Any, row_class: Any, scratch: _Scratch
) -> list:
    """The same with each prompt prefilled alone, the rows joined into one batch to decode (left-padded caches)."""
    batch = batch_class(model, spec, scratch.pool, scratch.layers)
    for prompt in prompts:
        one = batch_class.for_prompts(
            model,
            spec,
            [row_class(None, None, [])],
            [scratch.caches()],
            [prompt[-1]],
            scratch.pool,
            scratch.sequence(),
            scratch.layers,
        )
        one.prefill([prompt[:-1]])
        one.step()  # launches the first generated token, as the engine does before a row joins
        batch.absorb(one)
    return _two_steps(batch, launched=True)


def _two_steps(batch: Any, launched: bool = False) -> list[tuple[mx.array, mx.array]]:
    """Per row, the distributions its first two generated tokens were drawn from."""
    if not launched:
        batch.step()  # reads back the prompts' last tokens, launches the first generated ones
    first = [lp for _, _, lp in batch.step()]
    second = [lp for _, _, lp in batch.step()]
    return list(zip(first, second))


def _logprobs(logits: mx.array) -> mx.array:
    logits = logits.astype(mx.float32)
    return logits - mx.logsumexp(logits)


def _distance(alone: mx.array, together: mx.array) -> float:
    together = together.reshape(-1).astype(mx.float32)
    return (mx.linalg.norm(alone - together) / mx.linalg.norm(alone)).item()
