"""Tool calls and reasoning through the official clients, on a model trained in the fixture to call tools.

The model (``tests/tool_model.py``) answers "the weather in paris" with one
``get_weather`` call, "... paris and rome" with two, the tool's result with
a sentence, "check the weather ..." with text and then a call, and "why do
agents share blocks" with a thought and an answer. Each answer is checked
against mlx-lm's own generation when the model is built, so what these
tests see is what the model said, split by the server.
"""

from __future__ import annotations

import json

import anthropic
import openai
import pytest
from server_process import ServerProcess

import tool_model
from blockpool.store.resume import common_prefix
from conftest import stop_all


@pytest.fixture(scope="module")
def servers(tool_model_dir, tmp_path_factory):
    started = []

    def start(*flags: str, mlx_lm: bool = False) -> ServerProcess:
        base = tmp_path_factory.mktemp("tools")
        if mlx_lm:
            server = ServerProcess.mlx_lm(tool_model_dir, base / "server.log", *flags)
        else:
            server = ServerProcess.blockpool(tool_model_dir, base / "cache", base / "server.log", *flags)
        started.append(server)
        return server.start()

    yield start
    stop_all(started)


@pytest.fixture(scope="module")
def server(servers) -> ServerProcess:
    return servers()


@pytest.fixture(scope="module")
def mlx_lm_server(servers) -> ServerProcess:
    return servers(mlx_lm=True)


@pytest.fixture(scope="module")
def tokenizer(tool_model_dir):
    from mlx_lm import load

    return load(str(tool_model_dir))[1]


def chat(server: ServerProcess, messages, tools=None, **kwargs):
    if tools is not None:
        kwargs["tools"] = tools
    return server.openai().chat.completions.create(
        model="default_model", messages=messages, max_tokens=64, temperature=0.0, **kwargs
    )


def arguments(call) -> dict:
    return json.loads(call.function.arguments)


# ---------------------------------------------------------------- OpenAI


def test_a_tool_call_comes_back_as_tool_calls(server):
    response = chat(server, tool_model.ASK, tools=tool_model.TOOLS)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather" and arguments(call) == {"city": "paris"}


def test_the_same_shapes_as_mlx_lm_server(server, mlx_lm_server):
    # Each prompt as the model learned it (with the tools, or without for the thinking one).
    for messages, tools in [(m, t) for m, t, _ in tool_model.LESSONS]:
        ours, theirs = (chat(s, messages, tools=tools).choices[0] for s in (server, mlx_lm_server))
        assert ours.finish_reason == theirs.finish_reason
        assert ours.message.content == theirs.message.content
        assert getattr(ours.message, "reasoning", None) == getattr(theirs.message, "reasoning", None)
        assert [(c.function.name, arguments(c)) for c in ours.message.tool_calls or []] == [
            (c.function.name, arguments(c)) for c in theirs.message.tool_calls or []
        ]


def test_two_calls_in_one_turn_each_with_its_own_id(server):
    calls = chat(server, tool_model.ASK_TWO, tools=tool_model.TOOLS).choices[0].message.tool_calls
    assert [arguments(c) for c in calls] == [{"city": "paris"}, {"city": "rome"}]
    assert len({c.id for c in calls}) == 2


def test_streamed_tool_calls_accumulate_in_the_clients_stream_helper(server):
    with server.openai().chat.completions.stream(
        model="default_model", messages=tool_model.ASK_TWO, tools=tool_model.TOOLS, max_tokens=64, temperature=0.0
    ) as stream:
        final = stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert [(c.function.name, arguments(c)) for c in choice.message.tool_calls] == [
        ("get_weather", {"city": "paris"}),
        ("get_weather", {"city": "rome"}),
    ]
    assert len({c.id for c in choice.message.tool_calls}) == 2


