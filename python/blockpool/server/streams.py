"""Server-sent event streams: OpenAI's chunks and Anthropic's events, built from a ticket's pieces.

A chat answer's text goes through the request's :class:`TurnSplitter`
first, so reasoning, answer text and tool calls stream as what they are.
Logprobs of tokens whose text is held back (a possible marker) ride on the
next chunk that is sent.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from sse_starlette import EventSourceResponse

from blockpool.server import anthropic_format
from blockpool.server.anthropic_format import MessageFormat
from blockpool.server.api_errors import ApiError
from blockpool.server.openai_format import ChatFormat, TextFormat
from blockpool.server.runner import EngineRunner
from blockpool.server.ticket_io import cancelled_error, pieces
from blockpool.server.tickets import Piece, Ticket, TokenLogprob
from blockpool.server.turn_output import Segment, TurnSplitter, ended_with

Event = dict[str, Any]


def sse(runner: EngineRunner, ticket: Ticket, events: AsyncIterator[Event]) -> EventSourceResponse:
    """The response that sends ``events``; when it ends for any reason, the ticket is cancelled."""

    async def guarded() -> AsyncIterator[Event]:
        try:
            async for event in events:
                yield event
        finally:
            # The client went away (or the drain timeout passed): stop generating, return the blocks.
            runner.cancel(ticket)

    return EventSourceResponse(guarded(), sep="\n")


def _data(body: dict[str, Any]) -> Event:
    return {"data": json.dumps(body)}


async def text_stream(ticket: Ticket, fmt: TextFormat, include_usage: bool) -> AsyncIterator[Event]:
    """``text_completion`` chunks: the raw text, as legacy completions return it."""
    logprobs = ticket.params.logprobs
    try:
        async for event in pieces(ticket):
            if isinstance(event, Piece):
                if event.text or logprobs:
                    yield _data(fmt.chunk(event.text, event.merged if logprobs else None))
                continue
            if event.finish_reason == "cancelled":
                yield _data(cancelled_error().openai_body())
                return
            yield _data(fmt.last_chunk(event))
            if include_usage:
                yield _data(fmt.usage_chunk(event))
    except ApiError as error:
        yield _data(error.openai_body())
    yield {"data": "[DONE]"}


async def chat_stream(
    ticket: Ticket, fmt: ChatFormat, splitter: TurnSplitter, include_usage: bool
) -> AsyncIterator[Event]:
    """``chat.completion.chunk`` events: role, then text, reasoning and tool calls, then the finish reason."""
    yield _data(fmt.first_chunk())
    logprobs = ticket.params.logprobs
    held: list[TokenLogprob] = []  # logprobs of tokens whose text has not been sent yet
    calls = 0

    def chunks(segments: list[Segment]) -> list[Event]:
        nonlocal calls, held
        out = []
        for segment in segments:
            if segment.call is not None:
                out += [_data(c) for c in fmt.tool_call_chunks(segment.call, calls)]
                calls += 1
            elif segment.kind == "reasoning":
                out.append(_data(fmt.reasoning_chunk(segment.text)))
            else:
                out.append(_data(fmt.chunk(segment.text, held if logprobs else None)))
                held = []
        return out

    try:
        async for event in pieces(ticket):
            if isinstance(event, Piece):
                held += event.merged if logprobs else []
                for chunk in chunks(splitter.feed(event.text)):
                    yield chunk
                continue
            if event.finish_reason == "cancelled":
                yield _data(cancelled_error().openai_body())
                return
            for chunk in chunks(splitter.finish(event.finish_reason)):
                yield chunk
            if logprobs and held:
                yield _data(fmt.chunk("", held))
            yield _data(fmt.last_chunk(event, ended_with(splitter, event.finish_reason)))
            if include_usage:
                yield _data(fmt.usage_chunk(event))
    except ApiError as error:
        yield _data(error.openai_body())
    yield {"data": "[DONE]"}


async def message_stream(
    ticket: Ticket, fmt: MessageFormat, splitter: TurnSplitter, decode: Any
) -> AsyncIterator[Event]:
    """The Messages API's events: ``message_start``, content blocks as they arrive, then
    ``message_delta`` and ``message_stop``."""

    def named(events: list[tuple[str, dict[str, Any]]]) -> list[Event]:
        return [{"event": name, "data": json.dumps(data)} for name, data in events]

    for event in named(fmt.start_events(len(ticket.tokens))):
        yield event
    try:
        async for event in pieces(ticket):
            if isinstance(event, Piece):
                for segment in splitter.feed(event.text):
                    for sent in named(fmt.segment_events(segment)):
                        yield sent
                continue
            if event.finish_reason == "cancelled":
                yield {"event": "error", "data": json.dumps(cancelled_error().anthropic_body())}
                return
            for segment in splitter.finish(event.finish_reason):
                for sent in named(fmt.segment_events(segment)):
                    yield sent
            reason, sequence = anthropic_format.stop_details(event, ticket.params.stop, decode(event.token_ids))
            reason = anthropic_format.stop_reason(ended_with(splitter, event.finish_reason), reason)
            for sent in named(fmt.end_events(event, reason, sequence)):
                yield sent
    except ApiError as error:
        yield {"event": "error", "data": json.dumps(error.anthropic_body())}
