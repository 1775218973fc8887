"""The stepper: carries out the scheduler's decisions, one iteration at a time.

An iteration ends flagged cancels, runs one decode step of the running
batch (growing it first, preempting the youngest rows the scheduler picks
if it cannot grow), then admits what the scheduler says and runs one
prefill chunk of the admitted group; once a group's prompts are in, their
first tokens are launched and they join the running batch. The model runs
only inside :class:`~blockpool.engine.batch.DecodeBatch`, which the stepper
drives.

A finished row's tokens that its agent's blocks do not hold yet are
written back (:func:`~blockpool.cache_conversion.extend_blocks`); a
preempted row's too, so that it resumes later exactly where it stopped. A
failure inside the model (or Ctrl-C) ends the requests it touched, keeping
their histories, and is re-raised if it was not an ``Exception``.

Memory: after every change the batch's working caches are charged to the
pool (plus the room kept for a prefilling group to join), so the budget
sees what is really held.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Any

import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.generate_utils import BatchCounters

from blockpool.block import AgentBlocks
from blockpool.cache_conversion import extend_blocks, plan_extension
from blockpool.engine.batch import DecodeBatch, Row
from blockpool.engine.checkpoints import Checkpointer
from blockpool.engine.history import rebuild_caches, settle
from blockpool.engine.interruptions import Interruptions
from blockpool.engine.output import Endings, EventQueue, on_token
from blockpool.engine.scheduler import Admit, Readmit, Refuse, Scheduler
from blockpool.engine.types import Request
from blockpool.errors import BlockPoolError, GenerationError
from blockpool.paged import PagedSequence, start_sequence

log = logging.getLogger("blockpool")


@dataclass(eq=False)
class PromptBatch:
    """Requests admitted together: their prompts are prefilled as one batch, then join the running batch."""

    requests: list[Request]
    batch: DecodeBatch


class Stepper(Interruptions):
    """Runs one engine's iterations: the running batch, the prompt batch being prefilled, and their memory."""

    def __init__(
        self,
        model: Any,
        spec: Any,
        pool: Any,
        scheduler: Scheduler,
        events: EventQueue,
        endings: Endings,
        eos: set[int],
        checkpoints: Checkpointer,
        paged_layers: tuple[int, ...] = (),
    ):
        self.model, self.spec, self.pool = model, spec, pool
        self.checkpoints, self.paged_layers = checkpoints, paged_layers
        self.scheduler, self.events, self.endings, self.eos = scheduler, events, endings, eos
        self.batch = self.new_batch()
        self.admission: PromptBatch | None = None
        self.counters = BatchCounters()
        self.deltas = True  # whoever drives wants per-token text (stream, tick); step() does not
        self._join_reserved = 0

    def new_batch(self) -> DecodeBatch:
        """An empty running batch (paged layers read the pool's blocks in place)."""
        return DecodeBatch(self.model, self.spec, self.pool, self.paged_layers)

    @property
    def nbytes(self) -> int:
        """Bytes of KV held outside blocks: the running batch's and the prompt batch's working caches."""
        return self.batch.nbytes + (self.admission.batch.nbytes if self.admission else 0)

    def counters_snapshot(self) -> dict[str, Any]:
        return asdict(self.counters)

    def busy(self) -> bool:
        """Whether a prompt batch or the running batch has work."""
        return bool(self.admission or len(self.batch))

    def charge(self) -> None:
        """Charge what the working caches really hold, plus room kept for the prefilling group to join.

        Room is made before anything grows; this records the result, even if
        an estimate fell short (the pool then admits nothing until it drops).
        """
        self.pool.charge(self, self.nbytes + self._join_reserved, force=True)

    def settle(self) -> None:
        """Schedule what the running batch and the prompt batch hold (see :meth:`DecodeBatch.settle`)."""
        self.batch.settle()
        if self.admission is not None:
            self.admission.batch.settle()

    def advance(self) -> None:
        """One iteration: cancels, a decode step, admission and a prefill chunk."""
        with mx.stream(generation_stream):
            self._cancel_flagged()
            busy = bool(len(self.batch))
            if busy:
                self._decode()
            busy = self._prefill() or busy
        if not busy:  # everything waits for room that background work (a spill) is freeing
            self.pool.wait_for_release(0.05)

    # ------------------------------------------------------------ decode

    def _decode(self) -> None:
        """One decode step for the batch; a failure (or an interrupt) ends the running requests, histories kept."""
        try:
            self._make_growth_room()
            tic = time.perf_counter()
            self.batch.grow()
            results = self.batch.step()
            self.counters.decode_time += time.perf_counter() - tic
            self.counters.generation_tokens += len(results)
            self.counters.generation_steps += 1
            self.charge()
            finished: list[tuple[int, Request, str]] = []
            for index, (row, token, logprobs) in enumerate(results):
                request = row.owner
                if request.shown_ahead is not None:  # shown when it was computed (see _show_first_tokens)
                    finish, event, request.shown_ahead = request.shown_ahead or None, None, None
                else:
                    finish, event = on_token(request, token, logprobs, self.eos, self.deltas)
                if event is not None:
                    self.events.put(event)
                if finish is not None:
                    finished.append((index, request, finish))
            if finished:
                self._finish_rows(finished)
        except BaseException as error:
            self.fail_batch(error)
            if not isinstance(error, Exception):
                raise

    def _make_growth_room(self) -> None:
        """Make room for the batch to grow, preempting the rows the scheduler picks if nothing else frees enough."""
        growth = self.batch.growth_bytes()
        while growth:
            victim = self.scheduler.growth_victim(self.batch, growth)
            if victim is None:
                return
            self._preempt(victim)
            growth = self.batch.growth_bytes()

    def _finish_rows(self, finished: list[tuple[int, Request, str]]) -> None:
        ended = []
        for index, request, reason in finished:
            try:
                ended.append((request, self._write_back(request, index), reason, None))
            except Exception as error:
                self.batch.abandon([index])
                ended.append((request, None, "error", error))
        self.batch.remove([index for index, _, _ in finished])
        self.charge()
        for request, blocks, reason, error in ended:
            if error is not None:
                self.endings.abandon(request, "error", error)
            else:
                self.endings.complete(request, blocks, reason)

    def _write_back(self, request: Request, index: int, force: bool = True, published: bool = False) -> AgentBlocks:
        """Store the tokens of row ``index`` its agent's blocks do not hold yet; returns the new handle.

        ``force``: past the budget (a write-back that frees the working cache right after).
        ``published``: the handle is handed out for sharing while the row goes on."""
        sources, ring = self.batch.row_caches(index)
        tokens = request.all_tokens
        if request.shown_ahead is not None:  # shown, and not yet fed to the model: its K/V is not there yet
            tokens = tokens[:-1]
        total = self.batch.row_tokens(index)
        if total != len(tokens):
            raise GenerationError(f"the cache holds {total} tokens, the request {len(tokens)}")
        history = request.history
        written: dict = {}
        if self.batch.paged is not None:  # its paged layers' tokens are in their blocks already
            written, rings = self.batch.paged.plans(index)
            ring.update(rings)
        plans = plan_extension(self.pool, history.base, total, history.pending, self.checkpoints.every, written)
        blocks = extend_blocks(self.pool, history.base, plans, sources, tokens, ring, force=force)
        history.pending = {}  # the snapshots are the handle's now
        if self.batch.paged is not None:
            self.batch.paged.written_back(index, blocks, published)
        return blocks

    def _preempt(self, index: int) -> None:
        """Move a running request out of the batch: its KV to blocks, itself to the head of the queue."""
        request = self.batch.rows[index].owner
        pending = self.batch.pending(index)
        try:
            blocks = self._write_back(request, index)
        except Exception as error:
            self.batch.abandon([index])
            self.batch.remove([index])
            self.charge()
            self.endings.abandon(request, "error", error)
            return
        self.batch.remove([index])
        self.charge()
        request.history.base = blocks
        request.pending, request.row = pending, None
        request.preemptions += 1
        self.scheduler.requeue_first(request)

    # ------------------------------------------------------------ admission and prefill

    def _prefill(self) -> bool:
        """Admit what the scheduler says, then run one prefill chunk of the admitted group (or, once
        its prompts are in, launch their first tokens and join them to the running batch).

        Returns whether anything was done.
        """
        if self.admission is None:
            decision = self.scheduler.next_admission(self.batch, self.events.completions_pending() > 0)
            if decision is None:
                return False
            if isinstance(decision, Refuse):
                self.endings.abandon(decision.request, "error", decision.error)
                return True
            if isinstance(decision, Readmit):
                self._readmit(decision.request)
                return True
            self._admit(decision)
            if self.admission is None:
                return True
        admission = self.admission
        try:
            self._prefill_step(admission)
        except BaseException as error:
            if self.admission is admission:
                self._drop_admission(error)
            else:  # it failed while joining the batch: the batch's state is unknown
                self.fail_batch(error)
            if not isinstance(error, Exception):
                raise
        return True

    def _admit(self, decision: Admit) -> None:
        """Rebuild the group's caches (one copy each) and make their prompt batch."""
        group = decision.group
        rows, caches, last = [], [], []
        for position, request in enumerate(group):
            request.admitted_at = request.admitted_at or time.perf_counter()
            request.order = self.scheduler.next_order()
            try:
                request.caches = rebuild_caches(
                    request, self.spec, self.pool, spare=len(request.prompt), paged=self.paged_layers
                )
                request.sequence = self._sequence(request)
                settle(request.history)
            except BaseException as error:
                request.caches = None
                self.endings.abandon(request, "error", error)
                if not isinstance(error, Exception):
                    for other in group[position + 1 :]:
                        self.endings.abandon(other, "error", error)
                    self.charge()
                    raise
                continue
            params = request.params
            history, prompt = request.history.tokens, request.prompt
            request.row = Row(
                request,
                params.sampler,
                params.logits_processors,
                context=lambda history=history, prompt=prompt: history + prompt[:-1],
                fed=len(history) + len(prompt) - 1,
            )
            rows.append(request.row)
            caches.append(request.caches)
            last.append(request.prompt[-1])
            if params.progress:
                params.progress(0, len(request.prompt))
        admitted = [r for r in group if r.caches is not None]
        if admitted:
            batch = DecodeBatch.for_prompts(
                self.model,
                self.spec,
                rows,
                caches,
                last,
                self.pool,
                [r.sequence for r in admitted if r.sequence is not None],
                self.paged_layers,
            )
            for request in admitted:
                request.caches, request.sequence = None, None  # the prompt batch holds them now
            self.admission = PromptBatch(admitted, batch)
            longest = max(r.history.keep + len(r.prompt) for r in admitted)
            self._join_reserved = self.scheduler.join_estimate(self.batch, longest, len(admitted))
        self.charge()

    def _readmit(self, request: Request) -> None:
        """A preempted request back into the running batch: its blocks rebuilt, its sampled token next."""
        request.order = self.scheduler.next_order()
        token, logprobs = request.pending
        request.pending = None
        try:
            caches = rebuild_caches(request, self.spec, self.pool, spare=1, paged=self.paged_layers)
            sequence = self._sequence(request)
            settle(request.history)
        except BaseException as error:
            self.endings.abandon(request, "error", error)
            self.charge()
            if not isinstance(error, Exception):
                raise
            return
        params = request.params
        request.row = Row(
            request,
            params.sampler,
            params.logits_processors,
            context=lambda request=request, fed=request.total_tokens: request.all_tokens[:fed],
            fed=request.total_tokens,
        )
        try:
            self.batch.join(request.row, caches, mx.array([token], dtype=mx.uint32), logprobs, sequence)
        except BaseException as error:  # the batch's state is unknown: end it, this request with it
            if request.row not in self.batch.rows:
                self.batch.rows.append(request.row)
            self.fail_batch(error)
            if not isinstance(error, Exception):
                raise
        self.charge()

    def _sequence(self, request: Request) -> PagedSequence | None:
        """The request's paged layers, continuing its history's blocks in place (None: no paged layers)."""
        if not self.paged_layers:
            return None
        return start_sequence(self.pool, self.paged_layers, request.history.base)

    def _prefill_step(self, admission: PromptBatch) -> None:
        """One prefill chunk for the admitted group; or, once every prompt is in but its last token,
        that last token for all, launching each request's first generated token, as mlx-lm does."""
        batch, requests = admission.batch, admission.requests
        step = self.scheduler.memory.prefill_step_size
        chunks = []
        for request in requests:
            remaining = len(request.prompt) - 1 - request.prefilled  # the last token goes to the first step
            n = self.checkpoints.chunk(request, min(step, max(0, remaining)))
            chunks.append(request.prompt[request.prefilled : request.prefilled + n])
        if any(chunks):
            tic = time.perf_counter()
            self.counters.prompt_tokens += batch.prefill(chunks)
            self.counters.prompt_time += time.perf_counter() - tic
            for row, (request, chunk) in enumerate(zip(requests, chunks)):
                request.prefilled += len(chunk)
                if chunk:
                    self.checkpoints.after_chunk(request, batch, row)
                if request.params.progress and chunk:
                    request.params.progress(request.prefilled, len(request.prompt))
            self.charge()
            return
        tic = time.perf_counter()
        batch.step()  # reads back the prompts' last tokens and launches the first generated ones
        self.counters.prompt_time += time.perf_counter() - tic
        self._show_first_tokens(batch)
        for request in requests:
            request.prefilled = len(request.prompt)
            if request.params.progress:
                request.params.progress(len(request.prompt), len(request.prompt))
        self.batch.absorb(batch)
        self.admission = None
        self._join_reserved = 0
        self.charge()
        for request in requests:
            if request.params.share_prompt is not None:
                self._share_prompt(request)

    def _show_first_tokens(self, batch: DecodeBatch) -> None:
        """Hand out each admitted request's first token as soon as it is computed.

        A decode step launches the next forward pass before it reads the
        current tokens (so that, on a GPU, the next pass overlaps the host's
        work, as mlx-lm's loop does); read there, a first token would wait
        for its successor's pass too. Here it is read at once, shown, and
        marked (``shown_ahead``), so the step that reads it later shows it
        no more: it only ends the request, if this token ended it. The token
        is fed to the model, its K/V written, by that step, as any other.
        """
        for index, row in enumerate(batch.rows):
            request = row.owner
            token, logprobs = batch.pending(index)
            finish, event = on_token(request, token, logprobs, self.eos, self.deltas)
            if event is not None:
                self.events.put(event)
            request.shown_ahead = finish or ""

    def _share_prompt(self, request: Request) -> None:
        """Write a just-prefilled prompt to blocks now (not at its end), within the budget, and hand
        them to the request's ``share_prompt``; the row keeps decoding from its working cache."""
        index = next(i for i, row in enumerate(self.batch.rows) if row.owner is request)
        try:
            blocks = self._write_back(request, index, force=False, published=True)
        except (BlockPoolError, ValueError) as error:  # no room (or the row's cache disagrees): it is shared at its end
            log.debug("agent %r: prompt not shared early: %s", request.agent_id, error)
            return
        request.history.base = blocks
        request.params.share_prompt(blocks)
