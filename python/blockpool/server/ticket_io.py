"""A handler's side of a ticket: start it, await its events, cancel it when the client goes away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request

from blockpool.server.api_errors import ApiError
from blockpool.server.runner import EngineRunner
from blockpool.server.tickets import Accepted, Failure, Outcome, Piece, Ticket

SHUTTING_DOWN = "the request was cancelled (the server is shutting down)"


def cancelled_error() -> ApiError:
    """The error a request gets when the server cancels it on shutdown."""
    return ApiError(503, SHUTTING_DOWN, kind="server_error")


async def start(
    runner: EngineRunner, request: Request, agent_id: str | None, tokens: list[int], params: Any, label: str
) -> Ticket:
    """Queue the request and wait until the engine has it (or refused it).

    Raises:
        ApiError: The engine refused the request, or it was cancelled first.
    """
    ticket = runner.submit(agent_id, tokens, params, asyncio.get_running_loop(), label)
    event = await next_or_cancel(runner, ticket, request)
    if isinstance(event, Failure):
        raise event.error
    if isinstance(event, Outcome):  # cancelled before it started
        raise ApiError(503, "the request was cancelled before it started", kind="server_error")
    assert isinstance(event, Accepted)
    return ticket


async def finish(runner: EngineRunner, ticket: Ticket, request: Request) -> Outcome:
    """Wait for the whole answer, cancelling it if the client goes away."""
    while True:
        event = await next_or_cancel(runner, ticket, request)
        if isinstance(event, Failure):
            raise event.error
        if isinstance(event, Outcome):
            if event.finish_reason == "cancelled":
                raise cancelled_error()
            return event


async def next_or_cancel(runner: EngineRunner, ticket: Ticket, request: Request) -> Any:
    """The ticket's next event; if the client disconnects first, cancel the ticket and wait for its end."""
    get = asyncio.ensure_future(ticket.next())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        get.cancel()
        gone.cancel()
        runner.cancel(ticket)
        raise
    if get in done:
        gone.cancel()
        return get.result()
    runner.cancel(ticket)
    event = await get
    while not isinstance(event, (Outcome, Failure)):
        event = await ticket.next()
    return event


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def pieces(ticket: Ticket) -> AsyncIterator[Piece | Outcome]:
    """The ticket's pieces, then its outcome; a failure mid-stream raises its ``ApiError``.

    Pieces that are already waiting are merged into one (their text joined,
    their logprobs in ``merged``), so a client that reads slower than the
    engine decodes gets fewer, larger chunks instead of falling behind.
    """
    while True:
        events = [await ticket.next(), *ticket.ready()]
        pending: Piece | None = None
        for event in events:
            if isinstance(event, Failure):
                raise event.error
            if isinstance(event, Piece):
                if pending is None:
                    pending = Piece(event.text, event.token, event.logprob)
                    pending.merged = [event.logprob] if event.logprob is not None else []
                else:
                    pending.text += event.text
                    if event.logprob is not None:
                        pending.merged.append(event.logprob)
                continue
            if pending is not None:
                yield pending
                pending = None
            yield event
            if isinstance(event, Outcome):
                return
        if pending is not None:
            yield pending
