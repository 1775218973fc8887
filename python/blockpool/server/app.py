"""The ASGI app: OpenAI's and Anthropic's endpoints over one :class:`EngineRunner`.

Handlers run on the event loop and never touch the model: they parse and
validate the body (pydantic), tokenize it on a worker thread (with the
server's own copy of the tokenizer, so the engine thread's is never shared),
hand a ticket to the engine thread and await its events (:mod:`.ticket_io`,
:mod:`.streams`). A client that disconnects, mid-stream or while waiting,
cancels its request; its blocks go back to the pool. Chat answers are split
into reasoning, text and tool calls by :mod:`.turn_output`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from sse_starlette.sse import AppStatus
from starlette.exceptions import HTTPException as StarletteHTTPException

from blockpool.server import anthropic_format, streams
from blockpool.server.agents import agent_identity
from blockpool.server.anthropic_format import MessageFormat
from blockpool.server.api_errors import ApiError, bad_request, from_validation
from blockpool.server.guard import RequestGuard
from blockpool.server.openai_format import ChatFormat, TextFormat
from blockpool.server.schemas import (
    ChatCompletionRequest,
    CompletionRequest,
    MessagesRequest,
    agent_from_metadata,
    anthropic_params,
    anthropic_tool_choice,
    check_model,
    openai_params,
    openai_tool_choice,
)
from blockpool.server.state import ServerState
from blockpool.server.ticket_io import finish, start
from blockpool.server.turn_output import split_turn

__all__ = ["ServerState", "create_app"]

log = logging.getLogger("blockpool.server")


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
    app.add_middleware(RequestGuard, api_key=state.api_key, body_timeout=state.body_timeout)

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
        use_tools = openai_tool_choice(body.tool_choice)
        tools = (body.tools or None) if use_tools else None
        template = {**state.chat_template_args, **(body.chat_template_kwargs or {})}
        tokens = await state.tokenize(
            _openai_messages(body.messages), tools=tools, chat_template_kwargs=template or None
        )
        splitter = state.splitter(tokens, tools, use_tools, "call_")
        fmt = ChatFormat(body.model or state.model_id, state.token_text, state.fingerprint)
        ticket = await start(state.runner, request, agent_id, tokens, params, "chat")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return streams.sse(state.runner, ticket, streams.chat_stream(ticket, fmt, splitter, include_usage))
        outcome = await finish(state.runner, ticket, request)
        return fmt.response(outcome, params.logprobs, split_turn(splitter, outcome.text, outcome.finish_reason))

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
        ticket = await start(state.runner, request, agent_id, tokens, params, "completion")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return streams.sse(state.runner, ticket, streams.text_stream(ticket, fmt, include_usage))
        outcome = await finish(state.runner, ticket, request)
        return fmt.response(outcome, params.logprobs)

    @app.post("/v1/messages")
    async def messages(request: Request) -> Any:
        body = _parse(MessagesRequest, await _json_body(request))
        check_model(body.model, state.served_names)
        agent_id = agent_identity(
            request.headers.get("x-agent-id"), agent_from_metadata(body.metadata), "metadata.user_id"
        )
        params = anthropic_params(body, state.defaults, state.vocab_size)
        use_tools = anthropic_tool_choice(body.tool_choice)
        chat, tools = anthropic_format.to_chat(body)
        tools = tools if use_tools else None
        template = {**state.chat_template_args, **anthropic_format.thinking_args(body.thinking)}
        tokens = await state.tokenize(chat, tools=tools, chat_template_kwargs=template or None)
        splitter = state.splitter(tokens, tools, use_tools, "toolu_")
        fmt = MessageFormat(body.model)
        ticket = await start(state.runner, request, agent_id, tokens, params, "messages")
        if body.stream:
            return streams.sse(state.runner, ticket, streams.message_stream(ticket, fmt, splitter, state.decode))
        outcome = await finish(state.runner, ticket, request)
        turn = split_turn(splitter, outcome.text, outcome.finish_reason)
        reason, sequence = anthropic_format.stop_details(outcome, params.stop, state.decode(outcome.token_ids))
        return fmt.response(outcome, turn, anthropic_format.stop_reason(turn.finish_reason, reason), sequence)

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
    """The messages checked for what the template cannot catch, tool-call arguments sent as
    JSON text made dicts for the template (as ``mlx_lm.server`` does).

    Raises:
        ApiError: A user or system message without content, ``tool_calls`` that is not a
            list of calls with a function name, or arguments that are not JSON.
    """
    out = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if not isinstance(message, dict):
            raise bad_request(f"{where} must be an object", "messages")
        if message.get("role") in ("user", "system", "developer") and message.get("content") is None:
            raise bad_request(f"{where}: a {message['role']} message needs content", "messages")
        calls = message.get("tool_calls")
        if calls is not None:
            message = {
                **message,
                "tool_calls": [
                    _tool_call(call, f"{where}.tool_calls.{j}") for j, call in enumerate(_listed(calls, where))
                ],
            }
        out.append(message)
    return out


def _listed(calls: Any, where: str) -> list[Any]:
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls must be a list of tool calls", "messages")
    return calls


def _tool_call(call: Any, where: str) -> dict[str, Any]:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str) or not function["name"]:
        raise bad_request(f"{where} needs a 'function' with a string 'name'", "messages")
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            raise bad_request(f"{where}: arguments are not valid JSON", "messages") from None
        function = {**function, "arguments": arguments}
    return {**call, "function": function}


def _error_response(request: Request, error: ApiError) -> JSONResponse:
    anthropic = request.url.path.rstrip("/") == "/v1/messages"
    body = error.anthropic_body() if anthropic else error.openai_body()
    return JSONResponse(body, status_code=error.status, headers=error.headers)


def _model_card(state: ServerState) -> dict[str, Any]:
    # ``capabilities`` is an extension: whether tool calls and reasoning are parsed out of this model's answers.
    capabilities = {"tool_calls": state.features.tool_calls, "reasoning": state.features.reasoning}
    card = {"id": state.model_id, "object": "model", "created": int(state.started), "owned_by": "blockpool"}
    return {**card, "capabilities": capabilities}


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
