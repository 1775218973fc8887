"""What travels between the HTTP side and the engine thread: tickets, their events, and the operations ranks apply.

A :class:`Ticket` is one HTTP request on its way through the engine. The
engine thread posts its events (``Accepted``, one ``Piece`` per token, then
the ``Outcome`` or a ``Failure``) to an :class:`Outbox`, which hands them to
the ticket's event loop once per engine iteration. What arrives from the
HTTP side lands in the runner's inbox (``NewTicket``, ``CancelTicket``,
``ForgetAgent``, ``StopServing``); rank 0 turns it into operations
(``Submit``, ``Cancel``, ``Forget``, ``Stop``) that every rank applies.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from blockpool.server.api_errors import ApiError
from blockpool.server.sampling import GenerationParams

# ---------------------------------------------------------------- operations every rank applies


@dataclass
class Submit:
    """Submit a ticket's request to the store, as this agent."""

    key: int
    agent_id: str
    tokens: list[int]
    params: GenerationParams
    share_prompt: bool = False  # a new agent's prompt: indexed for others once prefilled


@dataclass
class Cancel:
    """Cancel the request of a ticket."""

    key: int


@dataclass
class Forget:
    """Delete an agent from the pool and disk."""

    agent_id: str


@dataclass
class Stop:
    """Stop serving: every rank shuts down."""

    pass


# ---------------------------------------------------------------- what a ticket receives


@dataclass
class Accepted:
    """The request is in the engine (it may still wait there for room)."""

    agent_id: str


@dataclass
class TokenLogprob:
    """One token's log-probability, and the best alternatives asked for."""

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
class NewTicket:
    ticket: Ticket


@dataclass
class CancelTicket:
    key: int


@dataclass
class ForgetAgent:
    agent_id: str
    future: Future


@dataclass
class StopServing:
    pass
