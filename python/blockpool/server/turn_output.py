"""A generated turn split into reasoning, answer text and tool calls, as ``mlx_lm.server`` splits it.

The model's text goes through mlx-lm's own ``TextStateMachine``, built from
the tokenizer (``make_text_state_machine``): its think markers switch
between answer and reasoning, its tool-call markers open and close a call,
and text that may be the start of a marker is held back until it is known
not to be one, so markup never reaches a client as text. A finished call's
text goes to the tokenizer's own parser (``TokenizerWrapper.tool_parser``,
chosen by mlx-lm from ``tool_parser_type`` or the chat template); each call
gets its own id.

Where this differs from ``mlx_lm.server``: a call whose text the parser
cannot read comes back as answer text, markers included (with a warning in
the log), not dropped, and the turn's finish reason stays ``stop``; and a
request with ``tool_choice: "none"`` gets the model's text as it is,
markup included, since no tools were offered to it.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from mlx_lm.generate import TextStateMachine, make_text_state_machine

log = logging.getLogger("blockpool.server")

SegmentKind = Literal["text", "reasoning", "tool_call"]


@dataclass
class ToolCall:
    """One parsed tool call: its id, the function's name and its arguments as JSON text."""

    id: str
    name: str
    arguments: str

    def input(self) -> Any:
        """The arguments as a JSON value (Anthropic's ``tool_use.input``)."""
        return json.loads(self.arguments)


@dataclass
class Segment:
    """A run of one kind of output: answer text, reasoning text, or one whole tool call."""

    kind: SegmentKind
    text: str = ""
    call: ToolCall | None = None


@dataclass(frozen=True)
class OutputFeatures:
    """What a tokenizer lets the server parse out of a model's text."""

    tool_calls: bool
    reasoning: bool

    @staticmethod
    def of(tokenizer: Any) -> OutputFeatures:
        tools = bool(getattr(tokenizer, "has_tool_calling", False)) and getattr(tokenizer, "tool_parser", None)
        return OutputFeatures(tool_calls=bool(tools), reasoning=bool(getattr(tokenizer, "has_thinking", False)))


class TurnSplitter:
    """Splits one request's generated text into :class:`Segment`\\ s as it streams.

    Args:
        tokenizer: mlx-lm's ``TokenizerWrapper`` (its markers and parser).
        prompt: The prompt's token ids: a prompt that ends inside a think
            block starts in reasoning, as in ``mlx_lm.server``.
        tools: The request's tool definitions (handed to the parser).
        parse_tools: Whether tool calls are parsed (off for ``tool_choice: "none"``).
        id_prefix: Tool call ids start with it (``call_`` for OpenAI, ``toolu_`` for Anthropic).
    """

    def __init__(
        self,
        tokenizer: Any,
        prompt: list[int],
        tools: list[dict[str, Any]] | None = None,
        *,
        parse_tools: bool = True,
        id_prefix: str = "call_",
    ):
        features = OutputFeatures.of(tokenizer)
        self._parser = tokenizer.tool_parser if features.tool_calls and parse_tools else None
        self._tools = tools
        self._id_prefix = id_prefix
        self._markers = (getattr(tokenizer, "tool_call_start", "") or "", getattr(tokenizer, "tool_call_end", "") or "")
        reasoning = features.reasoning
        if reasoning or self._parser is not None:
            machine = _machine(tokenizer, reasoning, self._parser is not None)
            initial = "normal"
            if reasoning and tokenizer.rfind_think_start(prompt) > tokenizer.rfind_think_end(prompt):
                initial = "reasoning"
            self._state: Any = machine.make_state(initial)
        else:
            self._state = None
        self._tool_text: list[str] = []
        self._in_tool = False
        self.calls = 0

    @property
    def made_tool_call(self) -> bool:
        """Whether any tool call was returned."""
        return self.calls > 0

    def feed(self, text: str) -> list[Segment]:
        """The segments that ``text`` completes (held-back text waits for the next call)."""
        if self._state is None:
            return [Segment("text", text)] if text else []
        self._state, parts = TextStateMachine.split(self._state, text)
        return self._segments(parts)

    def finish(self, finish_reason: str) -> list[Segment]:
        """The rest, at the end of the turn: held-back text is kept when the turn was cut
        short (``length``), and dropped after a stop, as ``mlx_lm.server`` does; an open
        tool call is parsed as it stands."""
        out: list[Segment] = []
        if self._state is not None:
            if finish_reason == "length":
                self._state, rest, state = TextStateMachine.flush(self._state)
                out += self._segments([(state, rest)])
            else:
                self._state, _ = TextStateMachine.discard(self._state)
        if self._in_tool:
            out += self._close_call()
        return _merge(out)

    def _segments(self, parts: list[tuple[str | None, str]]) -> list[Segment]:
        out: list[Segment] = []
        for state, text in parts:
            if state == "tool":
                self._in_tool = True
                self._tool_text.append(text)
                continue
            if self._in_tool:
                out += self._close_call()
            if text:
                out.append(Segment("reasoning" if state == "reasoning" else "text", text))
        return _merge(out)

    def _close_call(self) -> list[Segment]:
        raw = "".join(self._tool_text)
        self._tool_text, self._in_tool = [], False
        # What the model wrote, markers included: the text a call that cannot be read comes back as.
        written = f"{self._markers[0]}{raw}{self._markers[1]}"
        try:
            parsed = self._parser(raw, self._tools)
        except Exception as error:  # parsers raise what their format's reader raises
            log.warning("a tool call could not be parsed (%s: %s); it is returned as text", type(error).__name__, error)
            return [Segment("text", written)]
        out = []
        for call in parsed if isinstance(parsed, list) else [parsed]:
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                log.warning("a tool call has no function name; it is returned as text")
                return [Segment("text", written)]
            arguments = call.get("arguments", {})
            text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
            call_id = call.get("id") if isinstance(call.get("id"), str) else f"{self._id_prefix}{uuid.uuid4().hex[:24]}"
            out.append(Segment("tool_call", call=ToolCall(call_id, call["name"], text)))
            self.calls += 1
        return out


