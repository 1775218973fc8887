"""BlockPoolBatchEngine: batched multi-agent generation that resumes agents from the pool.

The decode loop is mlx-lm's own ``BatchGenerator``. The engine only moves
caches in and out of it: at admission an agent's blocks are reconstructed
into mlx-lm caches and handed to ``BatchGenerator.insert(caches=...,
all_tokens=...)``; when a sequence finishes, the ``prompt_cache`` it returns
is written back into blocks.

Threads: ``submit`` and ``cancel`` may be called from any thread; they only
validate, reserve blocks and queue work. All model work happens in the
thread that iterates ``step()`` or ``stream()``, and requests queued while
it runs join the running batch at its next iteration.
"""

from __future__ import annotations

import copy
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator

from blockpool.block import AgentBlocks, KVBlock
from blockpool.cache_conversion import blocks_to_reserve, from_mlx_caches, to_mlx_caches
from blockpool.errors import GenerationError, IncompatibleCacheError, InvalidRequestError
from blockpool.pool import BlockPool
from blockpool.spec import ModelCacheSpec

Sampler = Callable[[mx.array], mx.array]
LogitsProcessor = Callable[[mx.array, mx.array], mx.array]


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
        time_to_first_token: Seconds from admission into the batch
            (including reconstruction) to the first generated token.
        generation_tps: Decode speed after the first token, tokens per second.
        error: The ``GenerationError`` when ``finish_reason == "error"``.
        cache_source: Set by ``AgentMemory``: where the agent's cache came
            from (``"pool"``, ``"disk"``, ``"shared"`` or ``"cold"``).
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


@dataclass
class GenerationEvent:
    """What ``stream()`` yields: a token and its text delta, or a request's end."""

    uid: int
    agent_id: str
    token: int | None
    text: str
    completion: CompletedGeneration | None = None
    logprobs: mx.array | None = None  # log-probabilities over the vocabulary for this token


@dataclass
class _Request:
    uid: int
    agent_id: str
    prompt: list[int]
    base: AgentBlocks
    reserved: dict[int, list[KVBlock]]
    max_tokens: int
    sampler: Sampler | None
    logits_processors: list[LogitsProcessor]
    stop: list[str]
    detokenizer: Any
    batch_uid: int | None = None
    admitted_at: float = 0.0
    first_token_at: float | None = None
    tokens: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0
    cancel: bool = False
    free_on_cancel: bool = False


