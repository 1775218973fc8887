"""BlockPoolBatchEngine: batched multi-agent generation that resumes agents from the pool.

A request's history is rebuilt from its agent's blocks straight into the
cache the model writes into next (one copy), its prompt is prefilled in
chunks, and it then decodes in the running batch (:mod:`blockpool.batch`,
mlx-lm's own cache classes and step). When it finishes, only the tokens
its blocks do not hold yet are written back.

Memory: every byte of KV is charged to the pool (blocks, the batch's
working caches, copies in flight). A request that does not fit now waits,
first in first out, and is admitted as running requests finish or as room
is reclaimed (cached-free blocks, idle agents a store spills). When decode
growth finds no room, the youngest running request is preempted: its KV
is written back to blocks and it resumes later, exactly where it stopped.
Only a request that could never fit, even alone in an empty pool, is
refused at submit with ``PoolExhaustedError``.

Threads: ``submit`` and ``cancel`` may be called from any thread; they
validate and queue. All model work happens in the one thread that drives
``tick()`` (``step()`` and ``stream()`` are loops over it); another thread
that tries to drive at the same time gets ``EngineBusyError``. Driving is
resumable at any point: events not yet handed out stay queued.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream
from mlx_lm.generate_utils import BatchCounters, BatchCountersSnapshot, BatchStats

from blockpool.attention import blocks_for
from blockpool.batch import (
    DecodeBatch,
    LogitsProcessor,
    Row,
    Sampler,
)
from blockpool.block import AgentBlocks
from blockpool.cache_conversion import (
    can_resume,
    extend_blocks,
    file_to_mlx_caches,
    plan_extension,
    to_mlx_caches,
    truncate,
)
from blockpool.errors import (
    EngineBusyError,
    GenerationError,
    IncompatibleCacheError,
    InvalidRequestError,
    PoolExhaustedError,
)
from blockpool.persistence import AgentFile
from blockpool.pool import BlockPool
from blockpool.prompt import to_token_ids, vocab_size_of
from blockpool.spec import ModelCacheSpec
from blockpool.working_memory import WorkingMemory

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


@dataclass(eq=False)
class DeferredCache:
    """A history the engine fetches only when the request is admitted.

    Its owner (``AgentMemory``) keeps the cache until then, free to spill it
    to disk while the request waits for room. ``token_ids`` are the history
    tokens the request resumes from; ``fetch()`` (called once, on the
    engine's thread, at admission) returns what holds them: a handle, an
    ``AgentFile``, or None if they were dropped (they are prefilled again).
    ``prefetch()`` is called while the request is next in line, so that a
    disk read can start before it is needed.
    """

    agent_id: str
    spec: ModelCacheSpec
    token_ids: list[int]
    fetch: Callable[[], AgentBlocks | AgentFile | None]
    prefetch: Callable[[], None] = lambda: None
    pool_bytes: int = 0  # bytes admitting it adds to the budget (a file still to be read), if known


@dataclass(eq=False)
class _Admission:
    """Requests admitted together: their prompts are prefilled as one batch, then join the running batch."""

    requests: list[_Request]
    batch: DecodeBatch


@dataclass(eq=False)
class _Request:
    uid: int
    agent_id: str
    prompt: list[int]
    source: AgentBlocks | AgentFile | DeferredCache | None  # what the history resumes from, as submitted
    keep: int  # history tokens of ``source`` to resume from
    max_tokens: int
    sampler: Sampler | None
    logits_processors: list[LogitsProcessor]
    stop: list[str]
    detokenizer: Any
    progress: ProgressCallback | None
    cached_tokens: int
    submitted_at: float = field(default_factory=time.perf_counter)
    admitted_at: float | None = None
    first_token_at: float | None = None
    order: int = 0  # admission order: the youngest is preempted first
    caches: list[Any] | None = None  # while prefilling
    prefilled: int = 0
    tokens: list[int] = field(default_factory=list)
    pending: tuple[int, mx.array] | None = None  # sampled before a preemption, not yet emitted
    row: Row | None = None
    text: str = ""
    detokenized: int = 0  # tokens the detokenizer has seen
    emitted: int = 0
    cancel: bool = False
    free_on_cancel: bool = False
    preemptions: int = 0

    history: list[int] = field(default_factory=list)  # the history's token ids at submit
    last_event: GenerationEvent | None = None
    base: AgentBlocks | None = None  # the history in the pool, from admission on
    file: AgentFile | None = None  # a history read from disk, until its caches are built

    @property
    def all_tokens(self) -> list[int]:
        return self.history + self.prompt + self.tokens


class BlockPoolBatchEngine:
    """Continuous-batching generation for many agents over one :class:`BlockPool`.

    Args:
        model: A model from ``mlx_lm.load``.
        tokenizer: The tokenizer ``mlx_lm.load`` returned with it.
        pool: The pool holding every agent's blocks, made for this model;
            its budget bounds all KV this engine holds.
        completion_batch_size: Most sequences decoded together.
        prefill_batch_size: Most requests admitted, and prefilled, together (mlx-lm's default).
        prefill_step_size: Prompt tokens per prefill chunk (mlx-lm's default).
        max_waiting: Most requests waiting for room; beyond it ``submit``
            raises ``PoolExhaustedError`` (None: no limit).

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
        max_waiting: int | None = None,
    ):
        for name, value in (("completion_batch_size", completion_batch_size), ("prefill_batch_size", prefill_batch_size),
                            ("prefill_step_size", prefill_step_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InvalidRequestError(f"{name} must be an integer >= 1, got {value!r}")
        if max_waiting is not None and (isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0):
            raise InvalidRequestError(f"max_waiting must be None or an integer >= 0, got {max_waiting!r}")
        spec = ModelCacheSpec.from_model(model)
        if spec != pool.spec:
            raise IncompatibleCacheError("the pool was made for another model's cache layout")
        self.model, self.tokenizer, self.pool, self.spec = model, tokenizer, pool, spec
        self.completion_batch_size = completion_batch_size
        self.prefill_batch_size = prefill_batch_size
        self.prefill_step_size = prefill_step_size
        self.max_waiting = max_waiting
        self._eos = set(tokenizer.eos_token_ids)
        self.vocab_size = vocab_size_of(model)  # token ids the model embeds (None: unknown)
        self._memory = WorkingMemory(spec, prefill_step_size)
        self._lock = threading.RLock()
        self._uids = itertools.count()
        self._order = itertools.count()
        self._waiting: deque[_Request] = deque()
        self._admission: _Admission | None = None  # requests admitted together, their prompts being prefilled
        self._deltas = True  # whoever drives wants per-token text (stream, tick); step() does not
        self._batch = DecodeBatch(model, spec)
        self._requests: dict[int, _Request] = {}  # by uid, until finished
        self._agents_in_flight: set[str] = set()
        self._events: deque[GenerationEvent] = deque()
        self._driver: int | None = None  # thread id driving the engine
        self._drivers = 0  # nested drives on that thread
        self._counters = BatchCounters()
        self._join_reserved = 0
        self._hold_admissions = False
        self._closed = False

    # ------------------------------------------------------------ requests

    def submit(
        self,
        agent_id: str,
        prompt: str | Sequence[int],
        cache: AgentBlocks | None = None,
        max_tokens: int = 256,
        sampler: Sampler | None = None,
        logits_processors: Sequence[LogitsProcessor] | None = None,
        stop: str | Sequence[str] | None = None,
        prompt_progress_callback: ProgressCallback | None = None,
        keep_tokens: int | None = None,
    ) -> int:
        """Queue a request. It runs as soon as there is room; nothing is reserved now.

        Args:
            agent_id: A non-empty string naming the agent.
            prompt: Text or token ids, appended after the agent's history.
            cache: The ``blocks`` of the agent's previous completion, or None.
                It is consumed: pass the newest handle each time. An
                ``AgentFile`` (an agent loaded from disk) is imported into the
                pool when the request is admitted.
            max_tokens: Most tokens to generate (at least 1).
            sampler: An ``mlx_lm.sample_utils`` sampler; greedy when None.
            logits_processors: ``mlx_lm.sample_utils`` logits processors.
            stop: A string or strings that end the generation; the text stops before them.
            prompt_progress_callback: Called with ``(processed, total)`` prompt
                tokens as the prompt is prefilled, as mlx-lm does.
            keep_tokens: Resume from only the first ``keep_tokens`` tokens of
                ``cache`` (the rest is freed when the request starts); all of
                it when None.

        Returns:
            The request's uid.

        Raises:
            InvalidRequestError: A malformed request, or a stale, consumed or
                foreign cache handle; nothing was changed.
            IncompatibleCacheError: ``cache`` was made for another model.
            PoolExhaustedError: The request could never fit the pool's budget,
                or ``max_waiting`` requests are already waiting.
        """
        stop = self.check_request(agent_id, max_tokens, stop)
        if logits_processors is not None and not all(callable(p) for p in logits_processors):
            raise InvalidRequestError("logits_processors must be callables")
        if sampler is not None and not callable(sampler):
            raise InvalidRequestError("sampler must be a callable")
        if prompt_progress_callback is not None and not callable(prompt_progress_callback):
            raise InvalidRequestError("prompt_progress_callback must be a callable")
        history = self._check_cache(agent_id, cache, keep_tokens)
        tokens = self.tokenize(prompt, resume=bool(history))
        self._check_fits(len(history), len(tokens), max_tokens)
        with self._lock:
            if self._closed:
                raise InvalidRequestError("the engine is closed")
            if agent_id in self._agents_in_flight:
                raise InvalidRequestError(f"agent {agent_id!r} already has a generation in flight")
            if isinstance(cache, AgentBlocks) and cache.consumed:
                raise InvalidRequestError("this cache handle was already submitted (consumed): pass the newest one")
            if self.max_waiting is not None and len(self._waiting) >= self.max_waiting:
                raise PoolExhaustedError(
                    self._blocks_for_request(len(history), len(tokens), max_tokens),
                    self.pool.available_blocks(),
                    f"while {len(self._waiting)} requests already wait for room (max_waiting={self.max_waiting})",
                )
            detokenizer = copy.copy(self.tokenizer.detokenizer)
            detokenizer.reset()
            request = _Request(
                next(self._uids), agent_id, tokens, cache, len(history), max_tokens, sampler, list(logits_processors or []),
                stop, detokenizer, prompt_progress_callback, len(history), history=history,
            )
            if isinstance(cache, AgentBlocks):
                cache.consumed = True
            self._requests[request.uid] = request
            self._agents_in_flight.add(agent_id)
            self._waiting.append(request)
            return request.uid

    def check_request(self, agent_id: str, max_tokens: int = 256, stop: str | Sequence[str] | None = None) -> list[str]:
        """Validate the simple request arguments; returns ``stop`` as a list.

        Raises:
            InvalidRequestError: On a bad agent id, ``max_tokens`` or ``stop``,
                or an agent that already has a generation in flight.
        """
        if not isinstance(agent_id, str) or not agent_id:
            raise InvalidRequestError(f"agent_id must be a non-empty string, got {agent_id!r}")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
        if isinstance(stop, str):
            stop = [stop]
        try:
            stop = list(stop or [])
        except TypeError:
            raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}") from None
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidRequestError("stop must be a string or a list of non-empty strings")
        with self._lock:
            if agent_id in self._agents_in_flight:
                raise InvalidRequestError(f"agent {agent_id!r} already has a generation in flight")
        return stop

    def cancel(self, uid: int, *, free_blocks: bool = False) -> bool:
        """Stop a request, waiting, prefilling, running or preempted; everything it held is returned.

        The request ends with a ``"cancelled"`` completion whose ``blocks``
        is the agent's history as it was before the request, or None when
        ``free_blocks`` frees that history too. A waiting request ends at
        once; one being worked on at the next iteration.

        Returns:
            False if no request with this uid is in flight.
        """
        with self._lock:
            request = self._requests.get(uid)
            if request is None or request.cancel:
                return request is not None
            request.cancel, request.free_on_cancel = True, free_blocks
            if request in self._waiting:
                self._waiting.remove(request)
                self._end_without_output(request, "cancelled")
            return True

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet handed out as completed."""
        with self._lock:
            return len(self._requests) + sum(1 for e in self._events if e.completion is not None)

    def waiting_uids(self) -> list[int]:
        """The uids of the requests waiting for room, first in line first."""
        with self._lock:
            return [r.uid for r in self._waiting]

    def request_state(self, uid: int) -> RequestState | None:
        """Where a request in flight is (None once it has ended)."""
        with self._lock:
            request = self._requests.get(uid)
            if request is None:
                return None
            if request in self._waiting:
                state = "waiting"
            elif self._admission is not None and request in self._admission.requests:
                state = "prefilling"
            else:
                state = "running"
            return RequestState(state, request.preemptions, len(request.tokens))

    def request_tokens(self, uid: int) -> int:
        """Tokens a request's agent will hold if it ended now (history, prompt, generated); 0 if unknown."""
        with self._lock:
            request = self._requests.get(uid)
            return 0 if request is None else request.keep + len(request.prompt) + len(request.tokens)

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        with self._lock:
            return len(self._waiting)

    # ------------------------------------------------------------ running

    def step(self) -> Iterator[CompletedGeneration]:
        """Run until every request in flight has finished, yielding each as it ends.

        Resumable: leaving the loop early loses nothing; the next call goes on.
        """
        for event in self._run(deltas=False):
            if event.completion is not None:
                yield event.completion

    def stream(self) -> Iterator[GenerationEvent]:
        """Like ``step()``, but also yields every generated token with its text delta."""
        yield from self._run(deltas=True)

    def _run(self, deltas: bool) -> Iterator[GenerationEvent]:
        with self._driving():
            while True:
                while True:
                    with self._lock:
                        if not self._events:
                            break
                        event = self._events.popleft()
                    yield event
                if not self._has_work():
                    return
                self._deltas = deltas
                self._advance()

    def tick(self) -> list[GenerationEvent]:
        """One iteration: admit what fits, one prefill chunk, one decode step. Returns its events.

        For callers that interleave their own work (a server) with the engine's.
        """
        with self._driving():
            if self._has_work():
                self._deltas = True
                self._advance()
            with self._lock:
                events = list(self._events)
                self._events.clear()
            return events

    @property
    def batch_cache_nbytes(self) -> int:
        """Bytes of KV the running requests hold outside blocks (their working caches)."""
        return self._batch.nbytes + (self._admission.batch.nbytes if self._admission else 0)

    @contextlib.contextmanager
    def stats(self) -> Iterator[BatchStats]:
        """mlx-lm's ``BatchStats`` for the work done while the block runs (prompt and decode tokens, speeds)."""
        stats = BatchStats()
        start = BatchCountersSnapshot(**asdict(self._counters))
        try:
            yield stats
        finally:
            stats += BatchCountersSnapshot.between(start, BatchCountersSnapshot(**asdict(self._counters)))

    def close(self) -> None:
        """Cancel everything in flight and give back every byte it held."""
        with self._lock:
            uids = list(self._requests)
        for uid in uids:
            self.cancel(uid)
        for _ in self.step():
            pass
        with self._lock:
            self._closed = True
        self.pool.charge(self, 0)

    # ------------------------------------------------------------ validation

    def _check_cache(self, agent_id: str, cache: AgentBlocks | AgentFile | None, keep_tokens: int | None) -> list[int]:
        """Validate what a request resumes from; returns the history's token ids."""
        if cache is None:
            if keep_tokens not in (None, 0):
                raise InvalidRequestError("keep_tokens needs a cache to keep tokens of")
            return []
        if isinstance(cache, DeferredCache):
            if cache.spec != self.spec:
                raise IncompatibleCacheError("the cache was made for another model's cache layout")
            if keep_tokens not in (None, len(cache.token_ids)):
                raise InvalidRequestError("a deferred cache keeps exactly its token_ids")
            keep_tokens = None
        elif isinstance(cache, AgentFile):
            if cache.spec != self.spec:
                raise IncompatibleCacheError("the agent file was written for another model's cache layout")
            if (cache.kv_bits, cache.kv_group_size if cache.kv_bits else None) != (
                self.pool.kv_bits, self.pool.kv_group_size if self.pool.kv_bits else None
            ):
                raise IncompatibleCacheError(f"the agent file was stored with kv_bits={cache.kv_bits}, the pool uses {self.pool.kv_bits}")
        elif isinstance(cache, AgentBlocks):
            if cache.spec != self.spec:
                raise IncompatibleCacheError("the cache was made for another model's cache layout")
            if cache.pool_id is not None and cache.pool_id != self.pool.id:
                raise InvalidRequestError("the cache handle belongs to another pool")
            if cache.consumed or not self.pool.is_current(cache):
                raise InvalidRequestError("this cache handle is stale (already submitted, or a newer one was issued): "
                                          "pass the newest one")
            if not self.pool.holds(cache.agent_id, cache.all_blocks()):
                raise InvalidRequestError("the cache's blocks are no longer held by the agent (freed or stale)")
        else:
            raise InvalidRequestError(f"cache must be AgentBlocks, got {type(cache).__name__}")
        if cache.agent_id != agent_id:
            raise InvalidRequestError(f"the cache belongs to agent {cache.agent_id!r}, not {agent_id!r}")
        total = len(cache.token_ids)
        keep = total if keep_tokens is None else keep_tokens
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= total:
            raise InvalidRequestError(f"keep_tokens must be an integer in [0, {total}], got {keep_tokens!r}")
        return list(cache.token_ids[:keep])

    def tokenize(self, prompt: str | Sequence[int], resume: bool = False) -> list[int]:
        """Token ids for a prompt, as ``submit`` makes them (see :func:`blockpool.prompt.to_token_ids`).

        ``resume``: the text follows a cached history, so no special tokens are added.

        Raises:
            InvalidRequestError: An empty prompt, bytes, ids outside the vocabulary, ...
        """
        return to_token_ids(self.tokenizer, prompt, vocab_size=self.vocab_size, resume=resume)

    # ------------------------------------------------------------ memory

    def _working_estimate(self, total: int, rows: int = 1) -> int:
        return self._memory.caches(total, rows)

    def _layer_estimate(self, total: int, rows: int) -> int:
        return self._memory.layer_copy(total, rows)

    def _blocks_for_request(self, history: int, prompt_tokens: int, max_tokens: int) -> int:
        final = history + prompt_tokens + max_tokens
        return sum(self.spec.blocks_held(i, final) for i in range(self.spec.num_layers))

    def request_bytes(self, history_tokens: int, prompt_tokens: int, max_tokens: int) -> int:
        """The most memory a request can take alone: its blocks, its working cache and one layer's copy.

        ``submit`` refuses a request for which this exceeds the pool's budget.
        """
        return self._need_alone(history_tokens + prompt_tokens + max_tokens)

    def fits_ever(self, history_tokens: int, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether such a request could finish alone in an empty pool (else ``submit`` refuses it)."""
        return self.request_bytes(history_tokens, prompt_tokens, max_tokens) <= self.pool.total_bytes

    def _need_alone(self, final: int) -> int:
        return self._memory.request(final, [self.pool.bytes_per_block(i) for i in range(self.spec.num_layers)])

    def _check_fits(self, history: int, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request that could not finish even alone in an empty pool."""
        final = history + prompt_tokens + max_tokens
        need = self._need_alone(final)
        if need > self.pool.total_bytes:
            raise PoolExhaustedError(
                self._blocks_for_request(history, prompt_tokens, max_tokens),
                self.pool.total_blocks,
                f"(history + prompt + max_tokens = {final} tokens: {need} bytes of blocks and working caches, "
                f"more than the pool's whole budget of {self.pool.total_bytes} bytes)",
            )

    def _charge(self) -> None:
        """Charge what the working caches really hold, plus room kept for the prefilling request to join.

        Room is made before anything grows; this records the result, even if
        an estimate fell short (the pool then admits nothing until it drops).
        """
        self.pool.charge(self, self.batch_cache_nbytes + self._join_reserved, force=True)

    def _room_for(self, extra: int) -> bool:
        """Whether ``extra`` more bytes fit the budget, making room if needed (not preempting).

        Nothing is held: the engine's thread is the only one that allocates,
        and it allocates right after asking.
        """
        return self.pool.make_room(extra)

    # ------------------------------------------------------------ the loop

    @contextlib.contextmanager
    def _driving(self) -> Iterator[None]:
        me = threading.get_ident()
        with self._lock:
            if self._driver not in (None, me):
                raise EngineBusyError("another thread is driving this engine (step, stream or tick); "
                                      "drive it from one thread and submit from any")
            self._driver = me
            self._drivers += 1
        try:
            yield
        finally:
            with self._lock:
                self._drivers -= 1
                if self._drivers == 0:
                    self._driver = None

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._waiting or self._admission or len(self._batch) or self._events)

    def _advance(self) -> None:
        with mx.stream(generation_stream):
            self._cancel_flagged()
            busy = bool(len(self._batch))
            if busy:
                self._decode()
            busy = self._prefill() or busy
        if not busy:  # everything waits for room that background work (a spill) is freeing
            self.pool.wait_for_release(0.05)

    def _cancel_flagged(self) -> None:
        admission = self._admission
        if admission is not None and any(r.cancel for r in admission.requests):
            gone = [i for i, r in enumerate(admission.requests) if r.cancel]
            ended = [admission.requests[i] for i in gone]
            if len(gone) == len(admission.requests):
                self._drop_admission(reason="cancelled")
            else:
                admission.batch.remove(gone)
                admission.requests = [r for r in admission.requests if not r.cancel]
                for request in ended:
                    self._end_without_output(request, "cancelled")
                self._charge()
        rows = [i for i, row in enumerate(self._batch.rows) if row.owner.cancel]
        if rows:
            gone_requests = [self._batch.rows[i].owner for i in rows]
            self._batch.remove(rows)
            for request in gone_requests:
                self._end_without_output(request, "cancelled")
            self._charge()

    def _decode(self) -> None:
        """One decode step for the batch; a failure (or an interrupt) ends the running requests, histories kept."""
        try:
            growth = self._batch.growth_bytes()
            if growth:
                self._make_growth_room(growth)
            tic = time.perf_counter()
            self._batch.grow()
            results = self._batch.step()
            self._counters.decode_time += time.perf_counter() - tic
            self._counters.generation_tokens += len(results)
            self._counters.generation_steps += 1
            self._charge()
            finished: list[tuple[int, _Request, str]] = []
            for index, (row, token, logprobs) in enumerate(results):
                request = row.owner
                finish = self._on_token(request, token, logprobs)
                if finish is not None:
                    finished.append((index, request, finish))
            if finished:
                self._finish_rows(finished)
        except BaseException as error:
            self._fail_batch(error)
            if not isinstance(error, Exception):
                raise

    def _make_growth_room(self, growth: int) -> None:
        """Make room for the batch to grow, preempting the youngest requests if nothing else frees enough."""
        while not self._room_for(growth + self._layer_estimate(self._batch_tokens(), len(self._batch))):
            if len(self._batch) <= 1:
                # Alone it was checked to fit at submit; run over by at most one step rather than stall.
                self.pool.charge(self, self.pool.working_bytes(self) + growth, force=True)
                return
            youngest = max(range(len(self._batch)), key=lambda i: self._batch.rows[i].owner.order)
            self._preempt(youngest)
            self._hold_admissions = True  # no admission until something ends: else it would thrash
            growth = self._batch.growth_bytes()
            if not growth:
                return

    def _batch_tokens(self) -> int:
        """The longest row's tokens, from the requests' own counts (reading the caches would wait on the step in flight)."""
        return max((row.owner.keep + len(row.owner.prompt) + len(row.owner.tokens) for row in self._batch.rows), default=0)

    def _on_token(self, request: _Request, token: int, logprobs: mx.array) -> str | None:
        """Record one generated token; returns the finish reason when the request ends here."""
        if request.first_token_at is None:
            request.first_token_at = time.perf_counter()
        request.tokens.append(token)
        finish = None
        if token in self._eos:
            finish = "stop"
        elif len(request.tokens) >= request.max_tokens:
            finish = "length"
        if finish is None and not self._deltas and not request.stop:
            return None  # step() shows no per-token text: detokenize later, in one go (same text)
        self._detokenize(request, finish)
        stop_at = _find_stop(request.text, request.stop)
        if stop_at is not None:
            request.text = request.text[:stop_at]
            if finish is None:
                request.detokenizer.finalize()
            finish = "stop"
        # Hold back text that may be the start of a stop string.
        visible = len(request.text) if finish else len(request.text) - _stop_prefix_len(request.text, request.stop)
        delta = request.text[request.emitted : visible]
        request.emitted = max(request.emitted, visible)
        event = GenerationEvent(request.uid, request.agent_id, token, delta, logprobs=logprobs)
        request.last_event = event  # a finishing token's event carries the completion too
        with self._lock:
            self._events.append(event)
        return finish

    @staticmethod
    def _detokenize(request: _Request, finish: str | None = None) -> None:
        """Feed the detokenizer the tokens it has not seen (an end-of-sequence token is not text)."""
        tokens = request.tokens[request.detokenized :]
        if finish == "stop" and tokens:
            tokens = tokens[:-1]
        for token in tokens:
            request.detokenizer.add_token(token)
        request.detokenized = len(request.tokens)
        if finish is not None:
            request.detokenizer.finalize()
        request.text += request.detokenizer.last_segment

    def _finish_rows(self, finished: list[tuple[int, _Request, str]]) -> None:
        completions = []
        for index, request, reason in finished:
            try:
                blocks = self._write_back(request, index)
            except Exception as error:
                completions.append((request, None, "error", error))
                continue
            completions.append((request, blocks, reason, None))
        self._batch.remove([index for index, _, _ in finished])
        self._charge()
        for request, blocks, reason, error in completions:
            if error is not None:
                self._end_without_output(request, "error", error)
            else:
                self._complete(request, blocks, reason)

    def _write_back(self, request: _Request, index: int) -> AgentBlocks:
        """Store the tokens of row ``index`` its agent's blocks do not hold yet; returns the new handle."""
        sources, ring = self._batch.row_caches(index)
        tokens = request.all_tokens
        total = self._batch.row_tokens(index)
        if total != len(tokens):
            raise GenerationError(f"the cache holds {total} tokens, the request {len(tokens)}")
        plans = plan_extension(self.pool, request.base, total)
        return extend_blocks(self.pool, request.base, plans, dict(enumerate(sources)), tokens, ring, force=True)

    def _preempt(self, index: int) -> None:
        """Move a running request out of the batch: its KV to blocks, itself to the head of the queue."""
        request = self._batch.rows[index].owner
        pending = self._batch.pending(index)
        try:
            blocks = self._write_back(request, index)
        except Exception as error:
            self._batch.remove([index])
            self._charge()
            self._end_without_output(request, "error", error)
            return
        self._batch.remove([index])
        self._charge()
        request.base = blocks
        request.pending = pending
        request.row = None
        request.preemptions += 1
        with self._lock:
            self._waiting.appendleft(request)

    def _prefill(self) -> bool:
        """Admit what fits from the head of the queue, then run one prefill chunk of the admitted group
        (or, once its prompts are in, launch their first tokens and join them to the running batch).

        Returns whether anything was done.
        """
        if self._admission is None:
            if len(self._batch) >= self.completion_batch_size:
                return False
            waiting = self.waiting
            if not self._admit():
                return self.waiting != waiting  # a request that can never run was ended
            if self._admission is None:
                return True  # a preempted request went straight back into the batch
        admission = self._admission
        try:
            self._prefill_step(admission)
        except BaseException as error:
            if self._admission is admission:
                self._drop_admission(error)
            else:  # it failed while joining the batch: the batch's state is unknown
                self._fail_batch(error)
            if not isinstance(error, Exception):
                raise
        return True

    def _admit(self) -> bool:
        """Admit the head of the queue, and the requests behind it that fit too (up to
        ``prefill_batch_size``), as one group whose prompts are prefilled together."""
        with self._lock:
            if not self._waiting or (self._hold_admissions and len(self._batch)):
                return False
            queue = list(itertools.islice(self._waiting, self.prefill_batch_size))
        head = queue[0]
        if head.pending is not None:  # preempted: it comes back alone, with the token it had sampled
            return self._readmit(head)
        group: list[_Request] = []
        totals: list[int] = []
        extra = 0
        for request in queue:
            if (request.pending is not None or len(group) >= self.prefill_batch_size
                    or len(self._batch) + len(group) >= self.completion_batch_size):
                break
            total = request.keep + len(request.prompt)
            bytes_in = self._history_bytes(request)
            rows, longest = len(group) + 1, max(totals + [total])
            need = (self._working_estimate(longest, rows) + self._join_estimate(longest, rows)
                    + self._layer_estimate(max(longest, self._batch_tokens()), len(self._batch) + rows) + extra + bytes_in)
            if not group:
                if not self._room_for(need):
                    self._check_not_stuck(request, need)
                    return False
            elif not self.pool.make_room(need, reclaim=False):
                break  # batch only what fits as it is: never spill to prefill more at once
            group.append(request)
            totals.append(total)
            extra += bytes_in
        with self._lock:
            if list(self._waiting)[: len(group)] != group:
                return False
            for _ in group:
                self._waiting.popleft()
        rows, caches, last = [], [], []
        for request in group:
            request.admitted_at = request.admitted_at or time.perf_counter()
            request.order = next(self._order)
            try:
                request.caches = self._rebuild(request, spare=len(request.prompt))
            except BaseException as error:
                request.caches = None
                self._end_without_output(request, "error", error)
                if not isinstance(error, Exception):
                    for other in group[group.index(request) + 1 :]:
                        self._end_without_output(other, "error", error)
                    self._charge()
                    raise
                continue
            request.row = Row(request, request.sampler, request.logits_processors,
                              context=request.history + request.prompt[:-1])
            rows.append(request.row)
            caches.append(request.caches)
            last.append(request.prompt[-1])
            if request.progress:
                request.progress(0, len(request.prompt))
        admitted = [r for r in group if r.caches is not None]
        if not admitted:
            self._charge()
            return True
        batch = DecodeBatch.for_prompts(self.model, self.spec, rows, caches, last)
        for request in admitted:
            request.caches = None  # the prompt batch holds them now
        self._admission = _Admission(admitted, batch)
        longest = max(r.keep + len(r.prompt) for r in admitted)
        self._join_reserved = self._join_estimate(longest, len(admitted))
        self._charge()
        return True

    def _readmit(self, request: _Request) -> bool:
        """A preempted request back into the running batch: its blocks rebuilt, its sampled token next."""
        total = request.base.total_tokens
        need = self._working_estimate(total) + self._join_estimate(total, 1) + self._layer_estimate(
            max(total, self._batch_tokens()), len(self._batch) + 1)
        if not self._room_for(need):
            self._check_not_stuck(request, need)
            return False
        with self._lock:
            if not self._waiting or self._waiting[0] is not request:
                return False
            self._waiting.popleft()
        request.order = next(self._order)
        token, logprobs = request.pending
        request.pending = None
        try:
            caches = self._rebuild(request, spare=1)
        except BaseException as error:
            self._end_without_output(request, "error", error)
            self._charge()
            if not isinstance(error, Exception):
                raise
            return True
        request.row = Row(request, request.sampler, request.logits_processors, context=request.all_tokens)
        try:
            self._batch.join(request.row, caches, mx.array([token], dtype=mx.uint32), logprobs)
        except BaseException as error:  # the batch's state is unknown: end it, this request with it
            if request.row not in self._batch.rows:
                self._batch.rows.append(request.row)
            self._fail_batch(error)
            if not isinstance(error, Exception):
                raise
        self._charge()
        return True

    def _rebuild(self, request: _Request, spare: int) -> list[Any]:
        """The request's caches, rebuilt from its history (one copy), with room for ``spare`` more tokens."""
        if request.base is None:
            self._materialize(request)
        if request.file is not None:
            caches = file_to_mlx_caches(request.file, request.keep, spare_tokens=spare)
            request.file = None
            return caches
        if request.base.total_tokens:
            return to_mlx_caches(self.pool, request.base, spare_tokens=spare)
        return [self.spec.rules(i).new_cache() for i in range(self.spec.num_layers)]

    def _history_bytes(self, request: _Request) -> int:
        """Memory a waiting request's history takes in transit at admission (a file, a deferred cache)."""
        if request.base is not None:
            return 0
        if isinstance(request.source, AgentFile):
            return self._file_bytes(request.source)
        if isinstance(request.source, DeferredCache):
            request.source.prefetch()
            return request.source.pool_bytes
        return 0

    def _file_bytes(self, file: AgentFile) -> int:
        """Pool bytes an agent file takes once imported."""
        total = len(file.token_ids)
        b = self.spec.block_tokens
        return sum(
            (blocks_for(total, b) - file.first_token[i] // b) * self.pool.bytes_per_block(i) for i in range(self.spec.num_layers)
        )

    def _materialize(self, request: _Request) -> None:
        """Bring the request's history into the pool at admission: import a file, cut to ``keep``.

        If a sliding-window layer cannot serve the kept prefix (its older
        tokens are gone), the history is dropped and prefilled again instead:
        slower, never wrong.
        """
        source = request.source
        if isinstance(source, DeferredCache):
            source = source.fetch()
            if source is not None:
                self._check_cache(request.agent_id, source, request.keep)
                if list(source.token_ids[: request.keep]) != request.history:
                    raise GenerationError("the deferred cache does not hold the history it promised")
        if source is None:
            if request.keep:  # the history was dropped while the request waited: prefill it again
                request.prompt = request.history + request.prompt
                request.history, request.keep, request.cached_tokens = [], 0, 0
            request.base = AgentBlocks.empty(request.agent_id, self.spec)
            return
        if isinstance(source, AgentFile):
            # Straight from the file into the caches, as one copy: the history's blocks are written at
            # the end of the request, with its new tokens.
            if not can_resume(source, request.keep):
                source = None
                request.prompt = request.history + request.prompt
                request.history, request.keep, request.cached_tokens = [], 0, 0
            request.file = source
            request.base = AgentBlocks.empty(request.agent_id, self.spec)
            return
        handle = source
        base = handle if request.keep == handle.total_tokens else truncate(self.pool, handle, request.keep)
        if base is None:
            self.pool.release(handle)
            request.prompt = request.history + request.prompt
            request.history, request.keep, request.cached_tokens = [], 0, 0
            base = AgentBlocks.empty(request.agent_id, self.spec)
        request.base = base

    def _join_estimate(self, total: int, rows: int) -> int:
        """Working bytes ``rows`` sequences of up to ``total`` tokens add when they join the batch."""
        if not len(self._batch):
            return 0
        longest = max(total, self._batch_tokens())
        return max(0, self._working_estimate(longest, len(self._batch) + rows) - self._batch.nbytes)

    def _check_not_stuck(self, request: _Request, need: int) -> None:
        """End the head request if nothing running or pending can ever make room for it.

        Not while completions wait to be handed out: their owner may free
        their blocks as it receives them.
        """
        if len(self._batch) or self._admission is not None or self.pool.releasing_bytes:
            return
        with self._lock:
            if any(e.completion is not None for e in self._events):
                return
        with self._lock:
            if not self._waiting or self._waiting[0] is not request:
                return
            self._waiting.popleft()
        unit = self.pool.total_bytes / self.pool.total_blocks  # the pool's block, on average over layers
        error = PoolExhaustedError(
            -(-need // int(unit)),
            self.pool.available_blocks(),
            "(in block-sized units: its new blocks, working cache and copies in flight) to start, and nothing "
            "running or reclaimable can free more: the rest of the pool is held outside the engine (callers' "
            "handles, other agents' caches)",
        )
        self._end_without_output(request, "error", error)

    def _prefill_step(self, admission: _Admission) -> None:
        """One prefill chunk for the admitted group; or, once every prompt is in but its last token,
        that last token for all, launching each request's first generated token, as mlx-lm does."""
        batch, requests = admission.batch, admission.requests
        chunks = []
        for request in requests:
            remaining = len(request.prompt) - 1 - request.prefilled  # the last token goes to the first step
            n = min(self.prefill_step_size, max(0, remaining))
            chunks.append(request.prompt[request.prefilled : request.prefilled + n])
        if any(chunks):
            tic = time.perf_counter()
            self._counters.prompt_tokens += batch.prefill(chunks)
            self._counters.prompt_time += time.perf_counter() - tic
            for request, chunk in zip(requests, chunks):
                request.prefilled += len(chunk)
                if request.progress and chunk:
                    request.progress(request.prefilled, len(request.prompt))
            self._charge()
            return
        tic = time.perf_counter()
        batch.step()  # reads back the prompts' last tokens and launches the first generated ones
        self._counters.prompt_time += time.perf_counter() - tic
        for request in requests:
            request.prefilled = len(request.prompt)
            if request.progress:
                request.progress(len(request.prompt), len(request.prompt))
        self._batch.absorb(batch)
        self._admission = None
        self._join_reserved = 0
        self._charge()

    def _drop_admission(self, error: BaseException | None = None, reason: str = "error") -> None:
        """End the admitted group (its prefill failed) and free the working memory it held."""
        admission, self._admission = self._admission, None
        self._join_reserved = 0
        self._charge()
        for request in admission.requests if admission else []:
            self._end_without_output(request, reason, error)

    # ------------------------------------------------------------ endings

    def _complete(self, request: _Request, blocks: AgentBlocks, finish: str) -> None:
        now = time.perf_counter()
        n = len(request.tokens)
        decode_time = now - (request.first_token_at or now)
        completion = CompletedGeneration(
            uid=request.uid,
            agent_id=request.agent_id,
            text=request.text,
            token_ids=list(request.tokens),
            finish_reason=finish,
            blocks=blocks,
            prompt_tokens=len(request.prompt),
            cached_tokens=request.cached_tokens,
            generation_tokens=n,
            time_to_first_token=(request.first_token_at - request.admitted_at) if request.first_token_at and request.admitted_at else None,
            generation_tps=(n - 1) / decode_time if n > 1 and decode_time > 0 else 0.0,
            queued_seconds=(request.admitted_at or now) - request.submitted_at,
            preemptions=request.preemptions,
        )
        self._release(request)
        with self._lock:
            if request.last_event is not None and request.last_event in self._events:
                request.last_event.completion = completion
            else:
                self._events.append(GenerationEvent(request.uid, request.agent_id, None, "", completion))

    def _end_without_output(self, request: _Request, reason: str, error: BaseException | None = None) -> None:
        """End a request whose new tokens are not kept: its history handle goes back to the caller."""
        blocks: AgentBlocks | None = None
        if request.base is not None:
            blocks = _reissue(self.pool, request.base)
            if blocks.total_tokens > request.cached_tokens:  # preempted: give back the history before the request
                blocks = truncate(self.pool, blocks, request.cached_tokens) or blocks
        elif isinstance(request.source, AgentBlocks):  # never admitted: the handle comes back whole
            blocks = _reissue(self.pool, request.source)
        if blocks is not None and reason == "cancelled" and request.free_on_cancel:
            self.pool.release(blocks)
            blocks = None
        failure = None
        if error is not None:
            failure = error if isinstance(error, GenerationError) else GenerationError(
                f"request {request.uid} of agent {request.agent_id!r} failed: {type(error).__name__}: {error}")
            if failure is not error:
                failure.__cause__ = error
        if request.detokenized < len(request.tokens):
            self._detokenize(request)
        completion = CompletedGeneration(
            uid=request.uid,
            agent_id=request.agent_id,
            text=request.text,
            token_ids=list(request.tokens),
            finish_reason=reason,
            blocks=blocks,
            prompt_tokens=len(request.prompt),
            cached_tokens=request.cached_tokens,
            generation_tokens=len(request.tokens),
            time_to_first_token=None,
            generation_tps=0.0,
            error=failure,
            preemptions=request.preemptions,
        )
        self._release(request)
        with self._lock:
            self._events.append(GenerationEvent(request.uid, request.agent_id, None, "", completion))

    def _fail_batch(self, error: BaseException) -> None:
        """The model failed (or was interrupted) mid-step: end every running request, keep their histories."""
        failed = [row.owner for row in self._batch.rows]
        self._batch = DecodeBatch(self.model, self.spec)
        self._charge()
        for request in failed:
            self._end_without_output(request, "error", error)

    def _release(self, request: _Request) -> None:
        self._hold_admissions = False  # a request ended: its memory may let others in
        with self._lock:
            self._requests.pop(request.uid, None)
            self._agents_in_flight.discard(request.agent_id)


def _reissue(pool: BlockPool, handle: AgentBlocks) -> AgentBlocks:
    """A fresh handle to the same blocks (the submitted one was consumed)."""
    fresh = copy.copy(handle)
    fresh.consumed = False
    fresh.pool_id = pool.id
    fresh.generation = pool.new_handle_generation(handle.agent_id)
    return fresh


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
