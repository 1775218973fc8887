"""The scheduler: who waits, who is admitted, who is preempted. Decisions only; it never runs the model.

Requests wait first in, first out. The head is admitted as soon as its
room can be made (cached-free blocks dropped, idle agents spilled by the
pool's reclaimers), and the requests behind it join its prefill batch (up
to ``prefill_batch_size``) only while they fit as things are: the
scheduler never spills to prefill more at once. A preempted request comes
back alone, first. When decode growth finds no room, the youngest running
request is chosen to be preempted, and admissions pause until something
ends, so that the batch does not thrash. A head that can never get room
(nothing running or reclaimable can free enough: callers hold the rest of
the pool) is refused.

Memory is estimated with :class:`~blockpool.engine.working_memory.WorkingMemory`:
what a request's working caches take, what one layer's copy takes while the
batch changes shape, and the most a request can take alone. The stepper
(:mod:`.step`) carries the decisions out.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from dataclasses import dataclass
from typing import Any

from blockpool.engine.history import arrives_as_file, in_transit_bytes, prefetch
from blockpool.engine.types import Request
from blockpool.engine.working_memory import WorkingMemory
from blockpool.errors import PoolExhaustedError


@dataclass
class Admit:
    """Admit these requests (the head first) and prefill their prompts as one batch."""

    group: list[Request]


@dataclass
class Readmit:
    """Put this preempted request back into the running batch."""

    request: Request


@dataclass
class Refuse:
    """End this request: it can never get room."""

    request: Request
    error: PoolExhaustedError


Decision = Admit | Readmit | Refuse


def default_max_waiting(pool: Any) -> int:
    """The wait queue's default bound: twice the requests the pool could hold at once at their
    smallest (one block per layer each), so that the queue can refill the pool twice over."""
    return max(1, 2 * (pool.total_blocks // pool.spec.num_layers))


class Scheduler:
    """The wait queue and the admission and preemption decisions for one engine.

    Args:
        spec: The model's cache layout.
        pool: The pool whose budget bounds everything.
        lock: The engine's lock; the queue is under it (submit and cancel may run on any thread).
        completion_batch_size, prefill_batch_size, prefill_step_size: As for the engine.
        max_waiting: Most requests waiting (None: no bound).
        every: The recurrent checkpoint grid in tokens (None: none), for estimates.
        paged: Per paged layer, the bytes a block its running requests write takes (see
            :class:`~blockpool.engine.working_memory.WorkingMemory`).
        stored: Per paged layer, the bytes of a block as the pool stores it.
    """

    def __init__(
        self,
        spec: Any,
        pool: Any,
        lock: threading.RLock,
        *,
        completion_batch_size: int,
        prefill_batch_size: int,
        prefill_step_size: int,
        max_waiting: int | None,
        every: int | None = None,
        paged: dict[int, int] | None = None,
        stored: dict[int, int] | None = None,
    ):
        self.spec, self.pool, self._lock = spec, pool, lock
        self.completion_batch_size, self.prefill_batch_size = completion_batch_size, prefill_batch_size
        self.max_waiting = max_waiting
        self.memory = WorkingMemory(spec, prefill_step_size, every, paged, stored)
        self.waiting: deque[Request] = deque()
        self.hold_admissions = False  # after a preemption, until a request ends
        self._order = itertools.count()

    # ------------------------------------------------------------ the queue (any thread, lock held)

    def enqueue(self, request: Request) -> None:
        """Queue a new request, unless the queue is full.

        Raises:
            PoolExhaustedError: ``max_waiting`` requests already wait.
        """
        if self.max_waiting is not None and len(self.waiting) >= self.max_waiting:
            raise PoolExhaustedError(
                self.blocks_for(request.total_tokens + request.params.max_tokens),
                self.pool.available_blocks(),
                f"while {len(self.waiting)} requests already wait for room (max_waiting={self.max_waiting})",
            )
        self.waiting.append(request)

    def requeue_first(self, request: Request) -> None:
        """A preempted request goes back to the head of the queue."""
        with self._lock:
            self.waiting.appendleft(request)
        self.hold_admissions = True  # no admission until something ends: else it would thrash

    def next_order(self) -> int:
        """An increasing admission stamp: the youngest running request is preempted first."""
        return next(self._order)

    # ------------------------------------------------------------ estimates

    def blocks_for(self, final_tokens: int) -> int:
        """Blocks an agent of ``final_tokens`` tokens holds, over all layers."""
        return sum(self.spec.blocks_held(i, final_tokens) for i in range(self.spec.num_layers))

    def request_bytes(self, final_tokens: int) -> int:
        """The most a request ending at ``final_tokens`` tokens takes alone: blocks, caches, one layer's copy."""
        return self.memory.request(final_tokens, [self.pool.bytes_per_block(i) for i in range(self.spec.num_layers)])

    def check_fits(self, history: int, prompt_tokens: int, max_tokens: int) -> None:
        """Refuse a request that could not finish even alone in an empty pool.

        Raises:
            PoolExhaustedError: It could never fit.
        """
        final = history + prompt_tokens + max_tokens
        need = self.request_bytes(final)
        if need > self.pool.total_bytes:
            raise PoolExhaustedError(
                self.blocks_for(final),
                self.pool.total_blocks,
                f"(history + prompt + max_tokens = {final} tokens: {need} bytes of blocks and working caches, "
                f"more than the pool's whole budget of {self.pool.total_bytes} bytes)",
            )

    def join_estimate(self, batch: Any, total: int, rows: int) -> int:
        """Working bytes ``rows`` sequences of up to ``total`` tokens add when they join the batch."""
        if not len(batch):
            return 0
        longest = max(total, batch_tokens(batch))
        return max(0, self.memory.caches(longest, len(batch) + rows) - batch.nbytes)

    # ------------------------------------------------------------ admission (engine thread)

    def next_admission(self, batch: Any, completions_pending: bool) -> Decision | None:
        """What to admit now, if anything (called while no prompt batch is being prefilled).

        Room is made for the head (the pool may spill idle agents); requests
        behind it join only if they fit without making room.
        """
        with self._lock:
            if not self.waiting or (self.hold_admissions and len(batch)):
                return None
            if len(batch) >= self.completion_batch_size:
                return None
            queue = list(itertools.islice(self.waiting, self.prefill_batch_size))
        head = queue[0]
        if head.pending is not None:  # preempted: it comes back alone, with the token it had sampled
            return self._readmission(head, batch, completions_pending)
        group: list[Request] = []
        longest, extra = 0, 0
        for request in queue:
            if request.pending is not None or len(batch) + len(group) >= self.completion_batch_size:
                break
            total = request.history.keep + len(request.prompt)
            history = request.history
            as_file = arrives_as_file(history)
            bytes_in = in_transit_bytes(history) + self.memory.new_blocks(history.keep, total, not as_file)
            if as_file:  # a paged request writes it into blocks: a copy it needs room for
                bytes_in += self._imported(history.keep)
            rows, longest = len(group) + 1, max(longest, total)
            need = (
                self.memory.caches(longest, rows)
                + self.join_estimate(batch, longest, rows)
                + self.memory.layer_copy(max(longest, batch_tokens(batch)), len(batch) + rows)
                + extra
                + bytes_in
            )
            if not group:
                if not self.pool.make_room(need):
                    return self._refusal(request, need, batch, completions_pending)
            elif not self.pool.make_room(need, reclaim=False):
                break  # batch only what fits as it is: never spill to prefill more at once
            if not as_file and arrives_as_file(history):  # spilled while room was made: a file to copy now
                bytes_in += self._imported(history.keep)
                if not self.pool.make_room(need + self._imported(history.keep), reclaim=not group):
                    if not group:
                        return None  # the next iteration tries again, counting the copy
                    break
            prefetch(history)  # only now: a read charges memory, and this request was found room for
            group.append(request)
            extra += bytes_in
        with self._lock:
            if list(self.waiting)[: len(group)] != group:
                return None
            for _ in group:
                self.waiting.popleft()
        return Admit(group)

    def _imported(self, history: int) -> int:
        """What a paged request's history arriving as a file adds while it is written into blocks."""
        file_bytes = self.spec.bytes_for_tokens(history, self.pool.kv_bits, self.pool.kv_group_size)
        return self.memory.imported(history, file_bytes)

    def _readmission(self, request: Request, batch: Any, completions_pending: bool) -> Decision | None:
        total = request.history.base.total_tokens
        need = (
            self.memory.caches(total)
            + self.join_estimate(batch, total, 1)
            + self.memory.layer_copy(max(total, batch_tokens(batch)), len(batch) + 1)
            + self.memory.new_blocks(total, total)
        )
        if not self.pool.make_room(need):
            return self._refusal(request, need, batch, completions_pending)
        with self._lock:
            if not self.waiting or self.waiting[0] is not request:
                return None
            self.waiting.popleft()
        return Readmit(request)

    def _refusal(self, request: Request, need: int, batch: Any, completions_pending: bool) -> Refuse | None:
        """The head does not fit: refuse it only if nothing running or pending can ever make room.

        Not while completions wait to be handed out: their owner may free
        their blocks as it receives them.
        """
        if len(batch) or self.pool.releasing_bytes or completions_pending:
            return None
        with self._lock:
            if not self.waiting or self.waiting[0] is not request:
                return None
            self.waiting.popleft()
        unit = self.pool.total_bytes / self.pool.total_blocks  # the pool's block, on average over layers
        error = PoolExhaustedError(
            -(-need // int(unit)),
            self.pool.available_blocks(),
            "(in block-sized units: its new blocks, working cache and copies in flight) to start, and nothing "
            "running or reclaimable can free more: the rest of the pool is held outside the engine (callers' "
            "handles, other agents' caches)",
        )
        return Refuse(request, error)

    # ------------------------------------------------------------ growth (engine thread)

    def growth_victim(self, batch: Any, growth: int) -> int | None:
        """Make room for the batch to grow by ``growth`` bytes; if none can be made, the row to preempt.

        Returns:
            None to grow now: there is room, or the batch is down to one row,
            which was checked to fit at submit (it may run over the budget by
            one step rather than stall); else the index of the youngest row.
        """
        if self.pool.make_room(growth + self.memory.layer_copy(batch_tokens(batch), len(batch))):
            return None
        if len(batch) <= 1:
            return None
        return max(range(len(batch)), key=lambda i: batch.rows[i].owner.order)


def batch_tokens(batch: Any) -> int:
    """The longest row's tokens, from the requests' own counts (reading the caches would wait on the step in flight)."""
    return max((row.owner.total_tokens for row in batch.rows), default=0)