class BlockPoolBatchEngine:
    """Continuous-batching generation for many agents over one :class:`BlockPool`.

    Args:
        model: A model from ``mlx_lm.load``.
        tokenizer: The tokenizer ``mlx_lm.load`` returned with it.
        pool: The pool holding every agent's blocks; made for this model.
        completion_batch_size: Most sequences decoded together.
        prefill_batch_size: Most prompts prefilled together.
        prefill_step_size: Prompt tokens per prefill chunk.

    Raises:
        IncompatibleCacheError: The pool was made for another cache layout.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        pool: BlockPool,
        *,
        completion_batch_size: int = 32,
        prefill_batch_size: int = 8,
        prefill_step_size: int = 2048,
    ):
        spec = ModelCacheSpec.from_model(model)
        if spec != pool.spec:
            raise IncompatibleCacheError("the pool was made for another model's cache layout")
        self.model, self.tokenizer, self.pool = model, tokenizer, pool
        self._batch_options = dict(
            completion_batch_size=completion_batch_size,
            prefill_batch_size=prefill_batch_size,
            prefill_step_size=prefill_step_size,
            stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
        )
        self._batch = BatchGenerator(model, **self._batch_options)
        self._eos = set(tokenizer.eos_token_ids)
        self._vocab = getattr(getattr(model, "args", None), "vocab_size", None)
        self._lock = threading.RLock()
        self._uids = itertools.count()
        self._pending: deque[_Request] = deque()
        self._active: dict[int, _Request] = {}  # by BatchGenerator uid
        self._requests: dict[int, _Request] = {}  # by engine uid, until finished
        self._agents_in_flight: set[str] = set()
        self._finished: deque[CompletedGeneration] = deque()

    # ------------------------------------------------------------ requests

    def submit(
        self,
        agent_id: str,
        prompt: str | Sequence[int],
        cache: AgentBlocks | None = None,
        max_tokens: int = 256,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        stop: Sequence[str] | None = None,
    ) -> int:
        """Queue a request. Its blocks are reserved now, so a full pool fails here.

        Args:
            agent_id: A non-empty string naming the agent.
            prompt: Text or token ids, appended after the agent's history.
            cache: The ``blocks`` of the agent's previous completion, or None.
            max_tokens: Most tokens to generate (at least 1).
            sampler: An ``mlx_lm.sample_utils`` sampler; greedy when None.
            logits_processors: ``mlx_lm.sample_utils`` logits processors.
            stop: Strings that end the generation; the text stops before them.

        Returns:
            The request's uid.

        Raises:
            InvalidRequestError: A malformed request; nothing was reserved.
            IncompatibleCacheError: ``cache`` was made for another model.
            PoolExhaustedError: The pool cannot hold prompt plus ``max_tokens``.
        """
        stop = self.check_request(agent_id, max_tokens, stop)
        if cache is not None:
            self._check_cache(agent_id, cache)
        tokens = self.tokenize(prompt, resume=cache is not None and cache.total_tokens > 0)
        base = cache if cache is not None else AgentBlocks.empty(agent_id, self.pool.spec)

        with self._lock:
            if agent_id in self._agents_in_flight:
                raise InvalidRequestError(f"agent {agent_id!r} already has a generation in flight")
            final = base.total_tokens + len(tokens) + max_tokens
            reserved = self.pool.reserve(blocks_to_reserve(self.pool, base, final), agent_id)
            detokenizer = copy.copy(self.tokenizer.detokenizer)
            detokenizer.reset()
            request = _Request(
                next(self._uids),
                agent_id,
                tokens,
                base,
                reserved,
                max_tokens,
                sampler,
                list(logits_processors or []),
                stop,
                detokenizer,
            )
            self._requests[request.uid] = request
            self._agents_in_flight.add(agent_id)
            self._pending.append(request)
            return request.uid

    def check_request(self, agent_id: str, max_tokens: int = 256, stop: Sequence[str] | None = None) -> list[str]:
        """Validate the simple request arguments; returns ``stop`` as a list.

        Raises:
            InvalidRequestError: On a bad agent id, ``max_tokens`` or ``stop``,
                or an agent that already has a generation in flight.
        """
        if not isinstance(agent_id, str) or not agent_id:
            raise InvalidRequestError(f"agent_id must be a non-empty string, got {agent_id!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        stop = list(stop or [])
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop must be a list of non-empty strings")
        with self._lock:
            if agent_id in self._agents_in_flight:
                raise InvalidRequestError(f"agent {agent_id!r} already has a generation in flight")
        return stop

    def cancel(self, uid: int, *, free_blocks: bool = False) -> bool:
        """Stop a request. Its reserved blocks go back to the pool.

        The request ends with a ``"cancelled"`` completion from ``step()``
        whose ``blocks`` is the agent's history as it was before the request,
        or None when ``free_blocks`` frees that history too. A request not yet
        in the batch ends at once; one in the batch at the next step.

        Returns:
            False if no request with this uid is in flight.
        """
        with self._lock:
            request = self._requests.get(uid)
            if request is None:
                return False
            request.cancel, request.free_on_cancel = True, free_blocks
            if request in self._pending:
                self._pending.remove(request)
                self._finished.append(self._end_without_output(request, "cancelled"))
            return True

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet finished."""
        with self._lock:
            return len(self._requests) + len(self._finished)

    # ------------------------------------------------------------ running

    def step(self) -> Iterator[CompletedGeneration]:
        """Run the batch until every request in flight has finished, yielding each as it ends."""
        for event in self.stream():
            if event.completion is not None:
                yield event.completion

    def stream(self) -> Iterator[GenerationEvent]:
        """Like ``step()``, but also yields every generated token with its text delta."""
        while True:
            yield from self._drain_finished()
            self._admit()
            yield from self._drain_finished()
            if not self._active:
                with self._lock:
                    if not self._pending and not self._finished:
                        return
                continue
            try:
                _, responses = self._batch.next()
            except Exception as error:  # the model failed: fail the whole batch
                self._fail_batch(error)
                continue
            for response in responses:
                yield from self._on_token(response)

    @property
    def batch_cache_nbytes(self) -> int:
        """Bytes of KV the running batch holds outside the pool (mlx-lm's working caches)."""
        return self._batch.prompt_cache_nbytes

    def stats(self) -> Any:
        """mlx-lm's ``BatchGenerator.stats()``: a context manager measuring the work inside it."""
        return self._batch.stats()

    def close(self) -> None:
        """Cancel everything in flight and release the generator."""
        with self._lock:
            uids = list(self._requests)
        for uid in uids:
            self.cancel(uid)
        for _ in self.step():
            pass
        self._batch.close()

    # ------------------------------------------------------------ internals

    def _check_cache(self, agent_id: str, cache: AgentBlocks) -> None:
        if not isinstance(cache, AgentBlocks):
            raise InvalidRequestError(f"cache must be AgentBlocks, got {type(cache).__name__}")
        if cache.spec != self.pool.spec:
            raise IncompatibleCacheError("the cache was made for another model's cache layout")
        if cache.agent_id != agent_id:
            raise InvalidRequestError(f"the cache belongs to agent {cache.agent_id!r}, not {agent_id!r}")
        if not self.pool.holds(agent_id, cache.all_blocks()):
            raise InvalidRequestError("the cache's blocks are no longer held by the agent (freed or stale)")

    def tokenize(self, prompt: str | Sequence[int], resume: bool = False) -> list[int]:
        """Token ids for a prompt, as ``submit`` makes them.

        Raises:
            InvalidRequestError: An empty prompt, or ids outside the vocabulary.
        """
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("Prompt cannot be empty")
            bos = getattr(self.tokenizer, "bos_token", None)
            # As mlx-lm does: add special tokens unless the text starts with BOS.
            special = not resume and (bos is None or not prompt.startswith(bos))
            tokens = list(self.tokenizer.encode(prompt, add_special_tokens=special))
        elif isinstance(prompt, Sequence) or isinstance(prompt, mx.array):
            tokens = prompt.tolist() if isinstance(prompt, mx.array) else list(prompt)
            bad = [t for t in tokens if isinstance(t, bool) or not isinstance(t, int) or t < 0]
            if self._vocab is not None:
                bad += [t for t in tokens if isinstance(t, int) and t >= self._vocab]
            if bad:
                raise InvalidRequestError(f"prompt token ids must be ints in [0, vocab size), got {bad[:5]}")
        else:
            raise InvalidRequestError(f"prompt must be a string or token ids, got {type(prompt).__name__}")
        if not tokens:
            raise InvalidRequestError("Prompt cannot be empty")
        return tokens

    def _admit(self) -> None:
        with self._lock:
            admitted = list(self._pending)
            self._pending.clear()
            cancelled = [r for r in self._active.values() if r.cancel]
        for request in cancelled:
            self._batch.remove([request.batch_uid])
            del self._active[request.batch_uid]
            self._finish(self._end_without_output(request, "cancelled"))
        for request in admitted:
            request.admitted_at = time.perf_counter()
            try:
                caches = to_mlx_caches(self.pool, request.base) if request.base.total_tokens else None
                (batch_uid,) = self._batch.insert(
                    [request.prompt],
                    max_tokens=[request.max_tokens],
                    caches=[caches] if caches is not None else None,
                    all_tokens=[list(request.base.token_ids)],
                    samplers=[request.sampler],
                    logits_processors=[request.logits_processors],
                )
            except Exception as error:
                self._finish(self._end_without_output(request, "error", error))
                continue
            request.batch_uid = batch_uid
            self._active[batch_uid] = request

    def _on_token(self, response: Any) -> Iterator[GenerationEvent]:
        request = self._active[response.uid]
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.tokens.append(response.token)
        finish = response.finish_reason
        if not (finish == "stop" and response.token in self._eos):
            request.detokenizer.add_token(response.token)
        if finish is not None:
            request.detokenizer.finalize()
        request.text += request.detokenizer.last_segment
        stop_at = _find_stop(request.text, request.stop)
        if stop_at is not None:
            request.text = request.text[:stop_at]
            finish = "stop"
        # Hold back text that may be the start of a stop string.
        visible = len(request.text) if finish else len(request.text) - _stop_prefix_len(request.text, request.stop)
        delta = request.text[request.emitted : visible]
        request.emitted = max(request.emitted, visible)
        if finish is None:
            yield GenerationEvent(request.uid, request.agent_id, response.token, delta, logprobs=response.logprobs)
            return
        del self._active[response.uid]
        if response.finish_reason is None:  # ended by a stop string: take it out of the batch
            caches, all_tokens = self._batch.remove([response.uid], return_prompt_caches=True)[response.uid]
        else:
            caches, all_tokens = response.prompt_cache, response.all_tokens
        completion = self._complete(request, caches, all_tokens, finish)
        self._release(request)
        yield GenerationEvent(request.uid, request.agent_id, response.token, delta, completion, response.logprobs)

    def _complete(self, request: _Request, caches: list[Any], all_tokens: list[int], finish: str) -> CompletedGeneration:
        try:
            blocks = from_mlx_caches(self.pool, caches, all_tokens, request.base, request.reserved)
        except Exception as error:
            return self._end_without_output(request, "error", error)
        now = time.perf_counter()
        n = len(request.tokens)
        decode_time = now - request.first_token_at
        return CompletedGeneration(
            uid=request.uid,
            agent_id=request.agent_id,
            text=request.text,
            token_ids=list(request.tokens),
            finish_reason=finish,
            blocks=blocks,
            prompt_tokens=len(request.prompt),
            cached_tokens=request.base.total_tokens,
            generation_tokens=n,
            time_to_first_token=request.first_token_at - request.admitted_at,
            generation_tps=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
        )

    def _end_without_output(self, request: _Request, reason: str, error: BaseException | None = None) -> CompletedGeneration:
        """End a request that produced nothing to keep: return its reservation (and history if asked)."""
        reserved = [b for blocks in request.reserved.values() for b in blocks]
        if reserved:
            self.pool.free(reserved, request.agent_id)
        request.reserved = {}
        blocks: AgentBlocks | None = request.base
        if reason == "cancelled" and request.free_on_cancel:
            self.pool.release(request.base)
            blocks = None
        failure = None
        if error is not None:
            failure = GenerationError(f"request {request.uid} of agent {request.agent_id!r} failed: {error}")
            failure.__cause__ = error
        self._release(request)
        return CompletedGeneration(
            uid=request.uid,
            agent_id=request.agent_id,
            text="",
            token_ids=[],
            finish_reason=reason,
            blocks=blocks,
            prompt_tokens=len(request.prompt),
            cached_tokens=request.base.total_tokens,
            generation_tokens=0,
            time_to_first_token=None,
            generation_tps=0.0,
            error=failure,
        )

    def _fail_batch(self, error: BaseException) -> None:
        failed = list(self._active.values())
        self._active.clear()
        self._batch.close()
        self._batch = BatchGenerator(self.model, **self._batch_options)
        for request in failed:
            self._finish(self._end_without_output(request, "error", error))

    def _release(self, request: _Request) -> None:
        with self._lock:
            self._requests.pop(request.uid, None)
            self._agents_in_flight.discard(request.agent_id)

    def _finish(self, completion: CompletedGeneration) -> None:
        with self._lock:
            self._finished.append(completion)

    def _drain_finished(self) -> Iterator[GenerationEvent]:
        while True:
            with self._lock:
                if not self._finished:
                    return
                completion = self._finished.popleft()
            yield GenerationEvent(completion.uid, completion.agent_id, None, "", completion)


def _find_stop(text: str, stops: list[str]) -> int | None:
    hits = [i for s in stops if (i := text.find(s)) >= 0]
    return min(hits) if hits else None


def _stop_prefix_len(text: str, stops: list[str]) -> int:
    """Length of the longest end of ``text`` that begins some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best