def _machine(tokenizer: Any, reasoning: bool, tools: bool) -> TextStateMachine:
    """mlx-lm's state machine, without the parts this request does not parse."""
    if reasoning and tools:
        return make_text_state_machine(tokenizer)
    transitions: dict[str, list[tuple[str, str]]] = {}
    if reasoning:
        transitions = {"normal": [(tokenizer.think_start, "reasoning")], "reasoning": [(tokenizer.think_end, "normal")]}
    else:
        end = tokenizer.tool_call_end
        transitions = {"normal": [(tokenizer.tool_call_start, "tool")], "tool": [(end, "normal")] if end else []}
    return TextStateMachine(transitions)


def _merge(segments: list[Segment]) -> list[Segment]:
    """Adjacent text (or reasoning) segments joined."""
    out: list[Segment] = []
    for segment in segments:
        if out and segment.kind != "tool_call" and out[-1].kind == segment.kind:
            out[-1] = Segment(segment.kind, out[-1].text + segment.text)
        else:
            out.append(segment)
    return out


@dataclass
class Turn:
    """A whole answer, split: its segments in order, and the finish reason with tool calls taken into account."""

    segments: list[Segment]
    finish_reason: str

    @property
    def text(self) -> str:
        return "".join(s.text for s in self.segments if s.kind == "text")

    @property
    def reasoning(self) -> str:
        return "".join(s.text for s in self.segments if s.kind == "reasoning")

    @property
    def calls(self) -> list[ToolCall]:
        return [s.call for s in self.segments if s.call is not None]


def split_turn(splitter: TurnSplitter, text: str, finish_reason: str) -> Turn:
    """Split a whole answer's text; ``finish_reason`` (the engine's) becomes ``"tool_calls"``
    when the model stopped after calling a tool."""
    segments = _merge(splitter.feed(text) + splitter.finish(finish_reason))
    return Turn(segments, ended_with(splitter, finish_reason))


def ended_with(splitter: TurnSplitter, finish_reason: str) -> str:
    """The turn's finish reason: ``"tool_calls"`` for a stop after a tool call, else the engine's."""
    return "tool_calls" if finish_reason == "stop" and splitter.made_tool_call else finish_reason
