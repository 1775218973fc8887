"""Anthropic's Messages API: requests into chat messages, answers into its bodies and events.

A Messages request is rendered with the model's chat template like an
OpenAI chat: ``system`` (a string or text blocks) becomes the first
message; each turn keeps its place. Content blocks map as follows:
``text`` blocks are joined; an assistant's ``tool_use`` block becomes a tool
call (``tool_calls``) and a user's ``tool_result`` block a ``tool`` message
at its position; ``thinking`` blocks are dropped. Images and documents are
refused (this server serves text models). ``tools`` become the template's
function tools. Tool calls in the *output* are not parsed: the answer is one
text block.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from blockpool.server.api_errors import bad_request
from blockpool.server.schemas import MessagesRequest
from blockpool.server.tickets import Outcome


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


class MessageFormat:
    """Builds the Messages API's answer, or its stream of events, for one request."""

    def __init__(self, model: str):
        self.id, self.model, self.created = f"msg_{uuid.uuid4().hex}", model, int(time.time())

    def _usage(self, outcome: Outcome | None, prompt_tokens: int) -> dict[str, Any]:
        cached = outcome.cached_tokens if outcome is not None else 0
        output = outcome.completion_tokens if outcome is not None else 0
        return {
            "input_tokens": prompt_tokens - cached,
            "output_tokens": output,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": 0,
        }

    def response(self, outcome: Outcome, stop_reason: str, stop_sequence: str | None) -> dict[str, Any]:
        """The whole answer."""
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [{"type": "text", "text": outcome.text}],
            "stop_reason": stop_reason,
            "stop_sequence": stop_sequence,
            "usage": self._usage(outcome, outcome.prompt_tokens),
            "agent_id": outcome.agent_id,
            "cache_source": outcome.cache_source,
        }

    def start_events(self, prompt_tokens: int) -> list[tuple[str, dict[str, Any]]]:
        """``message_start``, ``content_block_start`` and a ``ping``."""
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
        return [
            ("message_start", {"type": "message_start", "message": message}),
            (
                "content_block_start",
                {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
            ),
            ("ping", {"type": "ping"}),
        ]

    @staticmethod
    def delta_event(text: str) -> tuple[str, dict[str, Any]]:
        """A ``content_block_delta`` with new text."""
        return "content_block_delta", {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": text},
        }

    def end_events(
        self, outcome: Outcome, stop_reason: str, stop_sequence: str | None
    ) -> list[tuple[str, dict[str, Any]]]:
        """``content_block_stop``, ``message_delta`` (the stop reason and final usage) and ``message_stop``."""
        delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": stop_sequence},
            "usage": self._usage(outcome, outcome.prompt_tokens),
        }
        return [
            ("content_block_stop", {"type": "content_block_stop", "index": 0}),
            ("message_delta", delta),
            ("message_stop", {"type": "message_stop"}),
        ]
