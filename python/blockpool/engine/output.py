"""What a request shows: text deltas, stop strings, events, and its one completion.

Tokens are detokenized as they come when the driver wants per-token text
(``stream``, ``tick``) or the request has stop strings; otherwise once, at
the end (the same text). Text that may be the start of a stop string is
held back until it is known not to be one. Every request ends in exactly
one :class:`~blockpool.engine.types.CompletedGeneration`, made by
:func:`make_completion`, and carried by its last event.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx

from blockpool.block import AgentBlocks
from blockpool.engine.history import hand_back
from blockpool.engine.types import CompletedGeneration, GenerationEvent, Request
from blockpool.errors import GenerationError

#: Finish reasons whose tokens the agent keeps.
KEPT = ("stop", "length")


@dataclass(eq=False)
class Output:
    """One request's text so far."""

    detokenizer: Any
    text: str = ""
    detokenized: int = 0  # tokens the detokenizer has seen
    emitted: int = 0  # characters of ``text`` handed out
    last_event: GenerationEvent | None = None


def on_token(
    request: Request, token: int, logprobs: mx.array, eos: set[int], deltas: bool
) -> tuple[str | None, GenerationEvent | None]:
    """Record one generated token.

    Returns:
        The finish reason if the request ends here, and the token's event
        (None when nobody wants per-token text and there is none to show).
    """
    if request.first_token_at is None:
        request.first_token_at = time.perf_counter()
    request.tokens.append(token)
    finish = None
    if token in eos:
        finish = "stop"
    elif len(request.tokens) >= request.params.max_tokens:
        finish = "length"
    stop = request.params.stop
    out = request.output
    if finish is None and not deltas and not stop:
        return None, None  # step() shows no per-token text: detokenize later, in one go (same text)
    detokenize(request, finish)
    stop_at = _find_stop(out.text, stop)
    if stop_at is not None:
        out.text = out.text[:stop_at]
        if finish is None:
            out.detokenizer.finalize()
        finish = "stop"
    visible = len(out.text) if finish else len(out.text) - _stop_prefix_len(out.text, stop)
    delta = out.text[out.emitted : visible]
    out.emitted = max(out.emitted, visible)
    event = GenerationEvent(request.uid, request.agent_id, token, delta, logprobs=logprobs)
    out.last_event = event  # a finishing token's event carries the completion too
    return finish, event


def detokenize(request: Request, finish: str | None = None) -> None:
    """Feed the detokenizer the tokens it has not seen (an end-of-sequence token is not text)."""
    out = request.output
    tokens = request.tokens[out.detokenized :]
    if finish == "stop" and tokens:
        tokens = tokens[:-1]
    for token in tokens:
        out.detokenizer.add_token(token)
    out.detokenized = len(request.tokens)
    if finish is not None:
        out.detokenizer.finalize()
    out.text += out.detokenizer.last_segment


def make_completion(
    request: Request, blocks: AgentBlocks | None, reason: str, error: BaseException | None = None
) -> CompletedGeneration:
    """The request's completion. Timing is reported for the reasons whose tokens are kept."""
    now = time.perf_counter()
    if request.output.detokenized < len(request.tokens):
        detokenize(request, reason if reason in KEPT else None)
    n = len(request.tokens)
    ttft, tps = None, 0.0
    if reason in KEPT:
        if request.first_token_at and request.admitted_at:
            ttft = request.first_token_at - request.admitted_at
        decode_time = now - (request.first_token_at or now)
        tps = (n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0
    return CompletedGeneration(
        uid=request.uid,
        agent_id=request.agent_id,
        text=request.output.text,
        token_ids=list(request.tokens),
        finish_reason=reason,
        blocks=blocks,
        prompt_tokens=len(request.prompt),
        cached_tokens=request.history.keep,
        generation_tokens=n,
        time_to_first_token=ttft,
        generation_tps=tps,
        error=_as_generation_error(request, error),
        queued_seconds=(request.admitted_at or now) - request.submitted_at,
        preemptions=request.preemptions,
    )


def _as_generation_error(request: Request, error: BaseException | None) -> GenerationError | None:
    if error is None or isinstance(error, GenerationError):
        return error
    failure = GenerationError(
        f"request {request.uid} of agent {request.agent_id!r} failed: {type(error).__name__}: {error}"
    )
    failure.__cause__ = error
    return failure


class EventQueue:
    """Events waiting to be handed out, in order; safe to use from any thread."""

    def __init__(self) -> None:
        self._events: deque[GenerationEvent] = deque()
        self._lock = threading.Lock()

    def put(self, event: GenerationEvent) -> None:
        with self._lock:
            self._events.append(event)

    def finish(self, request: Request, completion: CompletedGeneration) -> None:
        """Hand out a completion: on the request's last token event if that is still queued, else on its own."""
        with self._lock:
            last = request.output.last_event
            if completion.finish_reason in KEPT and last is not None and last in self._events:
                last.completion = completion
            else:
                self._events.append(GenerationEvent(request.uid, request.agent_id, None, "", completion))

    def pop(self) -> GenerationEvent | None:
        with self._lock:
            return self._events.popleft() if self._events else None

    def drain(self) -> list[GenerationEvent]:
        with self._lock:
            events = list(self._events)
            self._events.clear()
            return events

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)

    def completions_pending(self) -> int:
        """Completions queued and not yet handed out (their owners may free blocks as they take them)."""
        with self._lock:
            return sum(1 for e in self._events if e.completion is not None)


def _find_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class Endings:
    """Ends requests: makes the completion, gives the request's memory back, queues the event.

    Args:
        pool: The pool (a request that ends without output hands back its history's handle).
        events: Where completions are handed out.
        release: Called with each ended request, to forget it as in flight.
    """

    def __init__(self, pool: Any, events: EventQueue, release: Any):
        self.pool, self.events, self._release = pool, events, release

    def complete(self, request: Request, blocks: AgentBlocks, reason: str) -> None:
        """A request that finished with output: ``blocks`` hold its history, prompt and tokens."""
        completion = make_completion(request, blocks, reason)
        self._release(request)
        self.events.finish(request, completion)

    def abandon(self, request: Request, reason: str, error: BaseException | None = None) -> None:
        """End a request whose new tokens are not kept (cancelled, failed): its history goes back to the caller."""
        blocks = hand_back(self.pool, request.history, request.agent_id)
        if blocks is not None and reason == "cancelled" and request.free_on_cancel:
            self.pool.release(blocks)
            blocks = None
        completion = make_completion(request, blocks, reason, error)
        self._release(request)
        self.events.finish(request, completion)
