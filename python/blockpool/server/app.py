"""The ASGI app: OpenAI's and Anthropic's endpoints over one :class:`EngineRunner`.

Handlers run on the event loop and never touch the model: they parse and
validate the body (pydantic), tokenize it on a worker thread (with the
server's own copy of the tokenizer, so the engine thread's is never shared),
hand a ticket to the engine thread and await its events. A client that
disconnects, mid-stream or while waiting, cancels its request; its blocks go
back to the pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sse_starlette import EventSourceResponse
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException

from blockpool.errors import InvalidRequestError
from blockpool.prompt import to_token_ids
from blockpool.server import anthropic_format
from blockpool.server.agents import agent_identity
from blockpool.server.anthropic_format import MessageFormat
from blockpool.server.api_errors import ApiError, bad_request, from_validation
from blockpool.server.openai_format import ChatFormat, TextFormat
from blockpool.server.runner import (
    Accepted,
    EngineRunner,
    Failure,
    Outcome,
    Piece,
    Ticket,
)
from blockpool.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    Defaults,
    MessagesRequest,
    agent_from_metadata,
    anthropic_params,
    check_model,
    openai_params,
)

log = logging.getLogger("blockpool.server")


@dataclass
class ServerState:
    """What the handlers share.

    Args:
        runner: The engine thread's owner.
        model_id: The name ``/v1/models`` lists.
        aliases: Other names a request's ``model`` may use for it.
        defaults: Values for fields a request leaves out.
        chat_template_args: Template arguments applied to every chat request
            (a request's ``chat_template_kwargs`` override them).
        rank, world_size: This process's place under ``mlx.launch``.
    """

    runner: EngineRunner
    model_id: str
    aliases: set[str] = field(default_factory=set)
    defaults: Defaults = field(default_factory=Defaults)
    chat_template_args: dict[str, Any] = field(default_factory=dict)
    rank: int = 0
    world_size: int = 1
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        engine = self.runner.memory.engine
        # The HTTP side tokenizes with its own copy: Hugging Face tokenizers are not safe to share across threads.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        self.vocab_size = getattr(getattr(engine.model, "args", None), "vocab_size", None) or len(self.tokenizer)
        self._tokenizer_lock = threading.Lock()
        self._token_texts: dict[int, str] = {}
        self.fingerprint = f"blockpool-{self.model_id}"

    @property
    def served_names(self) -> set[str]:
        return {self.model_id, "default_model", *self.aliases}

    async def tokenize(self, prompt: Any, **template: Any) -> list[int]:
        """Token ids for text or chat messages, computed off the event loop.

        Raises:
            ApiError: 400 with the reason (bad messages, a template failure, an empty prompt).
        """

        def work() -> list[int]:
            with self._tokenizer_lock:
                return to_token_ids(self.tokenizer, prompt, vocab_size=self.vocab_size, **template)

        try:
            return await anyio.to_thread.run_sync(work)
        except InvalidRequestError as error:
            raise bad_request(str(error)) from None

    def token_text(self, token: int) -> str:
        """One token's text (for logprobs)."""
        text = self._token_texts.get(token)
        if text is None:
            with self._tokenizer_lock:
                text = self.tokenizer.decode([token])
            self._token_texts[token] = text
        return text

    def decode(self, tokens: list[int]) -> str:
        """The text of generated tokens, end-of-sequence tokens left out."""
        eos = set(self.tokenizer.eos_token_ids)
        with self._tokenizer_lock:
            return self.tokenizer.decode([t for t in tokens if t not in eos])


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI app serving ``state``; it starts the engine thread on startup and stops it on shutdown."""
    # Streams end when their request ends or uvicorn's drain timeout cancels them, not at the first SIGTERM.
    AppStatus.disable_automatic_graceful_drain()

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if not state.runner.alive:
            state.runner.start()
        yield
        await anyio.to_thread.run_sync(state.runner.stop)

    app = FastAPI(title="blockpool serve", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return _error_response(request, error)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        message = "not found" if error.status_code == 404 else str(error.detail)
        return _error_response(request, ApiError(error.status_code, f"{message}: {request.method} {request.url.path}"))

    @app.exception_handler(Exception)
    async def server_error(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _error_response(
            request, ApiError(500, f"internal error: {type(error).__name__}: {error}", kind="server_error")
        )

    @app.get("/health")
    async def health() -> JSONResponse:
        ok = state.runner.alive
        body = {
            "status": "ok" if ok else "unavailable",
            "model": state.model_id,
            "rank": state.rank,
            "world_size": state.world_size,
            "pid": os.getpid(),
            "in_flight": state.runner.in_flight,
        }
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str) -> dict[str, Any]:
        check_model(model_id, state.served_names)
        return _model_card(state)

    @app.get("/v1/agents")
    async def agents() -> dict[str, Any]:
        rows = await anyio.to_thread.run_sync(state.runner.agents)
        return {"object": "list", "data": rows, "pool": _pool_summary(state)}

    @app.get("/v1/agents/{agent_id:path}")
    async def agent(agent_id: str) -> dict[str, Any]:
        rows = await anyio.to_thread.run_sync(state.runner.agents)
        for row in rows:
            if row["id"] == agent_id:
                return row
        raise ApiError(404, f"no agent {agent_id!r}", code="agent_not_found")

    @app.delete("/v1/agents/{agent_id:path}")
    async def delete_agent(agent_id: str) -> dict[str, Any]:
        rows = await anyio.to_thread.run_sync(state.runner.agents)
        if not any(row["id"] == agent_id for row in rows):
            raise ApiError(404, f"no agent {agent_id!r}", code="agent_not_found")
        await asyncio.wrap_future(state.runner.forget(agent_id))
        return {"id": agent_id, "object": "agent", "deleted": True}

    @app.post("/v1/chat/completions")
    @app.post("/chat/completions")
    async def chat_completions(request: Request) -> Any:
        body = _parse(ChatCompletionRequest, await _json_body(request))
        check_model(body.model, state.served_names)
        agent_id = agent_identity(request.headers.get("x-agent-id"), body.user)
        top = body.top_logprobs or 0
        params = openai_params(
            body, state.defaults, state.vocab_size, logprobs=bool(body.logprobs) or top > 0, top_logprobs=top
        )
        template = {**state.chat_template_args, **(body.chat_template_kwargs or {})}
        tokens = await state.tokenize(
            _openai_messages(body.messages), tools=body.tools or None, chat_template_kwargs=template or None
        )
        fmt = ChatFormat(body.model or state.model_id, state.token_text, state.fingerprint)
        return await _answer_openai(state, request, body, fmt, agent_id, tokens, params, "chat")

    @app.post("/v1/completions")
    @app.post("/completions")
    async def completions(request: Request) -> Any:
        body = _parse(CompletionRequest, await _json_body(request))
        check_model(body.model, state.served_names)
        if body.echo:
            raise bad_request("echo is not supported", "echo")
        if body.suffix:
            raise bad_request("suffix is not supported", "suffix")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise bad_request("only one prompt per request is supported", "prompt")
            prompt = prompt[0]
        agent_id = agent_identity(request.headers.get("x-agent-id"), body.user)
        top = body.logprobs or 0
        params = openai_params(
            body, state.defaults, state.vocab_size, logprobs=body.logprobs is not None, top_logprobs=top
        )
        tokens = await state.tokenize(prompt)
        fmt = TextFormat(body.model or state.model_id, state.token_text, state.fingerprint)
        return await _answer_openai(state, request, body, fmt, agent_id, tokens, params, "completion")

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        body = _parse(MessagesRequest, await _json_body(request))
        check_model(body.model, state.served_names)
        agent_id = agent_identity(request.headers.get("x-agent-id"), agent_from_metadata(body.metadata))
        params = anthropic_params(body, state.defaults, state.vocab_size)
        chat, tools = anthropic_format.to_chat(body)
        template = dict(state.chat_template_args)
        tokens = await state.tokenize(chat, tools=tools, chat_template_kwargs=template or None)
        fmt = MessageFormat(body.model)
        ticket = await _start(state, request, agent_id, tokens, params, "messages")
        if body.stream:
            return _sse(state, ticket, _message_events(state, ticket, fmt))
        outcome = await _finish(state, ticket, request)
        reason, sequence = anthropic_format.stop_details(outcome, params.stop, state.decode(outcome.token_ids))
        return fmt.response(outcome, reason, sequence)

    return app


# ---------------------------------------------------------------- request plumbing


async def _json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise bad_request(f"the body is not valid JSON: {error}") from None
    if not isinstance(body, dict):
        raise bad_request(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def _parse(model: type[BaseModel], body: dict[str, Any]) -> Any:
    try:
        return model.model_validate(body)
    except ValidationError as error:
        raise from_validation(error) from None


def _openai_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Tool-call arguments sent as JSON text become dicts for the template (as ``mlx_lm.server`` does)."""
    out = []
    for i, message in enumerate(messages):
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            fixed = []
            for call in calls:
                function = call.get("function") if isinstance(call, dict) else None
                if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                    try:
                        function = {**function, "arguments": json.loads(function["arguments"])}
                    except json.JSONDecodeError:
                        raise bad_request(
                            f"messages.{i}.tool_calls: arguments are not valid JSON", "messages"
                        ) from None
                    call = {**call, "function": function}
                fixed.append(call)
            message = {**message, "tool_calls": fixed}
        out.append(message)
    return out


async def _answer_openai(
    state: ServerState,
    request: Request,
    body: Any,
    fmt: ChatFormat | TextFormat,
    agent_id: str | None,
    tokens: list[int],
    params: Any,
    label: str,
) -> Any:
    """Run an OpenAI request: a stream of chunks, or the whole answer."""
    ticket = await _start(state, request, agent_id, tokens, params, label)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        first = [{"data": json.dumps(fmt.first_chunk())}] if isinstance(fmt, ChatFormat) else []
        return _sse(state, ticket, _openai_stream(ticket, fmt, include_usage, first))
    outcome = await _finish(state, ticket, request)
    return fmt.response(outcome, params.logprobs)


async def _start(
    state: ServerState, request: Request, agent_id: str | None, tokens: list[int], params: Any, label: str
) -> Ticket:
    """Queue the request and wait until the engine has it (or refused it)."""
    ticket = state.runner.submit(agent_id, tokens, params, asyncio.get_running_loop(), label)
    event = await _next_or_cancel(state, ticket, request)
    if isinstance(event, Failure):
        raise event.error
    if isinstance(event, Outcome):  # cancelled before it started
        raise ApiError(503, "the request was cancelled before it started", kind="server_error")
    assert isinstance(event, Accepted)
    return ticket


async def _finish(state: ServerState, ticket: Ticket, request: Request) -> Outcome:
    """Wait for the whole answer, cancelling it if the client goes away."""
    while True:
        event = await _next_or_cancel(state, ticket, request)
        if isinstance(event, Failure):
            raise event.error
        if isinstance(event, Outcome):
            if event.finish_reason == "cancelled":
                raise ApiError(503, "the request was cancelled (the server is shutting down)", kind="server_error")
            return event


async def _next_or_cancel(state: ServerState, ticket: Ticket, request: Request) -> Any:
    """The ticket's next event; if the client disconnects first, cancel the ticket and wait for its end."""
    get = asyncio.ensure_future(ticket.next())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:
        get.cancel()
        gone.cancel()
        state.runner.cancel(ticket)
        raise
    if get in done:
        gone.cancel()
        return get.result()
    state.runner.cancel(ticket)
    event = await get
    while not isinstance(event, (Outcome, Failure)):
        event = await ticket.next()
    return event


async def _disconnected(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(state: ServerState, ticket: Ticket, events: AsyncIterator[dict[str, Any]]) -> EventSourceResponse:
    async def guarded() -> AsyncIterator[dict[str, Any]]:
        try:
            async for event in events:
                yield event
        finally:
            # The client went away (or the drain timeout passed): stop generating, return the blocks.
            state.runner.cancel(ticket)

    return EventSourceResponse(guarded(), sep="\n")


async def _stream_pieces(ticket: Ticket) -> AsyncIterator[Piece | Outcome]:
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


async def _openai_stream(
    ticket: Ticket, fmt: Any, include_usage: bool, first: list[dict[str, Any]]
) -> AsyncIterator[dict[str, Any]]:
    for event in first:
        yield event
    logprobs = ticket.params.logprobs
    try:
        async for event in _stream_pieces(ticket):
            if isinstance(event, Piece):
                if event.text or logprobs:
                    yield {"data": json.dumps(fmt.chunk(event.text, event.merged if logprobs else None))}
                continue
            if event.finish_reason == "cancelled":
                yield {
                    "data": json.dumps(
                        ApiError(
                            503, "the request was cancelled (the server is shutting down)", kind="server_error"
                        ).openai_body()
                    )
                }
                return
            yield {"data": json.dumps(fmt.last_chunk(event))}
            if include_usage:
                yield {"data": json.dumps(fmt.usage_chunk(event))}
    except ApiError as error:
        yield {"data": json.dumps(error.openai_body())}
    yield {"data": "[DONE]"}


async def _message_events(state: ServerState, ticket: Ticket, fmt: MessageFormat) -> AsyncIterator[dict[str, Any]]:
    for name, data in fmt.start_events(len(ticket.tokens)):
        yield {"event": name, "data": json.dumps(data)}
    try:
        async for event in _stream_pieces(ticket):
            if isinstance(event, Piece):
                if event.text:
                    name, data = fmt.delta_event(event.text)
                    yield {"event": name, "data": json.dumps(data)}
                continue
            if event.finish_reason == "cancelled":
                error = ApiError(503, "the request was cancelled (the server is shutting down)", kind="server_error")
                yield {"event": "error", "data": json.dumps(error.anthropic_body())}
                return
            reason, sequence = anthropic_format.stop_details(event, ticket.params.stop, state.decode(event.token_ids))
            for name, data in fmt.end_events(event, reason, sequence):
                yield {"event": name, "data": json.dumps(data)}
    except ApiError as error:
        yield {"event": "error", "data": json.dumps(error.anthropic_body())}


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    anthropic = request.url.path.rstrip("/") == "/v1/messages"
    body = error.anthropic_body() if anthropic else error.openai_body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _model_card(state: ServerState) -> dict[str, Any]:
    return {"id": state.model_id, "object": "model", "created": int(state.started), "owned_by": "blockpool"}


def _pool_summary(state: ServerState) -> dict[str, Any]:
    stats = state.runner.memory.pool.stats()
    return {
        "total_bytes": stats.total_bytes,
        "used_bytes": stats.used_bytes,
        "total_blocks": stats.total_blocks,
        "used_blocks": stats.used_blocks,
        "free_blocks": stats.free_blocks,
        "shared_blocks": stats.shared_blocks,
        "working_bytes": getattr(stats, "working_bytes", 0),
    }
