"""The engine thread: every HTTP request joins one continuous batch, driven by one thread.

The HTTP layer (an asyncio event loop) never touches the model. It validates
and tokenizes a request, then hands the engine thread a :class:`Ticket` and
awaits the events the engine thread puts back on the ticket's queue
(``loop.call_soon_threadsafe``): ``Accepted``, one ``Piece`` per token, and
the ``Outcome`` (or a ``Failure``).

Each engine iteration does, in order:

1. take what arrived (new tickets, cancels, deletes, stop);
2. decide what to apply now (rank 0, :mod:`.planner`);
3. under ``mlx.launch``, send that list to the other ranks (rank 0 decides,
   every rank applies the same list: see ``distributed.py``);
4. apply it to the store (``submit``, ``cancel``, ``forget``);
5. run one engine iteration and route its events to their tickets.

The store runs durable (``AgentMemory(durable=True)``): each finished turn
of a named agent is written behind, and the runner submits the agent's next
request only once that write is done (it checks; the engine thread never
waits on disk).

Tickets and their events are in :mod:`.tickets`.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from concurrent.futures import Future
from typing import Any

import mlx.core as mx

from blockpool.errors import (
    BlockPoolError,
    CacheCorruptionError,
    IncompatibleCacheError,
    InvalidRequestError,
    PoolExhaustedError,
)
from blockpool.server.agent_limits import AgentLimits
from blockpool.server.agents import AnonymousAgents, is_anonymous
from blockpool.server.api_errors import ApiError
from blockpool.server.distributed import Lockstep
from blockpool.server.planner import TicketPlanner
from blockpool.server.sampling import GenerationParams, make_request_processors, make_request_sampler
from blockpool.server.tickets import (
    Accepted,
    Cancel,
    CancelTicket,
    Failure,
    Forget,
    ForgetAgent,
    NewTicket,
    Outbox,
    Outcome,
    Piece,
    Stop,
    StopServing,
    Submit,
    Ticket,
    TokenLogprob,
)
from blockpool.store import AgentMemory

log = logging.getLogger("blockpool.server")

__all__ = ["Accepted", "EngineRunner", "Failure", "Outcome", "Piece", "Ticket", "TokenLogprob"]


class EngineRunner:
    """Owns the store and the one thread that drives it.

    Args:
        memory: The store (its engine and pool), durable when it has a
            ``cache_dir``; only this runner's thread drives it once started.
        lockstep: The ranks to keep in step (a single process by default).
        max_requests: Most requests accepted and unfinished (running or
            queued); past it ``submit`` raises a 429 ``ApiError``.
        anonymous_agents: How many anonymous conversations to keep.
        max_agents, max_disk_bytes: Past either, the least recently used
            idle agents are deleted (:mod:`.agent_limits`); None: no limit.
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
        max_agents: int | None = None,
        max_disk_bytes: int | None = None,
    ):
        self.memory = memory
        self.lockstep = lockstep or Lockstep()
        self.max_requests = max_requests
        self.retry_after = retry_after
        tokenizer = memory.engine.tokenizer
        self._special_tokens = list(tokenizer.encode("\n", add_special_tokens=False)) + sorted(tokenizer.eos_token_ids)
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._outbox = Outbox()
        self._lock = threading.Lock()
        self._keys = 0
        self._accepted = 0  # tickets accepted and not finished (for the queue limit)
        self._uid_of: dict[int, int] = {}  # key -> engine uid (every rank)
        self._key_of: dict[int, int] = {}  # engine uid -> key (every rank)
        self._running: dict[str, int] = {}  # agent -> key of its request in the engine (every rank)
        self._planner = TicketPlanner(
            memory,
            AnonymousAgents(anonymous_agents),
            self._running,
            self._finish,
            self._fail,
            AgentLimits(max_agents, max_disk_bytes),
        )
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

    def submit(
        self,
        agent_id: str | None,
        tokens: list[int],
        params: GenerationParams,
        loop: asyncio.AbstractEventLoop,
        label: str = "",
    ) -> Ticket:
        """Queue a request for the engine thread.

        Raises:
            ApiError: 429 past the queue limit (with ``Retry-After``), 503
                when the server is stopping or the engine thread died.
        """
        with self._lock:
            if self._stopping or not self.alive:
                raise ApiError(
                    503, "the server is shutting down" if self._stopping else "the engine stopped", kind="server_error"
                )
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
        self._inbox.put(NewTicket(ticket))
        return ticket

    def cancel(self, ticket: Ticket) -> None:
        """Cancel a ticket (its client went away); its blocks go back to the pool."""
        if not ticket.finished:
            self._inbox.put(CancelTicket(ticket.key))

    def forget(self, agent_id: str) -> Future:
        """Delete an agent from the pool and disk. The future fails with a 409 ``ApiError`` if it is busy."""
        future: Future = Future()
        self._inbox.put(ForgetAgent(agent_id, future))
        return future

    def stop(self, timeout: float | None = None) -> None:
        """Cancel what is in flight, persist every agent, and end the engine thread."""
        with self._lock:
            self._stopping = True
        self._inbox.put(StopServing())
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def in_flight(self) -> int:
        """Requests accepted and not finished."""
        with self._lock:
            return self._accepted

    def agents(self) -> list[dict[str, Any]]:
        """Every agent: where it lives, its tokens and bytes, whether its last turn is on disk."""
        return [agent_row(info) for info in self.memory.agents()]

    # ------------------------------------------------------------ engine thread

    def _main(self) -> None:
        try:
            self._serve()
        except BaseException as error:  # a bug or a dead rank: fail everything, keep what can be kept
            self._failed = error
            log.exception("the engine thread failed: %s", error)
            for ticket in self._planner.abandon_all():
                self._fail(ticket, ApiError(500, f"the engine failed: {error}", kind="server_error"))
            self._outbox.flush()
        finally:
            self._shutdown()

    def _serve(self) -> None:
        leader = self.lockstep.rank == 0
        while True:
            operations = self._planner.plan(self._take_inbox()) if leader else None
            operations = self.lockstep.share(operations)
            stop = self._apply(operations)
            if not stop:
                for event in self.memory.tick():
                    self._on_event(event)
            self._outbox.flush()
            if stop:
                return

    def _take_inbox(self) -> list[Any]:
        items = []
        planner = self._planner
        if planner.idle() and not planner.stopping:
            # Nothing runs: sleep until something arrives. Tickets waiting for
            # an agent's write are looked at again soon; followers wait in the
            # collective meanwhile, and a heartbeat keeps the ranks talking.
            timeout = 0.005 if (planner.waiting or planner.forgets) else 1.0 if self.lockstep.distributed else None
            try:
                items.append(self._inbox.get(timeout=timeout))
            except queue.Empty:
                pass
        while True:
            try:
                items.append(self._inbox.get_nowait())
            except queue.Empty:
                return items

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
                try:
                    self.memory.forget(op.agent_id)  # waits for the agent's write, if one is still running here
                except InvalidRequestError as error:  # it started running again: it stays
                    log.info("agent %r not deleted: %s", op.agent_id, error)
            elif isinstance(op, Stop):
                return True
        return False

    def _submit(self, op: Submit) -> None:
        ticket = self._planner.tickets.get(op.key)
        try:
            try:
                uid = self._submit_to_store(op)
            except CacheCorruptionError as error:
                # The store moved the damaged file aside: the agent starts over, cold.
                log.warning("agent %r: %s; starting it over", op.agent_id, error)
                uid = self._submit_to_store(op)
        except (InvalidRequestError, PoolExhaustedError, IncompatibleCacheError) as error:
            self._planner.refused(op.agent_id)
            if ticket is not None:
                self._planner.tickets.pop(op.key, None)
                self._fail(ticket, ApiError(400, str(error)))
            elif self.lockstep.rank != 0:
                log.error("rank %d refused a request rank 0 accepted: %s", self.lockstep.rank, error)
            return
        except BlockPoolError as error:
            self._planner.refused(op.agent_id)
            if ticket is not None:
                self._planner.tickets.pop(op.key, None)
                self._fail(ticket, ApiError(500, str(error), kind="server_error"))
            return
        self._uid_of[op.key], self._key_of[uid] = uid, op.key
        with self._lock:
            self._running[op.agent_id] = op.key
        if ticket is not None:
            ticket.emit(Accepted(op.agent_id))

    def _submit_to_store(self, op: Submit) -> int:
        params = op.params
        return self.memory.submit(
            op.agent_id,
            op.tokens,
            max_tokens=params.max_tokens,
            sampler=make_request_sampler(params, self._special_tokens),
            logits_processors=make_request_processors(params),
            stop=params.stop,
            share_prompt=op.share_prompt,
        )

    def _on_event(self, event: Any) -> None:
        key = self._key_of.get(event.uid)
        ticket = self._planner.tickets.get(key) if key is not None else None
        if ticket is not None and event.token is not None:
            # A token, with its text delta (the last one comes with the completion).
            if ticket.first_token_at is None:
                ticket.first_token_at = time.perf_counter()
                if self.lockstep.rank == 0:
                    self._planner.first_token(ticket)
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
        if self.lockstep.rank == 0:
            self._planner.ended(ticket, completion)
        if ticket is None:
            return
        if completion.finish_reason == "error":
            self._fail(ticket, ApiError(500, str(completion.error), kind="server_error"))
            return
        self._finish(ticket, _outcome(ticket, completion))

    def _finish(self, ticket: Ticket, outcome: Outcome) -> None:
        ticket.finished = True
        with self._lock:
            self._accepted -= 1
        ticket.emit(outcome)
        _log_outcome(ticket, outcome)

    def _fail(self, ticket: Ticket, error: ApiError) -> None:
        ticket.finished = True
        with self._lock:
            self._accepted -= 1
        ticket.emit(Failure(error))
        log.warning(
            "%s agent=%s failed: %d %s", ticket.label or "request", ticket.agent_id or "-", error.status, error.message
        )

    def _shutdown(self) -> None:
        """Persist every named agent, drop anonymous ones, release the pool."""
        try:
            for agent_id in self._anonymous_in_store():
                self.memory.forget(agent_id)
            self.memory.close()  # writes what is not on disk yet, then frees the pool
        except Exception as error:
            log.exception("persisting agents at shutdown failed: %s", error)
        self._planner.refuse_forgets()

    def _anonymous_in_store(self) -> list[str]:
        return [info.agent_id for info in self.memory.agents() if is_anonymous(info.agent_id)]

    def _drop_anonymous_files(self) -> None:
        """Anonymous agents do not outlive the server: remove any a crash left on disk."""
        for agent_id in self._anonymous_in_store():
            self.memory.forget(agent_id)


def agent_row(info: Any) -> dict[str, Any]:
    """One agent as ``GET /v1/agents`` lists it."""
    return {
        "id": info.agent_id,
        "object": "agent",
        "where": info.where,
        "tokens": info.tokens,
        "bytes": info.bytes,
        "durable": info.durable,
        "anonymous": is_anonymous(info.agent_id),
    }


def _log_outcome(ticket: Ticket, outcome: Outcome) -> None:
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


def _outcome(ticket: Ticket, completion: Any) -> Outcome:
    return Outcome(
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
