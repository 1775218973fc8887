"""The engine thread: every HTTP request joins one continuous batch, driven by one thread.

The HTTP layer (an asyncio event loop) never touches the model. It validates
and tokenizes a request, then hands the engine thread a :class:`Ticket` and
awaits the events the engine thread puts back on the ticket's queue
(``loop.call_soon_threadsafe``): ``Accepted``, one ``Piece`` per token, and
the ``Outcome`` (or a ``Failure``).

Each engine iteration does, in order:

1. take what arrived (new tickets, cancels, deletes, stop);
2. decide what to apply now: a ticket whose agent already has a request in
   flight, or whose last turn is still being written, waits its turn
   (per agent, first come first served); anonymous tickets get their agent;
3. under ``mlx.launch``, send that list to the other ranks (rank 0 decides,
   every rank applies the same list: see ``distributed.py``);
4. apply it to the store (``submit``, ``cancel``, ``forget``);
5. run one engine iteration and route its events to their tickets.

The store runs durable (``AgentMemory(durable=True)``): each finished turn
of a named agent is written behind, and the runner submits the agent's next
request only once that write is done (it checks; the engine thread never
waits on disk).

Prefix-aware admission: a request for an agent the store does not know,
whose prompt starts with the same full block of tokens as a request of
another new agent still in flight, waits for that request to finish. The
store shares the finished request's blocks, so the prefix (a system prompt
common to many agents) is prefilled once instead of once per agent, as
``mlx_lm.server`` gets from caching its prompt segments.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections import OrderedDict, deque
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from blockpool.errors import (
    BlockPoolError,
    CacheCorruptionError,
    IncompatibleCacheError,
    InvalidRequestError,
    PoolExhaustedError,
)
from blockpool.memory_store import AgentMemory
from blockpool.server.agents import AnonymousAgents, is_anonymous
from blockpool.server.api_errors import ApiError
from blockpool.server.distributed import Lockstep
from blockpool.server.sampling import (
    GenerationParams,
    make_request_processors,
    make_request_sampler,
)

log = logging.getLogger("blockpool.server")

# ---------------------------------------------------------------- operations every rank applies


@dataclass
class Submit:
    key: int
    agent_id: str
    tokens: list[int]
    params: GenerationParams


@dataclass
class Cancel:
    key: int


@dataclass
class Forget:
    agent_id: str


@dataclass
class Stop:
    pass


# ---------------------------------------------------------------- what a ticket receives


@dataclass
class Accepted:
    """The request is in the engine (it may still wait there for room)."""

    agent_id: str


@dataclass
class TokenLogprob:
    token: int
    logprob: float
    top: list[tuple[int, float]]


@dataclass
class Piece:
    """One generated token and the text it adds (possibly empty)."""

    text: str
    token: int
    logprob: TokenLogprob | None = None
    merged: list[TokenLogprob] = field(default_factory=list)  # the logprobs of pieces merged into this one


@dataclass
class Outcome:
    """A finished request."""

    agent_id: str
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop", "length", "cancelled" or "error"
    prompt_tokens: int
    cached_tokens: int
    completion_tokens: int
    cache_source: str | None
    time_to_first_token: float | None
    generation_tps: float
    logprobs: list[TokenLogprob] = field(default_factory=list)
    error: str | None = None


@dataclass
class Failure:
    """The request could not run: an error to answer with."""

    error: ApiError


class Ticket:
    """One HTTP request on its way through the engine.

    Created by :meth:`EngineRunner.submit` on the event loop; the engine
    thread emits events to it; the HTTP handler awaits them with :meth:`next`.
    """

    def __init__(
        self,
        key: int,
        agent_id: str | None,
        tokens: list[int],
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop,
        label: str,
        outbox: Outbox | None = None,
    ):
        self.key, self.agent_id, self.tokens, self.params, self.label = key, agent_id, tokens, params, label
        self.anonymous = agent_id is None
        self.fresh = False  # its agent had no cache when it was submitted (rank 0)
        self.created = time.perf_counter()
        self.first_token_at: float | None = None
        self.logprobs: list[TokenLogprob] = []
        self.finished = False
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self._outbox = outbox

    def emit(self, event: Any) -> None:
        """Deliver an event to the handler: through the outbox when there is one, else at once."""
        if self._outbox is not None:
            self._outbox.post(self, event)
        else:
            Outbox.deliver(self.loop, [(self, event)])

    async def next(self) -> Any:
        """The next event: ``Accepted``, ``Piece``, ``Outcome`` or ``Failure``."""
        return await self.events.get()

    def ready(self) -> list[Any]:
        """The events already delivered, without waiting (on the event loop)."""
        out = []
        while not self.events.empty():
            out.append(self.events.get_nowait())
        return out


class Outbox:
    """Events for tickets, handed to their event loop once per engine iteration.

    One wake-up of the event loop per iteration, not one per token: under
    load the HTTP side then takes the GIL from the engine thread less often.
    """

    def __init__(self) -> None:
        self._items: list[tuple[Ticket, Any]] = []

    def post(self, ticket: Ticket, event: Any) -> None:
        self._items.append((ticket, event))

    def flush(self) -> None:
        """Deliver what was posted (engine thread)."""
        if not self._items:
            return
        items, self._items = self._items, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Ticket, Any]]] = {}
        for ticket, event in items:
            by_loop.setdefault(ticket.loop, []).append((ticket, event))
        for loop, batch in by_loop.items():
            self.deliver(loop, batch)

    @staticmethod
    def deliver(loop: asyncio.AbstractEventLoop, batch: list[tuple[Ticket, Any]]) -> None:
        def put() -> None:
            for ticket, event in batch:
                ticket.events.put_nowait(event)

        try:
            loop.call_soon_threadsafe(put)
        except RuntimeError:  # the loop is closed: nobody is listening any more
            pass


# ---------------------------------------------------------------- inbox items (rank 0)


@dataclass
class _NewTicket:
    ticket: Ticket


@dataclass
class _CancelTicket:
    key: int


@dataclass
class _ForgetAgent:
    agent_id: str
    future: Future


@dataclass
class _StopServing:
    pass



class EngineRunner:
    """Owns the store and the one thread that drives it.

    Args:
        memory: The store (its engine and pool), durable when it has a
            ``cache_dir``; only this runner's thread drives it once started.
        lockstep: The ranks to keep in step (a single process by default).
        max_requests: Most requests accepted and unfinished (running or
            queued); past it ``submit`` raises a 429 ``ApiError``.
        anonymous_agents: How many anonymous conversations to keep.
        retry_after: Seconds a refused client is told to wait.
    """

    def __init__(
        self,
        memory: AgentMemory,
        *,
        lockstep: Lockstep | None = None,
        max_requests: int = 96,
        anonymous_agents: int = 8,
        retry_after: int = 1,
    ):
        self.memory = memory
        self.lockstep = lockstep or Lockstep()
        self.max_requests = max_requests
        self.retry_after = retry_after
        self._anonymous = AnonymousAgents(anonymous_agents)
        tokenizer = memory.engine.tokenizer
        self._special_tokens = list(tokenizer.encode("\n", add_special_tokens=False)) + sorted(tokenizer.eos_token_ids)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox = Outbox()
        self._lock = threading.Lock()
        self._keys = 0
        self._accepted = 0  # tickets accepted and not finished (for the queue limit)
        self._waiting: deque[Ticket] = deque()  # rank 0: not yet submitted
        self._tickets: dict[int, Ticket] = {}  # rank 0: submitted, by key
        self._forgets: list[_ForgetAgent] = []  # rank 0: deletes waiting for a write or a request
        self._deferred: list[Any] = []  # rank 0: operations decided after the last share
        self._uid_of: dict[int, int] = {}  # key -> engine uid (every rank)
        self._key_of: dict[int, int] = {}  # engine uid -> key (every rank)
        self._running: dict[str, int] = {}  # agent -> key of its request in the engine (every rank)
        self._block_tokens = memory.pool.block_tokens
        self._known_heads: OrderedDict[tuple[int, ...], None] = OrderedDict()  # rank 0: first blocks finished requests left in the pool
        self._stopping = False
        self._failed: BaseException | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ any thread

    def start(self) -> None:
        """Start the engine thread (rank 0)."""
        self._drop_anonymous_files()
        self._thread = threading.Thread(target=self._main, name="blockpool-engine", daemon=True)
        self._thread.start()

    def follow(self) -> None:
        """Run the engine loop on this thread as a follower rank, until rank 0 stops."""
        self._drop_anonymous_files()
        self._main()

    @property
    def alive(self) -> bool:
        """Whether the engine thread is running and has not failed."""
        return self._thread is not None and self._thread.is_alive() and self._failed is None

    def submit(self, agent_id: str | None, tokens: list[int], params: GenerationParams, loop: asyncio.AbstractEventLoop, label: str = "") -> Ticket:
        """Queue a request for the engine thread.

        Raises:
            ApiError: 429 past the queue limit (with ``Retry-After``), 503
                when the server is stopping or the engine thread died.
        """
        with self._lock:
            if self._stopping or not self.alive:
                raise ApiError(503, "the server is shutting down" if self._stopping else "the engine stopped", kind="server_error")
            if self._accepted >= self.max_requests:
                raise ApiError(
                    429,
                    f"too many requests in flight ({self._accepted}); retry after {self.retry_after} s",
                    kind="rate_limit_error",
                    code="queue_full",
                    headers={"Retry-After": str(self.retry_after)},
                )
            self._accepted += 1
            self._keys += 1
            key = self._keys
        if params.temperature > 0 and params.seed is None:
            params.seed = secrets.randbits(63)  # chosen once, on rank 0, and sent with the request
        ticket = Ticket(key, agent_id, tokens, params, loop, label, self._outbox)
        self._inbox.put(_NewTicket(ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Cancel a ticket (its client went away); its blocks go back to the pool."""
        if not ticket.finished:
            self._inbox.put(_CancelTicket(ticket.key))

    def forget(self, agent_id: str) -> Future:
        """Delete an agent from the pool and disk. The future fails with a 409 ``ApiError`` if it is busy."""
        future: Future = Future()
        self._inbox.put(_ForgetAgent(agent_id, future))
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what is in flight, persist every agent, and end the engine thread."""
        with self._lock:
            self._stopping = True
        self._inbox.put(_StopServing())
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        """Requests accepted and not finished."""
        with self._lock:
            return self._accepted

    def agents(self) -> list[dict[str, Any]]:
        """Every agent: where it lives, its tokens and bytes, whether its last turn is on disk."""
        return [
            {
                "id": info.agent_id,
                "object": "agent",
                "where": info.where,
                "tokens": info.tokens,
                "bytes": info.bytes,
                "durable": info.durable,
                "anonymous": is_anonymous(info.agent_id),
            }
            for info in self.memory.agents()
        ]

    # ------------------------------------------------------------ engine thread

    def _main(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # a bug or a dead rank: fail everything, keep what can be kept
            self._failed = error
            log.exception("the engine thread failed: %s", error)
            for ticket in [*self._waiting, *self._tickets.values()]:
                self._fail(ticket, ApiError(500, f"the engine failed: {error}", kind="server_error"))
            self._outbox.flush()
        finally:
            self._shutdown()

    def _serve(self) -> None:
        leader = self.lockstep.rank == 0
        while True:
            operations = self._plan(self._take_inbox()) if leader else None
            operations = self.lockstep.share(operations)
            stop = self._apply(operations)
            if not stop:
                for event in self._tick():
                    self._on_event(event)
            self._outbox.flush()
            if stop:
                return

    def _idle(self) -> bool:
        return not self._running and not self._deferred

    def _take_inbox(self) -> list[Any]:
        items = []
        if self._idle() and not self._stopping:
            # Nothing runs: sleep until something arrives. Tickets waiting for
            # an agent's write are looked at again soon; followers wait in the
            # collective meanwhile, and a heartbeat keeps the ranks talking.
            timeout = 0.005 if (self._waiting or self._forgets) else 1.0 if self.lockstep.distributed else None
            try:
                items.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                pass
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

    def _plan(self, items: list[Any]) -> list[Any]:
        """Rank 0: turn what arrived into this iteration's operations."""
        operations, self._deferred = self._deferred, []
        for item in items:
            if isinstance(item, _NewTicket):
                if self._stopping:
                    self._fail(item.ticket, ApiError(503, "the server is shutting down", kind="server_error"))
                else:
                    self._waiting.append(item.ticket)
            elif isinstance(item, _CancelTicket):
                operations += self._cancel_ticket(item.key)
            elif isinstance(item, _ForgetAgent):
                self._forgets.append(item)
            elif isinstance(item, _StopServing):
                self._stopping = True
                for ticket in list(self._waiting):
                    self._fail(ticket, ApiError(503, "the server is shutting down", kind="server_error"))
                self._waiting.clear()
                operations += [Cancel(key) for key in self._tickets]
        operations += self._plan_forgets()
        if self._stopping:
            if not self._tickets and not self._running:
                operations.append(Stop())
            return operations
        return operations + self._schedule()

    def _cancel_ticket(self, key: int) -> list[Any]:
        for ticket in self._waiting:
            if ticket.key == key:
                self._waiting.remove(ticket)
                self._finish(ticket, self._cancelled_outcome(ticket))
                return []
        return [Cancel(key)] if key in self._tickets else []

    def _plan_forgets(self) -> list[Any]:
        operations, later = [], []
        queued = {t.agent_id for t in self._waiting}
        for item in self._forgets:
            agent_id = item.agent_id
            if agent_id in self._running or agent_id in queued:
                item.future.set_exception(ApiError(409, f"agent {agent_id!r} has a request in flight", kind="invalid_request_error", code="agent_busy"))
            elif not self._durable(agent_id):
                later.append(item)  # its last turn is still being written: delete after
            else:
                operations.append(Forget(agent_id))
                self._anonymous.discard(agent_id)
                item.future.set_result(True)
        self._forgets = later
        return operations

    def _schedule(self) -> list[Any]:
        """Rank 0: the waiting tickets that may go to the engine now, first come first served per agent."""
        operations = []
        claimed = set(self._running)
        prefilling = {self._head(t) for t in self._tickets.values() if t.fresh} - {None}
        for ticket in list(self._waiting):
            if ticket.agent_id is None:
                ticket.agent_id = self._anonymous.claim(ticket.tokens)
            agent_id = ticket.agent_id
            if agent_id in claimed or not self._durable(agent_id):
                claimed.add(agent_id)  # later tickets of this agent wait behind this one
                continue
            head = self._head(ticket)
            fresh = head is not None and head not in self._known_heads and self.memory.where(agent_id) == "none"
            if fresh and head in prefilling:
                continue  # another new agent is prefilling this prefix: share its blocks when it ends
            claimed.add(agent_id)
            ticket.fresh = fresh
            if fresh:
                prefilling.add(head)
            self._waiting.remove(ticket)
            self._tickets[ticket.key] = ticket
            operations.append(Submit(ticket.key, agent_id, ticket.tokens, ticket.params))
        return operations

    def _head(self, ticket: Ticket) -> tuple[int, ...] | None:
        """The prompt's first full block (None if it has none), the unit the store shares."""
        return tuple(ticket.tokens[: self._block_tokens]) if len(ticket.tokens) > self._block_tokens else None

    def _durable(self, agent_id: str) -> bool:
        """Whether the agent's last turn is written (so its next request may start without waiting on disk)."""
        return self.memory.wait_durable(agent_id, timeout=0)

    def _apply(self, operations: list[Any]) -> bool:
        """Every rank: apply the operations; True on Stop."""
        for op in operations:
            if isinstance(op, Submit):
                self._submit(op)
            elif isinstance(op, Cancel):
                uid = self._uid_of.get(op.key)
                if uid is not None:
                    self.memory.cancel(uid)
            elif isinstance(op, Forget):
                self.memory.forget(op.agent_id)  # waits for the agent's write, if one is still running here
            elif isinstance(op, Stop):
                return True
        return False

    def _submit(self, op: Submit) -> None:
        ticket = self._tickets.get(op.key)
        params = op.params
        try:
            try:
                uid = self._submit_to_store(op, params)
            except CacheCorruptionError as error:
                # The store moved the damaged file aside: the agent starts over, cold.
                log.warning("agent %r: %s; starting it over", op.agent_id, error)
                uid = self._submit_to_store(op, params)
        except (InvalidRequestError, PoolExhaustedError, IncompatibleCacheError) as error:
            if ticket is not None:
                self._tickets.pop(op.key, None)
                self._fail(ticket, ApiError(400, str(error)))
            elif self.lockstep.rank != 0:
                log.error("rank %d refused a request rank 0 accepted: %s", self.lockstep.rank, error)
            return
        except BlockPoolError as error:
            if ticket is not None:
                self._tickets.pop(op.key, None)
                self._fail(ticket, ApiError(500, str(error), kind="server_error"))
            return
        self._uid_of[op.key], self._key_of[uid] = uid, op.key
        with self._lock:
            self._running[op.agent_id] = op.key
        if ticket is not None:
            ticket.emit(Accepted(op.agent_id))

    def _submit_to_store(self, op: Submit, params: GenerationParams) -> int:
        return self.memory.submit(
            op.agent_id,
            op.tokens,
            max_tokens=params.max_tokens,
            sampler=make_request_sampler(params, self._special_tokens),
            logits_processors=make_request_processors(params),
            stop=params.stop,
        )

    def _tick(self) -> list[Any]:
        """One engine iteration: admit, one prefill chunk, one decode step."""
        return self.memory.tick()

    def _on_event(self, event: Any) -> None:
        key = self._key_of.get(event.uid)
        ticket = self._tickets.get(key) if key is not None else None
        if ticket is not None and event.token is not None:
            # A token, with its text delta (the last one comes with the completion).
            if ticket.first_token_at is None:
                ticket.first_token_at = time.perf_counter()
            logprob = _token_logprob(event, ticket.params.top_logprobs) if ticket.params.logprobs else None
            if logprob is not None:
                ticket.logprobs.append(logprob)
            ticket.emit(Piece(event.text, event.token, logprob))
        if event.completion is None:
            return
        completion = event.completion
        self._key_of.pop(event.uid, None)
        if key is not None:
            self._uid_of.pop(key, None)
        with self._lock:
            if self._running.get(completion.agent_id) == key:
                del self._running[completion.agent_id]
        self._after_turn(completion)
        if ticket is not None:
            del self._tickets[key]
            head = self._head(ticket)
            if head is not None and completion.finish_reason in ("stop", "length"):
                self._known_heads[head] = None
                self._known_heads.move_to_end(head)
                while len(self._known_heads) > 256:
                    self._known_heads.popitem(last=False)
            if completion.finish_reason == "error":
                self._fail(ticket, ApiError(500, str(completion.error), kind="server_error"))
                return
            outcome = Outcome(
                agent_id=completion.agent_id,
                text=completion.text,
                token_ids=list(completion.token_ids),
                finish_reason=completion.finish_reason,
                prompt_tokens=len(ticket.tokens),
                cached_tokens=completion.cached_tokens,
                completion_tokens=completion.generation_tokens,
                cache_source=completion.cache_source,
                time_to_first_token=None if ticket.first_token_at is None else ticket.first_token_at - ticket.created,
                generation_tps=completion.generation_tps,
                logprobs=ticket.logprobs,
            )
            self._finish(ticket, outcome)

    def _after_turn(self, completion: Any) -> None:
        """Keep or drop the agent's cache after a request ends."""
        agent_id = completion.agent_id
        ok = completion.finish_reason in ("stop", "length")
        if is_anonymous(agent_id):
            if self.lockstep.rank == 0:
                blocks = completion.blocks
                if ok and blocks is not None and blocks.total_tokens:
                    self._deferred += [Forget(a) for a in self._anonymous.keep(agent_id, list(blocks.token_ids))]
                else:
                    self._deferred.append(Forget(agent_id))

    def _finish(self, ticket: Ticket, outcome: Outcome) -> None:
        ticket.finished = True
        with self._lock:
            self._accepted -= 1
        ticket.emit(outcome)
        ttft = f"{outcome.time_to_first_token:.3f}s" if outcome.time_to_first_token is not None else "-"
        log.info(
            "%s agent=%s source=%s cached=%d/%d ttft=%s gen=%d tok/s=%.1f finish=%s",
            ticket.label or "request",
            outcome.agent_id,
            outcome.cache_source or "-",
            outcome.cached_tokens,
            outcome.prompt_tokens,
            ttft,
            outcome.completion_tokens,
            outcome.generation_tps,
            outcome.finish_reason,
        )

    def _fail(self, ticket: Ticket, error: ApiError) -> None:
        ticket.finished = True
        with self._lock:
            self._accepted -= 1
        ticket.emit(Failure(error))
        log.warning("%s agent=%s failed: %d %s", ticket.label or "request", ticket.agent_id or "-", error.status, error.message)

    def _cancelled_outcome(self, ticket: Ticket) -> Outcome:
        return Outcome(ticket.agent_id or "-", "", [], "cancelled", len(ticket.tokens), 0, 0, None, None, 0.0)

    def _shutdown(self) -> None:
        """Persist every named agent, drop anonymous ones, release the pool."""
        try:
            for agent_id in self._anonymous_in_store():
                self.memory.forget(agent_id)
            self.memory.close()  # writes what is not on disk yet, then frees the pool
        except Exception as error:
            log.exception("persisting agents at shutdown failed: %s", error)
        for item in self._forgets:
            item.future.set_exception(ApiError(503, "the server is shutting down", kind="server_error"))

    def _anonymous_in_store(self) -> list[str]:
        return [info.agent_id for info in self.memory.agents() if is_anonymous(info.agent_id)]

    def _drop_anonymous_files(self) -> None:
        """Anonymous agents do not outlive the server: remove any a crash left on disk."""
        for agent_id in self._anonymous_in_store():
            self.memory.forget(agent_id)


def _token_logprob(event: Any, top: int) -> TokenLogprob | None:
    logprobs = event.logprobs
    if logprobs is None:
        return None
    logprobs = logprobs.reshape(-1)
    chosen = logprobs[event.token].item()
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = mx.argpartition(-logprobs, kth=top - 1)[:top]
        values = logprobs[ids]
        best = sorted(zip(ids.tolist(), values.tolist()), key=lambda p: -p[1])
    return TokenLogprob(event.token, chosen, best)

