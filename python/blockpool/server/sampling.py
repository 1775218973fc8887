"""A request's sampling parameters and the mlx-lm sampler and logits processors they make.

``GenerationParams`` is plain data: under ``mlx.launch`` rank 0 sends it to
the other ranks with the request, and every rank builds the same sampler.

Sampling with a temperature draws from the request's own random key, seeded
by the request's ``seed`` (or, without one, by a seed rank 0 picks). The key
advances exactly as the global key does in a sequential mlx-lm run after
``mx.random.seed(seed)``, so a seeded request gives what
``mlx_lm.stream_generate`` gives after that call, whatever else runs in the
batch. (``mlx_lm.server`` serves seeded requests one at a time to get this;
here they stay in the batch, whose rows are sampled one by one when their
samplers differ.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import mlx.core as mx
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)

from blockpool.engine.batch import LogitsProcessor, Sampler


@dataclass
class GenerationParams:
    """Everything that decides one request's tokens, besides its prompt.

    Field meanings and defaults follow ``mlx_lm.server``; ``seed`` is always
    set by the time a request reaches the engine.
    """

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.1
    seed: int | None = None
    logit_bias: dict[int, float] | None = None
    repetition_penalty: float = 0.0
    repetition_context_size: int = 20
    presence_penalty: float = 0.0
    presence_context_size: int = 20
    frequency_penalty: float = 0.0
    frequency_context_size: int = 20
    stop: list[str] = field(default_factory=list)
    logprobs: bool = False
    top_logprobs: int = 0


class KeyedSampler:
    """mlx-lm's temperature sampler (top-p, min-p, top-k filters) drawing from its own key.

    Args:
        seed: Seeds the key as ``mx.random.seed(seed)`` seeds the global one.
        temperature: Above 0.
        top_p, min_p, top_k: As for ``mlx_lm.sample_utils.make_sampler``
            (0 or 1 disables top-p, 0 disables the others).
    """

    def __init__(self, seed: int, temperature: float, top_p: float = 1.0, min_p: float = 0.0, top_k: int = 0):
        self._key = mx.random.key(seed)
        self._scale = 1.0 / temperature
        # The filters in make_sampler's order.
        self._filters = []
        if 0 < top_p < 1.0:
            self._filters.append(lambda x: apply_top_p(x, top_p))
        if min_p != 0.0:
            self._filters.append(lambda x: apply_min_p(x, min_p, 1))
        if top_k > 0:
            self._filters.append(lambda x: apply_top_k(x, top_k))

    def __call__(self, logprobs: mx.array) -> mx.array:
        for method in self._filters:
            logprobs = method(logprobs)
        # split() returns (next state, subkey), as mlx's global key sequence advances.
        self._key, subkey = mx.random.split(self._key)
        return mx.random.categorical(logprobs * self._scale, key=subkey)


def make_request_sampler(params: GenerationParams, special_tokens: list[int]) -> Sampler | None:
    """The sampler for a request; None for greedy (the batch's shared argmax).

    XTC draws from the global key (mlx-lm's ``apply_xtc`` takes no key), so a
    request that uses it is not reproducible by ``seed``.
    """
    if params.temperature == 0:
        return None
    if params.xtc_probability > 0:
        return make_sampler(
            params.temperature,
            top_p=params.top_p,
            min_p=params.min_p,
            top_k=params.top_k,
            xtc_probability=params.xtc_probability,
            xtc_threshold=params.xtc_threshold,
            xtc_special_tokens=special_tokens,
        )
    return KeyedSampler(params.seed or 0, params.temperature, params.top_p, params.min_p, params.top_k)


def make_request_processors(params: GenerationParams) -> list[LogitsProcessor]:
    """mlx-lm's logits processors for a request's bias and penalties (empty when none is set)."""
    return make_logits_processors(
        params.logit_bias,
        params.repetition_penalty,
        params.repetition_context_size,
        params.presence_penalty,
        params.presence_context_size,
        params.frequency_penalty,
        params.frequency_context_size,
    )
