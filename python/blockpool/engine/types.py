"""What the engine hands out (completions, events, request states) and its record of a request in flight.

A :class:`Request` is made by intake, queued and admitted by the
scheduler, run by the stepper, and ended by the output module. Its fields
are grouped by who owns them: what was asked (:class:`Params`), where its
history comes from (:class:`~blockpool.engine.history.History`), what it
has shown (:class:`~blockpool.engine.output.Output`), and its progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import mlx.core as mx

from blockpool.block import AgentBlocks
from blockpool.engine.batch import LogitsProcessor, Row, Sampler
from blockpool.errors import GenerationError

if TYPE_CHECKING:
    from blockpool.engine.history import History
    from blockpool.engine.output import Output

ProgressCallback = Callable[[int, int], None]


@dataclass
class CompletedGeneration:
    """One finished request.

    Attributes:
        uid: The id ``submit`` returned.
        agent_id: The agent the request ran for.
        text: The generated text, cut before a stop string; EOS is not included.
        token_ids: The generated tokens (a final EOS included), all of them in
            ``blocks``.
        finish_reason: ``"stop"`` (EOS or a stop string), ``"length"``
            (``max_tokens`` reached), ``"cancelled"`` or ``"error"``.
        blocks: The agent's cache after the request: history, prompt and
            generated tokens. The caller owns it: pass it back as ``cache=``
            to resume, or free it with ``pool.release``. After ``"cancelled"``
            or ``"error"`` it is the history as it was before the request
            (``None`` if ``cancel(..., free_blocks=True)`` freed it).
        prompt_tokens: Tokens of this request's prompt (the part prefilled).
        cached_tokens: History tokens resumed from the pool instead of prefilled.
        generation_tokens: Number of generated tokens.
        time_to_first_token: Seconds from admission into the engine's work
            (including reconstruction) to the first generated token.
        generation_tps: Decode speed after the first token, tokens per second.
        error: The ``GenerationError`` when ``finish_reason == "error"``.
        cache_source: Set by ``AgentMemory``: where the agent's cache came
            from (``"pool"``, ``"disk"``, ``"shared"`` or ``"cold"``).
        queued_seconds: Seconds the request waited for room before admission.
        preemptions: How many times it was preempted to make room.
    """

    uid: int
    agent_id: str
    text: str
    token_ids: list[int]
    finish_reason: str
    blocks: AgentBlocks | None
    prompt_tokens: int
    cached_tokens: int
    generation_tokens: int
    time_to_first_token: float | None
    generation_tps: float
    error: GenerationError | None = None
    cache_source: str | None = None
    queued_seconds: float = 0.0
    preemptions: int = 0


@dataclass
class GenerationEvent:
    """What ``stream()`` yields: a token and its text delta, or a request's end."""

    uid: int
    agent_id: str
    token: int | None
    text: str
    completion: CompletedGeneration | None = None
    logprobs: mx.array | None = None  # log-probabilities over the vocabulary for this token


@dataclass(frozen=True)
class RequestState:
    """Where a request in flight is: ``"waiting"`` (for room, or to resume after a
    preemption), ``"prefilling"`` or ``"running"``; how often it was preempted; how many
    tokens it has generated."""

    state: str
    preemptions: int
    generated: int


@dataclass(frozen=True)
class Params:
    """What a request asked for, as intake validated it."""

    max_tokens: int
    sampler: Sampler | None
    logits_processors: list[LogitsProcessor]
    stop: list[str]
    progress: ProgressCallback | None
    share_prompt: Callable[[AgentBlocks], None] | None = None


@dataclass(eq=False)
class Request:
    """One request in flight, from submit to its completion."""

    uid: int
    agent_id: str
    prompt: list[int]  # the tokens to prefill (grows if the history has to be prefilled again)
    params: Params
    history: History
    output: Output
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None
    order: int = 0  # admission order: the youngest is preempted first
    caches: list[Any] | None = None  # its plain caches, between admission and joining the prompt batch
    sequence: Any = None  # its paged layers (blockpool.paged.PagedSequence), likewise
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)  # generated so far
    pending: tuple[int, mx.array] | None = None  # sampled before a preemption, not yet fed
    shown_ahead: str | None = None  # its newest token was shown before it was fed: "" or the finish it made
    row: Row | None = None
    preemptions: int = 0
    cancel: bool = False
    free_on_cancel: bool = False

    @property
    def all_tokens(self) -> list[int]:
        """History, prompt and generated tokens: what the request's caches hold."""
        return self.history.tokens + self.prompt + self.tokens

    @property
    def total_tokens(self) -> int:
        """Tokens the agent will hold if the request ended now."""
        return self.history.keep + len(self.prompt) + len(self.tokens)
