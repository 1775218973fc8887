"""Rank 0's decisions: which tickets go to the engine this iteration, and in what form.

Each iteration the planner turns what arrived (new tickets, cancels,
deletes, stop) into operations that every rank applies:

- a ticket whose agent already has a request in flight, or whose last turn
  is still being written, waits its turn (per agent, first come first
  served); anonymous tickets get their agent here;
- a delete waits for the agent's write, and is refused (409) while the
  agent has a request in flight or queued;
- **prefix-aware admission**: a ticket of an agent the store does not know,
  whose prompt starts with the same full block of tokens as a request of
  another new agent still in flight, waits until the store holds that
  request's prompt blocks: from its first token (the early copy,
  ``share_prompt``), or from its end when the budget had no room for that
  copy. The store then shares those blocks, so the prefix (a system prompt
  common to many agents) is prefilled once instead of once per agent, as
  ``mlx_lm.server`` gets from caching its prompt segments.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from typing import Any

from blockpool.server.agent_limits import AgentLimits
from blockpool.server.agents import AnonymousAgents, is_anonymous
from blockpool.server.api_errors import ApiError
from blockpool.server.tickets import (
    Cancel,
    CancelTicket,
    Forget,
    ForgetAgent,
    NewTicket,
    Outcome,
    Stop,
    StopServing,
    Submit,
    Ticket,
)

#: First blocks of finished requests remembered as "the store shares this" (most recent first out).
KNOWN_HEADS = 256


class TicketPlanner:
    """The tickets rank 0 holds, and the operations it decides each iteration.

    Args:
        memory: The store (asked where agents are and whether their writes are done).
        anonymous: The kept anonymous conversations.
        running: Agent -> key of its request in the engine (kept by the runner).
        finish, fail: Deliver a ticket's outcome or error (the runner's).
        limits: ``--max-agents`` and ``--max-disk-mb`` (None: no limits).
    """

    def __init__(
        self,
        memory: Any,
        anonymous: AnonymousAgents,
        running: dict[str, int],
        finish: Callable[[Ticket, Outcome], None],
        fail: Callable[[Ticket, ApiError], None],
        limits: AgentLimits | None = None,
    ):
        self.memory, self.anonymous, self.running = memory, anonymous, running
        self.limits = limits or AgentLimits()
        self._finish, self._fail = finish, fail
        self.block_tokens = memory.pool.block_tokens
        self.waiting: deque[Ticket] = deque()  # not yet submitted
        self.tickets: dict[int, Ticket] = {}  # submitted, by key
        self.forgets: list[ForgetAgent] = []  # deletes waiting for a write or a request
        self.deferred: list[Any] = []  # operations decided after the last share
        self.stopping = False
        self._known_heads: OrderedDict[tuple[int, ...], None] = OrderedDict()  # first blocks finished requests left

    def idle(self) -> bool:
        """Nothing runs and nothing is decided but not yet applied."""
        return not self.running and not self.deferred

    def plan(self, items: list[Any]) -> list[Any]:
        """Turn what arrived into this iteration's operations."""
        operations, self.deferred = self.deferred, []
        for item in items:
            if isinstance(item, NewTicket):
                if self.stopping:
                    self._fail(item.ticket, ApiError(503, "the server is shutting down", kind="server_error"))
                else:
                    self.waiting.append(item.ticket)
            elif isinstance(item, CancelTicket):
                operations += self._cancel_ticket(item.key)
            elif isinstance(item, ForgetAgent):
                self.forgets.append(item)
            elif isinstance(item, StopServing):
                self.stopping = True
                for ticket in list(self.waiting):
                    self._fail(ticket, ApiError(503, "the server is shutting down", kind="server_error"))
                self.waiting.clear()
                operations += [Cancel(key) for key in self.tickets]
        operations += self._plan_forgets()
        if self.stopping:
            if not self.tickets and not self.running:
                operations.append(Stop())
            return operations
        return operations + self._schedule()

    def _cancel_ticket(self, key: int) -> list[Any]:
        for ticket in self.waiting:
            if ticket.key == key:
                self.waiting.remove(ticket)
                self._finish(ticket, cancelled_outcome(ticket))
                return []
        return [Cancel(key)] if key in self.tickets else []

    def _plan_forgets(self) -> list[Any]:
        operations, later = [], []
        queued = {t.agent_id for t in self.waiting}
        for item in self.forgets:
            agent_id = item.agent_id
            if agent_id in self.running or agent_id in queued:
                item.future.set_exception(
                    ApiError(
                        409,
                        f"agent {agent_id!r} has a request in flight",
                        kind="invalid_request_error",
                        code="agent_busy",
                    )
                )
            elif not self._durable(agent_id):
                later.append(item)  # its last turn is still being written: delete after
            else:
                operations.append(Forget(agent_id))
                self.anonymous.discard(agent_id)
                item.future.set_result(True)
        self.forgets = later
        return operations

    def _schedule(self) -> list[Any]:
        """The waiting tickets that may go to the engine now, first come first served per agent."""
        operations = []
        claimed = set(self.running)
        prefilling = {self.head(t) for t in self.tickets.values() if t.fresh} - {None}
        for ticket in list(self.waiting):
            if ticket.agent_id is None:
                ticket.agent_id = self.anonymous.claim(ticket.tokens)
            agent_id = ticket.agent_id
            if agent_id in claimed or not self._durable(agent_id):
                claimed.add(agent_id)  # later tickets of this agent wait behind this one
                continue
            head = self.head(ticket)
            fresh = head is not None and head not in self._known_heads and self.memory.where(agent_id) == "none"
            if fresh and head in prefilling:
                continue  # another new agent is prefilling this prefix: share its blocks when it ends
            claimed.add(agent_id)
            ticket.fresh = fresh
            if fresh:
                prefilling.add(head)
            self.waiting.remove(ticket)
            self.tickets[ticket.key] = ticket
            operations.append(Submit(ticket.key, agent_id, ticket.tokens, ticket.params, share_prompt=fresh))
        return operations

    def head(self, ticket: Ticket) -> tuple[int, ...] | None:
        """The prompt's first full block (None if it has none), the unit the store shares."""
        return tuple(ticket.tokens[: self.block_tokens]) if len(ticket.tokens) > self.block_tokens else None

    def _durable(self, agent_id: str) -> bool:
        """Whether the agent's last turn is written (so its next request may start without waiting on disk)."""
        return self.memory.wait_durable(agent_id, timeout=0)

    def first_token(self, ticket: Ticket) -> None:
        """A ticket's first token: a new agent's prompt is prefilled. If the store indexed its
        blocks then (``share_prompt``), the tickets waiting on its first block may go; if the
        budget had no room for that early copy, they keep waiting for the request's end."""
        if ticket.fresh and self.memory.shared_tokens(ticket.tokens) >= self.block_tokens:
            ticket.fresh = False
            self._remember(self.head(ticket))

    def _remember(self, head: tuple[int, ...] | None) -> None:
        if head is None:
            return
        self._known_heads[head] = None
        self._known_heads.move_to_end(head)
        while len(self._known_heads) > KNOWN_HEADS:
            self._known_heads.popitem(last=False)

    def ended(self, ticket: Ticket | None, completion: Any) -> None:
        """A request ended: remember the prefix it left in the pool; keep or drop an anonymous agent."""
        ok = completion.finish_reason in ("stop", "length")
        if ticket is not None:
            self.tickets.pop(ticket.key, None)
            if ok:
                self._remember(self.head(ticket))
        agent_id = completion.agent_id
        if is_anonymous(agent_id):
            blocks = completion.blocks
            if ok and blocks is not None and blocks.total_tokens:
                self.deferred += [Forget(a) for a in self.anonymous.keep(agent_id, list(blocks.token_ids))]
            else:
                self.anonymous.discard(agent_id)
                self.deferred.append(Forget(agent_id))
                return
        if ok:
            self.limits.used(agent_id)
        if self.limits.active:
            self._enforce_limits(agent_id)

    def _enforce_limits(self, just_ended: str) -> None:
        # Never an agent with a request running or waiting, nor the one that just answered.
        busy = {
            just_ended,
            *self.running,
            *(t.agent_id for t in self.waiting),
            *(t.agent_id for t in self.tickets.values()),
        }
        for agent_id in self.limits.over(self.memory, {a for a in busy if a is not None}):
            self.anonymous.discard(agent_id)
            self.deferred.append(Forget(agent_id))

    def refused(self, agent_id: str) -> None:
        """The store refused a request: an anonymous agent's kept conversation is restored
        (or its new id dropped), so refused requests leave no agent behind."""
        if is_anonymous(agent_id):
            self.deferred += [Forget(a) for a in self.anonymous.unclaim(agent_id)]

    def abandon_all(self) -> list[Ticket]:
        """Every ticket still held (the engine thread failed)."""
        return [*self.waiting, *self.tickets.values()]

    def refuse_forgets(self) -> None:
        for item in self.forgets:
            item.future.set_exception(ApiError(503, "the server is shutting down", kind="server_error"))


def cancelled_outcome(ticket: Ticket) -> Outcome:
    """The outcome of a ticket cancelled before it reached the engine."""
    return Outcome(ticket.agent_id or "-", "", [], "cancelled", len(ticket.tokens), 0, 0, None, None, 0.0)
