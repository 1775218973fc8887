"""Anthropic's Messages API: requests into chat messages, answers into its bodies and events.

A Messages request is rendered with the model's chat template like an
OpenAI chat: ``system`` (a string or text blocks) becomes the first
message; each turn keeps its place. Content blocks map as follows:
``text`` blocks are joined; an assistant's ``tool_use`` block becomes a tool
call (``tool_calls``) and a user's ``tool_result`` block a ``tool`` message
at its position; ``thinking`` blocks are dropped. Images and documents are
refused (this server serves text models). ``tools`` become the template's
function tools. The answer's content blocks come from
:mod:`.turn_output`: ``thinking`` for the model's reasoning, ``text``, and
one ``tool_use`` block per tool call (``stop_reason: "tool_use"``).
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from blockpool.server.api_errors import bad_request
from blockpool.server.schemas import MessagesRequest
from blockpool.server.tickets import Outcome
from blockpool.server.turn_output import Segment, Turn


def to_chat(request: MessagesRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]] | None]:
    """The chat messages and template tools of a Messages request.

    Raises:
        ApiError: An unsupported or malformed content block.
    """
    messages: list[dict[str, Any]] = []
    if request.system is not None:
        system = request.system if isinstance(request.system, str) else _join_text(request.system, "system")
        messages.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        if isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content})
            continue
        messages += _turn(message.role, message.content, f"messages.{i}.content")
    tools = None
    if request.tools is not None:
        tools = []
        for j, tool in enumerate(request.tools):
            if not isinstance(tool.get("name"), str):
                raise bad_request(f"tools.{j}: a tool needs a string 'name'", "tools")
            function = {
                "name": tool["name"],
                "description": tool.get("description", ""),
                "parameters": tool.get("input_schema", {}),
            }
            tools.append({"type": "function", "function": function})
    return messages, tools


def _turn(role: str, blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    text: list[str] = []
    calls: list[dict[str, Any]] = []

    def flush() -> None:
        if text or calls:
            message: dict[str, Any] = {"role": role, "content": "".join(text)}
            if calls:
                message["tool_calls"] = list(calls)
            out.append(message)
        text.clear()
        calls.clear()

    for k, block in enumerate(blocks):
        kind = block.get("type")
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise bad_request(f"{where}.{k}: a text block needs a string 'text'", where)
            text.append(block["text"])
        elif kind == "tool_use" and role == "assistant":
            if not isinstance(block.get("name"), str) or not block["name"]:
                raise bad_request(f"{where}.{k}: a tool_use block needs a string 'name'", where)
            if not isinstance(block.get("input", {}), dict):
                raise bad_request(f"{where}.{k}: a tool_use block's 'input' must be an object", where)
            calls.append(
                {
                    "id": block.get("id"),
                    "type": "function",
                    "function": {"name": block.get("name"), "arguments": block.get("input", {})},
                }
            )
        elif kind == "tool_result" and role == "user":
            flush()
            content = block.get("content", "")
            result = content if isinstance(content, str) else _join_text(content, f"{where}.{k}.content")
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": result})
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise bad_request(f"{where}.{k}: content blocks of type {kind!r} are not supported here", where)
    flush()
    return out


def thinking_args(thinking: dict[str, Any] | None) -> dict[str, Any]:
    """Template arguments for a request's ``thinking``: ``{"type": "disabled"}`` sets
    ``enable_thinking`` false, ``"enabled"`` sets it true (``budget_tokens`` is not
    enforced: ``max_tokens`` bounds the whole answer), none leaves the template's default.

    Raises:
        ApiError: Another ``type``.
    """
    if thinking is None:
        return {}
    kind = thinking.get("type")
    if kind not in ("enabled", "disabled"):
        raise bad_request(f"thinking.type must be 'enabled' or 'disabled', got {kind!r}", "thinking")
    return {"enable_thinking": kind == "enabled"}


def _join_text(blocks: Any, where: str) -> str:
    if not isinstance(blocks, list):
        raise bad_request(f"{where} must be a string or a list of text blocks", where)
    parts = []
    for k, block in enumerate(blocks):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise bad_request(f"{where}.{k}: only text blocks are supported here", where)
        parts.append(block["text"])
    return "".join(parts)


def stop_details(outcome: Outcome, stops: list[str], full_text: str) -> tuple[str, str | None]:
    """Anthropic's ``stop_reason`` and ``stop_sequence``.

    ``full_text`` is the generated text before stop strings were cut; the
    stop sequence that matched is the one found first in it.
    """
    if outcome.finish_reason == "length":
        return "max_tokens", None
    hits = [(i, s) for s in stops if (i := full_text.find(s)) >= 0]
    if hits:
        return "stop_sequence", min(hits)[1]
    return "end_turn", None


def stop_reason(turn_reason: str, reason: str) -> str:
    """``tool_use`` when the model stopped after calling tools, else ``reason`` (from :func:`stop_details`)."""
    return "tool_use" if turn_reason == "tool_calls" and reason == "end_turn" else reason


def content_block(segment: Segment) -> dict[str, Any]:
    """A whole content block of a non-streamed answer."""
    if segment.call is not None:
        return {"type": "tool_use", "id": segment.call.id, "name": segment.call.name, "input": segment.call.input()}
    if segment.kind == "reasoning":
        return {"type": "thinking", "thinking": segment.text, "signature": ""}
    return {"type": "text", "text": segment.text}


class MessageFormat:
    """Builds the Messages API's answer, or its stream of events, for one request."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"msg_{uuid.uuid4().hex}", model, int(time.time())
        self._open: str | None = None  # the kind of the content block a stream has open
        self._blocks = 0  # content blocks a stream has opened

    def _usage(self, outcome: Outcome | None, prompt_tokens: int) -> dict[str, Any]:
        cached = outcome.cached_tokens if outcome is not None else 0
        output = outcome.completion_tokens if outcome is not None else 0
        return {
            "input_tokens": prompt_tokens - cached,
            "output_tokens": output,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
        }

    def response(self, outcome: Outcome, turn: Turn, stop_reason: str, stop_sequence: str | None) -> dict[str, Any]:
        """The whole answer: one content block per run of reasoning or text, and per tool call."""
        content = [content_block(segment) for segment in turn.segments] or [{"type": "text", "text": ""}]
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": self._usage(outcome, outcome.prompt_tokens),
            "agent_id": outcome.agent_id,
            "cache_source": outcome.cache_source,
        }

    def start_events(self, prompt_tokens: int) -> list[tuple[str, dict[str, Any]]]:
        """``message_start`` and a ``ping``; content blocks open as the answer arrives."""
        message = {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": self._usage(None, prompt_tokens),
        }
        return [("message_start", {"type": "message_start", "message": message}), ("ping", {"type": "ping"})]

    def segment_events(self, segment: Segment) -> list[tuple[str, dict[str, Any]]]:
        """The events that carry a segment: a delta to the open block of its kind, or a new block."""
        events = []
        if segment.call is None and self._open == segment.kind:
            return [self._delta(segment)]
        events += self._close()
        call = segment.call
        if call is not None:
            start = {"type": "tool_use", "id": call.id, "name": call.name, "input": {}}
            events.append(self._start(start))
            events.append(self._event({"type": "input_json_delta", "partial_json": call.arguments}))
            events += self._close(force=True)
            return events
        empty = {"type": "thinking", "thinking": "", "signature": ""} if segment.kind == "reasoning" else None
        events.append(self._start(empty or {"type": "text", "text": ""}))
        self._open = segment.kind
        events.append(self._delta(segment))
        return events

    def end_events(
        self, outcome: Outcome, stop_reason: str, stop_sequence: str | None
    ) -> list[tuple[str, dict[str, Any]]]:
        """The open block's ``content_block_stop`` (an empty text block if none was opened),
        ``message_delta`` (the stop reason and final usage) and ``message_stop``."""
        events = self._close()
        if not self._blocks:
            events += [self._start({"type": "text", "text": ""}), *self._close(force=True)]
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": self._usage(outcome, outcome.prompt_tokens),
        }
        return [*events, ("message_delta", delta), ("message_stop", {"type": "message_stop"})]

    def _start(self, block: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        self._blocks += 1
        return "content_block_start", {"type": "content_block_start", "index": self._blocks - 1, "content_block": block}

    def _delta(self, segment: Segment) -> tuple[str, dict[str, Any]]:
        if segment.kind == "reasoning":
            return self._event({"type": "thinking_delta", "thinking": segment.text})
        return self._event({"type": "text_delta", "text": segment.text})

    def _event(self, delta: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        return "content_block_delta", {"type": "content_block_delta", "index": self._blocks - 1, "delta": delta}

    def _close(self, force: bool = False) -> list[tuple[str, dict[str, Any]]]:
        if self._open is None and not force:
            return []
        self._open = None
        return [("content_block_stop", {"type": "content_block_stop", "index": self._blocks - 1})]
