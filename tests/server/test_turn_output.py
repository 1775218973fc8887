"""Splitting a model's text into reasoning, answer text and tool calls, with the tool model's real tokenizer.

The tokenizer comes from ``mlx_lm.load`` (the tool model's directory,
untrained: only its tokenizer, template and parser matter here), so the
markers and the parser are mlx-lm's own.
"""

from __future__ import annotations

import json

import pytest
from mlx_lm import load

import tool_model
from blockpool.server.turn_output import OutputFeatures, TurnSplitter, split_turn


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    path = tool_model.write_tool_model_dir(tmp_path_factory.mktemp("tool-tokenizer"), steps=0)
    return load(str(path))[1]


def splitter(tokenizer, prompt=None, **kwargs) -> TurnSplitter:
    prompt = prompt if prompt is not None else tokenizer.apply_chat_template(tool_model.ASK, add_generation_prompt=True)
    return TurnSplitter(tokenizer, prompt, tool_model.TOOLS, **kwargs)


def test_the_tool_models_tokenizer_parses_tool_calls_and_reasoning(tokenizer):
    assert OutputFeatures.of(tokenizer) == OutputFeatures(tool_calls=True, reasoning=True)


def test_one_call_becomes_a_tool_call_segment(tokenizer):
    turn = split_turn(splitter(tokenizer), tool_model.CALL, "stop")
    assert turn.finish_reason == "tool_calls"
    assert turn.text == "" and turn.reasoning == ""
    (call,) = turn.calls
    assert call.name == "get_weather" and json.loads(call.arguments) == {"city": "paris"}
    assert call.id.startswith("call_") and call.input() == {"city": "paris"}


def test_two_calls_get_their_own_ids(tokenizer):
    turn = split_turn(splitter(tokenizer, id_prefix="toolu_"), tool_model.CALL_TWO, "stop")
    first, second = turn.calls
    assert [first.input(), second.input()] == [{"city": "paris"}, {"city": "rome"}]
    assert first.id != second.id and first.id.startswith("toolu_")


def test_text_before_a_call_stays_text_and_markup_never_streams(tokenizer):
    split = splitter(tokenizer)
    streamed = []
    for ch in tool_model.PREAMBLE_ANSWER:  # one character at a time: markers arrive in pieces
        streamed += split.feed(ch)
    streamed += split.finish("stop")
    text = "".join(s.text for s in streamed if s.kind == "text")
    assert text == "let me check. "
    assert "<" not in text
    assert [s.call.name for s in streamed if s.call] == ["get_weather"]


def test_reasoning_is_split_from_the_answer(tokenizer):
    turn = split_turn(splitter(tokenizer), tool_model.THINK_ANSWER, "stop")
    assert turn.reasoning == tool_model.THOUGHT and turn.text == "to save memory"
    assert turn.finish_reason == "stop"


def test_a_prompt_that_ends_inside_a_think_block_starts_in_reasoning(tokenizer):
    prompt = tokenizer.apply_chat_template(tool_model.THINK_ASK, add_generation_prompt=True)
    prompt = prompt + tokenizer.encode("<think>", add_special_tokens=False)
    turn = split_turn(splitter(tokenizer, prompt), f"{tool_model.THOUGHT}</think>done", "stop")
    assert turn.reasoning == tool_model.THOUGHT and turn.text == "done"


def test_without_tool_parsing_the_markup_is_text(tokenizer):
    turn = split_turn(splitter(tokenizer, parse_tools=False), tool_model.CALL, "stop")
    assert turn.text == tool_model.CALL and turn.calls == [] and turn.finish_reason == "stop"


def test_an_unparseable_call_comes_back_as_text(tokenizer, caplog):
    turn = split_turn(splitter(tokenizer), "<tool_call>not json</tool_call>", "stop")
    assert turn.calls == [] and turn.text == "<tool_call>not json</tool_call>" and turn.finish_reason == "stop"
    assert "could not be parsed" in caplog.text


def test_a_turn_cut_short_keeps_held_back_text(tokenizer):
    # "<tool" may be the start of a marker: held back while streaming, kept when the turn hits its length.
    split = splitter(tokenizer)
    sent = "".join(s.text for s in split.feed("hello <tool"))
    assert "<tool" not in sent
    rest = "".join(s.text for s in split.finish("length"))
    assert sent + rest == "hello <tool"


def test_a_call_cut_short_is_parsed_as_it_stands(tokenizer):
    turn = split_turn(splitter(tokenizer), tool_model.CALL[: -len("</tool_call>")], "length")
    assert [c.name for c in turn.calls] == ["get_weather"] and turn.finish_reason == "length"
