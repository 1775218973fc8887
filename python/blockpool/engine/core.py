"""BlockPoolBatchEngine: batched multi-agent generation that resumes agents from the pool.

The public class: its API, the drive loop and its threads. Its parts:
:mod:`.intake` checks a submit and makes the request, :mod:`.scheduler`
decides who waits, who is admitted and who is preempted, :mod:`.step`
carries that out (the model runs only in :mod:`.batch`), :mod:`.output`
turns tokens into text, events and completions, and :mod:`.history`
brings a request's history into the pool.

Where the model allows (most families: :mod:`blockpool.paged`), a running
request's attention reads and writes its agent's blocks in place: its
history is never copied, and its new tokens go straight into blocks.
Otherwise its history is rebuilt from its blocks straight into the cache
the model writes into next (one copy), and when it finishes only the tokens
its blocks do not hold yet are written back. Either way its prompt is
prefilled in chunks and it then decodes in the running batch.

Memory: every byte of KV is charged to the pool (blocks, the batch's
working caches, copies in flight). A request that does not fit now waits,
first in first out, and is admitted as running requests finish or as room
is reclaimed (cached-free blocks, idle agents a store spills). When decode
growth finds no room, the youngest running request is preempted: its KV
is written back to blocks and it resumes later, exactly where it stopped.
Only a request that could never fit, even alone in an empty pool, is
refused at submit with ``PoolExhaustedError``; so is a submit while the
wait queue is full (``max_waiting``).

Threads: ``submit`` and ``cancel`` may be called from any thread; they
validate and queue. All model work happens in the one thread that drives
``tick()`` (``step()`` and ``stream()`` are loops over it); another thread
that tries to drive at the same time gets ``EngineBusyError``
(:mod:`.driving`). Driving is
resumable at any point: events not yet handed out stay queued.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generation_stream

from blockpool.block import AgentBlocks
from blockpool.engine.batch import LogitsProcessor, Sampler
from blockpool.engine.batch_check import batch_support
from blockpool.engine.checkpoints import Checkpointer, auto_checkpoint_blocks
from blockpool.engine.driving import DriveGuard
from blockpool.engine.intake import (
    Intake,
    batch_sizes,
    check_arguments,
    check_checkpoint_blocks,
    check_engine_sizes,
    check_max_waiting,
)
from blockpool.engine.introspection import EngineIntrospection
from blockpool.engine.output import Endings, EventQueue
from blockpool.engine.scheduler import Scheduler, default_max_waiting
from blockpool.engine.step import Stepper
from blockpool.engine.types import CompletedGeneration, GenerationEvent, ProgressCallback, Request
from blockpool.errors import IncompatibleCacheError, InvalidRequestError
from blockpool.paged.support import PagedSupport, paged_support
from blockpool.pool import BlockPool
from blockpool.prompt import vocab_size_of
from blockpool.spec import ModelCacheSpec

_DEFAULT = object()


class BlockPoolBatchEngine(EngineIntrospection):
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
            raises ``PoolExhaustedError``. By default twice the requests the
            pool could hold at once at their smallest (one block per layer
            each: ``2 * (pool.total_blocks // layers)``); None for no bound.
        checkpoint_blocks: For models with recurrent layers: snapshot their
            state every this many blocks while a prompt is prefilled, so that
            a prompt that diverges from an agent's history, or a shared
            prefix, resumes from the last checkpoint before the divergence
            (None: only where prompts and turns end). Each checkpoint costs
            one state per recurrent layer of the budget. ``"auto"`` (the
            default): the fewest blocks whose K and V take at least four
            times a checkpoint's bytes, so checkpoints add at most a quarter
            to an agent's memory (:func:`~blockpool.engine.checkpoints.auto_checkpoint_blocks`).
        paged: Whether running requests attend over their blocks in place
            (:mod:`blockpool.paged`) rather than over a gathered copy. None
            (the default): wherever the model allows, as a one-time check on
            the model finds (``engine.paged`` says what it found); False: gather;
            True: page, or raise if the model does not allow it.

    Raises:
        IncompatibleCacheError: The pool was made for another cache layout.
        InvalidRequestError: ``paged=True`` for a model whose attention cannot run paged.
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
        max_waiting: int | None = _DEFAULT,  # type: ignore[assignment]
        checkpoint_blocks: int | str | None = "auto",
        paged: bool | None = None,
    ):
        check_engine_sizes(completion_batch_size, prefill_batch_size, prefill_step_size)
        if paged not in (None, True, False):
            raise InvalidRequestError(f"paged must be None, True or False, got {paged!r}")
        if max_waiting is _DEFAULT:
            max_waiting = default_max_waiting(pool) if isinstance(pool, BlockPool) else None
        check_max_waiting(max_waiting)
        check_checkpoint_blocks(checkpoint_blocks)
        spec = ModelCacheSpec.from_model(model)
        if not isinstance(pool, BlockPool) or spec != pool.spec:
            raise IncompatibleCacheError("the pool was made for another model's cache layout")
        self.model, self.tokenizer, self.pool, self.spec = model, tokenizer, pool, spec
        self.completion_batch_size, self.prefill_batch_size = completion_batch_size, prefill_batch_size
        self.prefill_step_size, self.max_waiting = prefill_step_size, max_waiting
        if checkpoint_blocks == "auto":
            checkpoint_blocks = auto_checkpoint_blocks(spec) if spec.state_layers else None
        self.checkpoint_blocks = checkpoint_blocks
        every = checkpoint_blocks * spec.block_tokens if checkpoint_blocks else None
        self.vocab_size = vocab_size_of(model)  # token ids the model embeds (None: unknown)
        self._lock = threading.RLock()
        self._uids = itertools.count()
        self._requests: dict[int, Request] = {}  # by uid, until finished
        self._agents_in_flight: set[str] = set()
        self._events = EventQueue()
        self._intake = Intake(spec, pool, tokenizer, self.vocab_size)
        self.paged = PagedSupport((), "turned off (paged=False)") if paged is False else paged_support(model, spec)
        if paged and not self.paged.paged:
            raise InvalidRequestError(f"this model's attention cannot run paged: {self.paged.detail}")
        layers = self.paged.layers
        self.batching = batch_support(model, spec, layers)  # what this model's code batches exactly
        sizes = batch_sizes(self.batching, completion_batch_size, prefill_batch_size)
        # A block a paged request writes while it runs: the pool's, plus its full-precision arrays when quantized.
        written = {i: pool.bytes_per_block(i) + (spec.bytes_per_block(i) if pool.kv_bits else 0) for i in layers}
        self._scheduler = Scheduler(
            spec,
            pool,
            self._lock,
            **sizes,
            prefill_step_size=prefill_step_size,
            max_waiting=max_waiting,
            every=every,
            paged=written,
            stored={i: pool.bytes_per_block(i) for i in layers},
        )
        endings = Endings(pool, self._events, self._release)
        checkpoints = Checkpointer(spec, pool, every)
        self._stepper = Stepper(
            model,
            spec,
            pool,
            self._scheduler,
            self._events,
            endings,
            set(tokenizer.eos_token_ids),
            checkpoints,
            paged_layers=layers,
        )
        self._endings, self._guard = endings, DriveGuard()
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
        share_prompt: Callable[[AgentBlocks], None] | None = None,
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
            share_prompt: Called (on the driving thread) with the blocks that
                hold the history and the prompt as soon as the prompt is
                prefilled: they are written to the pool then, not at the
                completion, so that other agents can share them (a prefix
                index) while this one decodes. Paged layers hand over the
                blocks they already write in (a partly filled last block is
                copied); gathered layers write their working copy out, so
                their part of the prompt's KV is held twice until the
                request ends. When the budget has no room for the blocks, it
                is not called.

        Returns:
            The request's uid.

        Raises:
            InvalidRequestError: A malformed request, or a stale, consumed or
                foreign cache handle; nothing was changed.
            IncompatibleCacheError: ``cache`` was made for another model.
            PoolExhaustedError: The request could never fit the pool's budget,
                or ``max_waiting`` requests are already waiting.
        """
        self._check_not_in_flight(agent_id)
        request = self._intake.request(
            agent_id,
            prompt,
            cache,
            keep_tokens,
            max_tokens,
            sampler,
            logits_processors,
            stop,
            prompt_progress_callback,
            share_prompt,
        )
        self._scheduler.check_fits(request.history.keep, len(request.prompt), max_tokens)
        with self._lock:
            if self._closed:
                raise InvalidRequestError("the engine is closed")
            self._check_not_in_flight(agent_id)
            if isinstance(cache, AgentBlocks) and cache.consumed:
                raise InvalidRequestError("this cache handle was already submitted (consumed): pass the newest one")
            self._scheduler.enqueue(request)
            request.uid = next(self._uids)
            if isinstance(cache, AgentBlocks):
                cache.consumed = True
            self._requests[request.uid] = request
            self._agents_in_flight.add(agent_id)
            return request.uid

    def check_request(self, agent_id: str, max_tokens: int = 256, stop: str | Sequence[str] | None = None) -> list[str]:
        """Validate the simple request arguments; returns ``stop`` as a list.

        Raises:
            InvalidRequestError: On a bad agent id, ``max_tokens`` or ``stop``,
                or an agent that already has a generation in flight.
        """
        stops = check_arguments(agent_id, max_tokens, stop)
        self._check_not_in_flight(agent_id)
        return stops

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
            if request in self._scheduler.waiting:
                self._scheduler.waiting.remove(request)
                self._endings.abandon(request, "cancelled")
            return True

    def tokenize(self, prompt: str | Sequence[int], resume: bool = False) -> list[int]:
        """Token ids for a prompt, as ``submit`` makes them (see :func:`blockpool.prompt.to_token_ids`).

        ``resume``: the text follows a cached history, so no special tokens are added.

        Raises:
            InvalidRequestError: An empty prompt, bytes, ids outside the vocabulary, ...
        """
        return self._intake.tokenize(prompt, resume=resume)

    # ------------------------------------------------------------ driving

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

    def tick(self) -> list[GenerationEvent]:
        """One iteration: admit what fits, one prefill chunk, one decode step. Returns its events.

        For callers that interleave their own work (a server) with the engine's.
        """
        with self._guard.driving():
            if self._has_work():
                self._stepper.deltas = True
                self._stepper.advance()
            return self._events.drain()

    def settle(self) -> None:
        """Schedule the computation of every array the running requests hold, without waiting.

        MLX graphs are built on the driving thread's stream, and another
        thread can evaluate only what is scheduled: a thread that drove the
        engine calls this before another thread drives it (as the drop-in
        functions do when several threads call them at once).
        """
        with self._guard.driving(), mx.stream(generation_stream):
            self._stepper.settle()

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
        self.pool.charge(self._stepper, 0)

    def _run(self, deltas: bool) -> Iterator[GenerationEvent]:
        with self._guard.driving():
            while True:
                while (event := self._events.pop()) is not None:
                    yield event
                if not self._has_work():
                    return
                self._stepper.deltas = deltas
                self._stepper.advance()

    def _has_work(self) -> bool:
        with self._lock:
            return bool(self._scheduler.waiting or self._stepper.busy() or len(self._events))

    def _check_not_in_flight(self, agent_id: str) -> None:
        with self._lock:
            if agent_id in self._agents_in_flight:
                raise InvalidRequestError(f"agent {agent_id!r} already has a generation in flight")

    def _release(self, request: Request) -> None:
        """A request ended: forget it as in flight; its memory may let others in."""
        self._scheduler.hold_admissions = False
        with self._lock:
            self._requests.pop(request.uid, None)
            self._agents_in_flight.discard(request.agent_id)