def test_text_before_a_call_streams_as_text_and_the_markup_never_does(server):
    chunks = list(
        server.openai().chat.completions.create(
            model="default_model",
            messages=tool_model.PREAMBLE,
            tools=tool_model.TOOLS,
            max_tokens=64,
            temperature=0.0,
            stream=True,
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "let me check. "
    deltas = [d for c in chunks if c.choices for d in c.choices[0].delta.tool_calls or []]
    assert deltas[0].index == 0 and deltas[0].id.startswith("call_") and deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    non_stream = chat(server, tool_model.PREAMBLE, tools=tool_model.TOOLS).choices[0].message
    assert non_stream.content == "let me check. " and len(non_stream.tool_calls) == 1


def test_the_agent_resumes_across_the_tool_result_turn(server, tokenizer):
    client = server.openai(default_headers={"X-Agent-Id": "weather-agent"})
    first = client.chat.completions.create(
        model="default_model", messages=tool_model.ASK, tools=tool_model.TOOLS, max_tokens=64, temperature=0.0
    )
    message = first.choices[0].message
    call = message.tool_calls[0]
    history = [
        *tool_model.ASK,
        {"role": "assistant", "content": message.content, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": tool_model.RESULT["content"]},
    ]
    second = client.chat.completions.create(
        model="default_model", messages=history, tools=tool_model.TOOLS, max_tokens=64, temperature=0.0
    )
    assert second.choices[0].message.content == tool_model.ANSWER
    assert second.choices[0].finish_reason == "stop"
    # What the agent holds after turn one: its prompt and the tokens it generated (the call and the end of turn).
    prompt_one = tokenizer.apply_chat_template(tool_model.ASK, tools=tool_model.TOOLS, add_generation_prompt=True)
    held = prompt_one + tokenizer.encode(tool_model.CALL + tool_model.END, add_special_tokens=False)
    prompt_two = tokenizer.apply_chat_template(
        tool_model.AFTER_RESULT, tools=tool_model.TOOLS, add_generation_prompt=True
    )
    assert second.usage.prompt_tokens == len(prompt_two)
    # At least what the agent held of it; another agent's blocks may give more (shared to the token).
    assert second.usage.prompt_tokens_details.cached_tokens >= common_prefix(held, prompt_two) > len(prompt_one)


def test_tool_choice_none_renders_no_tools_and_parses_no_calls(server, tokenizer):
    response = chat(server, tool_model.ASK, tools=tool_model.TOOLS, tool_choice="none")
    without_tools = tokenizer.apply_chat_template(tool_model.ASK, add_generation_prompt=True)
    assert response.usage.prompt_tokens == len(without_tools)
    assert response.choices[0].message.tool_calls is None
    assert response.choices[0].finish_reason in ("stop", "length")


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_tool_choice_the_server_cannot_honour_is_a_400(server, choice):
    with pytest.raises(openai.BadRequestError) as raised:
        chat(server, tool_model.ASK, tools=tool_model.TOOLS, tool_choice=choice)
    assert raised.value.body["param"] == "tool_choice"


def test_reasoning_comes_apart_from_the_answer(server):
    message = chat(server, tool_model.THINK_ASK).choices[0].message
    assert message.content == "to save memory"
    assert message.reasoning == tool_model.THOUGHT
    assert message.model_extra["reasoning_content"] == tool_model.THOUGHT


def test_streamed_reasoning_comes_in_its_own_deltas(server):
    chunks = list(chat(server, tool_model.THINK_ASK, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert "".join(getattr(d, "reasoning", None) or "" for d in deltas) == tool_model.THOUGHT
    assert "".join(d.model_extra.get("reasoning_content") or "" for d in deltas) == tool_model.THOUGHT
    assert "".join(d.content or "" for d in deltas) == "to save memory"


def test_enable_thinking_false_from_the_command_line_keeps_working(servers, tokenizer):
    server = servers("--chat-template-args", json.dumps({"enable_thinking": False}))
    response = chat(server, tool_model.THINK_ASK)
    expected = tokenizer.apply_chat_template(tool_model.THINK_ASK, add_generation_prompt=True, enable_thinking=False)
    assert response.usage.prompt_tokens == len(expected)
    assert getattr(response.choices[0].message, "reasoning", None) is None


def test_the_model_card_says_what_is_parsed(server):
    status, body = server.request("GET", "/v1/models")
    assert status == 200
    assert body["data"][0]["capabilities"] == {"tool_calls": True, "reasoning": True}


# ---------------------------------------------------------------- Anthropic
# (anthropic's client no longer takes ``temperature``: the server's default, 0, is greedy.)


def anthropic_tools() -> list[dict]:
    function = tool_model.WEATHER_TOOL["function"]
    return [{"name": function["name"], "description": function["description"], "input_schema": function["parameters"]}]


def message(server: ServerProcess, messages, **kwargs):
    return server.anthropic().messages.create(model="default_model", messages=messages, max_tokens=64, **kwargs)


def test_anthropic_tool_use_blocks(server):
    response = message(server, tool_model.ASK, tools=anthropic_tools())
    assert response.stop_reason == "tool_use"
    (block,) = response.content
    assert block.type == "tool_use" and block.id.startswith("toolu_")
    assert block.name == "get_weather" and block.input == {"city": "paris"}


def test_anthropic_streamed_tool_use_accumulates_in_the_clients_helper(server):
    with server.anthropic().messages.stream(
        model="default_model", messages=tool_model.PREAMBLE, tools=anthropic_tools(), max_tokens=64
    ) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_message()
    assert "input_json" in events or "content_block_delta" in events
    assert [b.type for b in final.content] == ["text", "tool_use"]
    assert final.content[0].text == "let me check. "
    assert final.content[1].input == {"city": "paris"}
    assert final.stop_reason == "tool_use"


def test_anthropic_agent_resumes_across_the_tool_result(server, tokenizer):
    client = server.anthropic()
    headers = {"X-Agent-Id": "anthropic-weather-agent"}
    first = client.messages.create(
        model="default_model",
        messages=tool_model.ASK,
        tools=anthropic_tools(),
        max_tokens=64,
        extra_headers=headers,
    )
    use = first.content[0]
    history = [
        *tool_model.ASK,
        {"role": "assistant", "content": [use.model_dump()]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": tool_model.RESULT["content"]}],
        },
    ]
    second = client.messages.create(
        model="default_model",
        messages=history,
        tools=anthropic_tools(),
        max_tokens=64,
        extra_headers=headers,
    )
    assert [b.type for b in second.content] == ["text"] and second.content[0].text == tool_model.ANSWER
    assert second.stop_reason == "end_turn"
    prompt_one = tokenizer.apply_chat_template(tool_model.ASK, tools=tool_model.TOOLS, add_generation_prompt=True)
    held = prompt_one + tokenizer.encode(tool_model.CALL + tool_model.END, add_special_tokens=False)
    prompt_two = tokenizer.apply_chat_template(
        tool_model.AFTER_RESULT, tools=tool_model.TOOLS, add_generation_prompt=True
    )
    # At least what the agent held of it; another agent's blocks may give more (shared to the token).
    assert second.usage.cache_read_input_tokens >= common_prefix(held, prompt_two) > len(prompt_one)
    assert second.usage.input_tokens + second.usage.cache_read_input_tokens == len(prompt_two)


def test_anthropic_thinking_blocks(server):
    response = message(server, tool_model.THINK_ASK)
    assert [b.type for b in response.content] == ["thinking", "text"]
    assert response.content[0].thinking == tool_model.THOUGHT
    assert response.content[1].text == "to save memory"
    with server.anthropic().messages.stream(
        model="default_model", messages=tool_model.THINK_ASK, max_tokens=64
    ) as stream:
        final = stream.get_final_message()
    assert [(b.type, getattr(b, "thinking", None) or getattr(b, "text", None)) for b in final.content] == [
        ("thinking", tool_model.THOUGHT),
        ("text", "to save memory"),
    ]


def test_anthropic_thinking_disabled_turns_the_templates_thinking_off(server, tokenizer):
    response = message(server, tool_model.THINK_ASK, thinking={"type": "disabled"})
    expected = tokenizer.apply_chat_template(tool_model.THINK_ASK, add_generation_prompt=True, enable_thinking=False)
    assert response.usage.input_tokens + response.usage.cache_read_input_tokens == len(expected)
    assert "thinking" not in [b.type for b in response.content]


@pytest.mark.parametrize("choice", [{"type": "any"}, {"type": "tool", "name": "get_weather"}])
def test_anthropic_forced_tool_choice_is_a_400(server, choice):
    with pytest.raises(anthropic.BadRequestError):
        message(server, tool_model.ASK, tools=anthropic_tools(), tool_choice=choice)


def test_anthropic_tool_choice_none_renders_no_tools(server, tokenizer):
    response = message(server, tool_model.ASK, tools=anthropic_tools(), tool_choice={"type": "none"})
    without_tools = tokenizer.apply_chat_template(tool_model.ASK, add_generation_prompt=True)
    assert response.usage.input_tokens + response.usage.cache_read_input_tokens == len(without_tools)
    assert all(b.type != "tool_use" for b in response.content)
