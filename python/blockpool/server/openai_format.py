"""Response bodies and stream chunks of OpenAI's chat and text completion APIs."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

from blockpool.server.tickets import Outcome, TokenLogprob
from blockpool.server.turn_output import ToolCall, Turn

TokenText = Callable[[int], str]


def new_id(prefix: str) -> str:
    """A response id such as ``chatcmpl-...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def usage(outcome: Outcome) -> dict[str, Any]:
    """OpenAI's ``usage``, with ``prompt_tokens_details.cached_tokens``: the prompt tokens resumed."""
    return {
        "prompt_tokens": outcome.prompt_tokens,
        "completion_tokens": outcome.completion_tokens,
        "total_tokens": outcome.prompt_tokens + outcome.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": outcome.cached_tokens},
    }


def finish_reason(outcome: Outcome, turn: Turn | None = None) -> str:
    """``"stop"``, ``"length"``, or ``"tool_calls"`` when the model stopped after calling tools."""
    reason = turn.finish_reason if turn is not None else outcome.finish_reason
    return reason if reason in ("length", "tool_calls") else "stop"


def tool_call_json(call: ToolCall) -> dict[str, Any]:
    """One entry of ``message.tool_calls``: the arguments are JSON text, as OpenAI sends them."""
    return {"id": call.id, "type": "function", "function": {"name": call.name, "arguments": call.arguments}}


def _agent_fields(outcome: Outcome) -> dict[str, Any]:
    # Extensions: which agent ran the request and where its cache came from.
    return {"agent_id": outcome.agent_id, "cache_source": outcome.cache_source}


class ChatFormat:
    """Builds ``chat.completion`` bodies and ``chat.completion.chunk`` events for one request."""

    def __init__(self, model: str, token_text: TokenText, fingerprint: str):
        self.id, self.model, self.created = new_id("chatcmpl"), model, int(time.time())
        self.token_text, self.fingerprint = token_text, fingerprint

    def _base(self, kind: str) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": kind,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
        }

    def response(self, outcome: Outcome, logprobs: bool, turn: Turn) -> dict[str, Any]:
        """The whole answer: its text, reasoning and tool calls (``turn``)."""
        calls = turn.calls
        message: dict[str, Any] = {"role": "assistant", "content": turn.text if turn.text or not calls else None}
        if turn.reasoning:
            message["reasoning"] = message["reasoning_content"] = turn.reasoning
        if calls:
            message["tool_calls"] = [tool_call_json(c) for c in calls]
        choice = {
            "index": 0,
            "message": message,
            "finish_reason": finish_reason(outcome, turn),
            "logprobs": {"content": [chat_logprob(p, self.token_text) for p in outcome.logprobs]} if logprobs else None,
        }
        return {**self._base("chat.completion"), "choices": [choice], "usage": usage(outcome), **_agent_fields(outcome)}

    def first_chunk(self) -> dict[str, Any]:
        """The chunk that opens a stream: the assistant role, no content yet."""
        delta = {"role": "assistant", "content": ""}
        return {
            **self._base("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}],
        }

    def chunk(self, text: str, logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
        """A chunk carrying new text (and its tokens' logprobs, when asked for)."""
        lp = {"content": [chat_logprob(p, self.token_text) for p in logprobs]} if logprobs is not None else None
        return {
            **self._base("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None, "logprobs": lp}],
        }

    def reasoning_chunk(self, text: str) -> dict[str, Any]:
        """A chunk carrying reasoning (as ``reasoning`` and ``reasoning_content``, which clients read)."""
        delta = {"reasoning": text, "reasoning_content": text}
        return {
            **self._base("chat.completion.chunk"),
            "choices": [{"index": 0, "delta": delta, "finish_reason": None, "logprobs": None}],
        }

    def tool_call_chunks(self, call: ToolCall, index: int) -> list[dict[str, Any]]:
        """A tool call as two chunks: its index, id and name, then its arguments (the
        official client's stream helpers accumulate them)."""
        head = {"index": index, "id": call.id, "type": "function", "function": {"name": call.name, "arguments": ""}}
        tail = {"index": index, "function": {"arguments": call.arguments}}
        return [
            {
                **self._base("chat.completion.chunk"),
                "choices": [{"index": 0, "delta": {"tool_calls": [part]}, "finish_reason": None, "logprobs": None}],
            }
            for part in (head, tail)
        ]

    def last_chunk(self, outcome: Outcome, reason: str | None = None) -> dict[str, Any]:
        """The chunk that says why the answer ended (``reason``: the turn's, tool calls counted)."""
        ended = reason if reason in ("length", "tool_calls") else finish_reason(outcome)
        choice = {"index": 0, "delta": {}, "finish_reason": ended, "logprobs": None}
        return {**self._base("chat.completion.chunk"), "choices": [choice], **_agent_fields(outcome)}

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        """``stream_options.include_usage``: the usage, with no choices."""
        return {**self._base("chat.completion.chunk"), "choices": [], "usage": usage(outcome)}


class TextFormat:
    """Builds ``text_completion`` bodies and stream events for one request."""

    def __init__(self, model: str, token_text: TokenText, fingerprint: str):
        self.id, self.model, self.created = new_id("cmpl"), model, int(time.time())
        self.token_text, self.fingerprint = token_text, fingerprint

    def _body(self, text: str, reason: str | None, logprobs: dict[str, Any] | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "object": "text_completion",
            "created": self.created,
            "model": self.model,
            "system_fingerprint": self.fingerprint,
            "choices": [{"index": 0, "text": text, "finish_reason": reason, "logprobs": logprobs}],
        }

    def response(self, outcome: Outcome, logprobs: bool) -> dict[str, Any]:
        """The whole answer."""
        lp = text_logprobs(outcome.logprobs, self.token_text) if logprobs else None
        return {
            **self._body(outcome.text, finish_reason(outcome), lp),
            "usage": usage(outcome),
            **_agent_fields(outcome),
        }

    def chunk(self, text: str, logprobs: list[TokenLogprob] | None) -> dict[str, Any]:
        """An event carrying new text."""
        return self._body(text, None, text_logprobs(logprobs, self.token_text) if logprobs is not None else None)

    def last_chunk(self, outcome: Outcome) -> dict[str, Any]:
        """The event that says why the answer ended."""
        return {**self._body("", finish_reason(outcome), None), **_agent_fields(outcome)}

    def usage_chunk(self, outcome: Outcome) -> dict[str, Any]:
        """``stream_options.include_usage``: the usage, with no choices."""
        body = self._body("", None, None)
        body["choices"] = []
        return {**body, "usage": usage(outcome)}


def chat_logprob(entry: TokenLogprob, token_text: TokenText) -> dict[str, Any]:
    """One token of a chat ``logprobs.content`` list."""
    text = token_text(entry.token)
    return {
        "token": text,
        "logprob": entry.logprob,
        "bytes": list(text.encode("utf-8")),
        "top_logprobs": [
            {"token": token_text(t), "logprob": lp, "bytes": list(token_text(t).encode("utf-8"))} for t, lp in entry.top
        ],
    }


def text_logprobs(entries: list[TokenLogprob], token_text: TokenText) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object."""
    tokens = [token_text(e.token) for e in entries]
    offsets, position = [], 0
    for t in tokens:
        offsets.append(position)
        position += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{token_text(t): lp for t, lp in e.top} for e in entries],
        "text_offset": offsets,
    }
