"""``blockpool serve`` through OpenAI's and Anthropic's official clients: output equals mlx-lm's.

One server for the module (a subprocess on a free loopback port, as a user
starts it); each test uses its own agent ids.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_sampler
from server_process import concurrently

pytestmark = pytest.mark.integration

SYSTEM = "You are a careful planner. Answer in short steps."


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--memory-mb", "16", "--max-tokens", "16")


def chat(server, agent, messages, **kwargs):
    client = server.openai()
    extra = {"extra_headers": {"X-Agent-Id": agent}} if agent else {}
    return client.chat.completions.create(model="default_model", messages=messages, **extra, **kwargs)


def test_chat_greedy_equals_mlx_lm(server, reference):
    messages = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "the agent reads a file and writes a plan"},
    ]
    response = chat(server, "greedy", messages, max_tokens=20)
    text, tokens = reference.chat(messages, 20)
    assert response.choices[0].message.content == text
    assert response.usage.completion_tokens == len(tokens)
    assert response.usage.prompt_tokens == len(reference.chat_ids(messages))
    assert response.usage.prompt_tokens_details.cached_tokens == 0
    assert response.choices[0].finish_reason == (
        "length" if len(tokens) == 20 and tokens[-1] not in reference.eos else "stop"
    )


def test_completions_text_and_token_ids_equal_mlx_lm(server, reference):
    client = server.openai()
    prompt = "memory blocks move from the pool to the cache"
    expected, tokens = reference.generate(reference.text_ids(prompt), 16)
    by_text = client.completions.create(model="default_model", prompt=prompt, max_tokens=16, user="completion-text")
    assert by_text.choices[0].text == expected
    assert by_text.usage.completion_tokens == len(tokens)
    ids = reference.text_ids(prompt)
    by_ids = client.completions.create(model="default_model", prompt=ids, max_tokens=16, user="completion-ids")
    assert by_ids.choices[0].text == expected
    assert by_ids.usage.prompt_tokens == len(ids)


def test_second_turn_resumes_with_cached_tokens_and_exact_output(server, reference):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "plan the parser refactor"}]
    first = chat(server, "resumer", messages, max_tokens=12)
    history = reference.chat_ids(messages) + reference.generate(reference.chat_ids(messages), 12)[1]
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "and then?"},
    ]
    second = chat(server, "resumer", messages, max_tokens=12)
    prompt = reference.chat_ids(messages)
    common = next((i for i, (a, b) in enumerate(zip(history, prompt)) if a != b), min(len(history), len(prompt)))
    assert second.usage.prompt_tokens_details.cached_tokens == common > 0
    assert second.model_extra["cache_source"] == "pool"
    assert second.choices[0].message.content == reference.chat(messages, 12)[0]


def test_streaming_equals_non_streaming(server, reference):
    messages = [{"role": "user", "content": "each layer keeps keys and values"}]
    whole = chat(server, "stream-a", messages, max_tokens=16)
    stream = chat(server, "stream-b", messages, max_tokens=16, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content == reference.chat(messages, 16)[0]
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_stop_strings_cut_the_text_stream_or_not(server, reference):
    messages = [{"role": "user", "content": "numbers like 12 345 and 6789 appear in logs"}]
    full, _ = reference.chat(messages, 24)
    assert len(full) >= 6, "the reference output is too short to pick a stop string from"
    stop = full[3:6]
    expected = full[: full.find(stop)]
    whole = chat(server, "stop-a", messages, max_tokens=24, stop=[stop, "never-seen-stop"])
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].finish_reason == "stop"
    chunks = list(chat(server, "stop-b", messages, max_tokens=24, stop=stop, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == expected


def test_twelve_concurrent_agents_each_equal_mlx_lm(server, reference):
    prompts = {
        f"crowd-{i}": [{"role": "user", "content": f"agent {i} asks the reviewer about patch {i * 7}"}]
        for i in range(12)
    }
    results = {}

    def run(agent, messages):
        results[agent] = chat(server, agent, messages, max_tokens=12).choices[0].message.content

    assert not concurrently(run, list(prompts.items()))
    for agent, messages in prompts.items():
        assert results[agent] == reference.chat(messages, 12)[0], agent


def test_logprobs_follow_openai_shape_and_greedy_choice(server):
    response = chat(
        server,
        "logprobs",
        [{"role": "user", "content": "the sliding window forgets"}],
        max_tokens=6,
        logprobs=True,
        top_logprobs=3,
    )
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob == pytest.approx(entry.top_logprobs[0].logprob)
        assert entry.top_logprobs[0].logprob >= entry.top_logprobs[1].logprob >= entry.top_logprobs[2].logprob


def test_seeded_sampling_equals_mlx_lm_seeded_run(server, reference):
    messages = [{"role": "user", "content": "a planner asks the coder for a patch"}]
    mx.random.seed(1234)
    expected, _ = reference.chat(messages, 16, sampler=make_sampler(0.9, top_p=0.95))
    answers = []

    def run(agent):
        answers.append(
            chat(server, agent, messages, max_tokens=16, temperature=0.9, top_p=0.95, seed=1234)
            .choices[0]
            .message.content
        )

    assert not concurrently(run, [(f"seeded-{i}",) for i in range(3)])  # batched together
    assert answers == [expected] * 3


def test_anthropic_messages_with_system_blocks_and_stop_sequences(server, reference):
    client = server.anthropic()
    blocks = [{"type": "text", "text": "the reviewer answers "}, {"type": "text", "text": "with three comments"}]
    rendered = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "the reviewer answers with three comments"},
    ]
    expected, tokens = reference.chat(rendered, 20)
    message = client.messages.create(
        model="default_model",
        max_tokens=20,
        system=SYSTEM,
        messages=[{"role": "user", "content": blocks}],
        metadata={"user_id": "claude-a"},
    )
    assert message.content[0].text == expected
    assert message.usage.output_tokens == len(tokens)
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens == len(reference.chat_ids(rendered))
    assert message.stop_reason == (
        "max_tokens" if len(tokens) == 20 and tokens[-1] not in reference.eos else "end_turn"
    )

    assert len(expected) >= 6
    stop = expected[2:5]
    cut = client.messages.create(
        model="default_model",
        max_tokens=20,
        system=SYSTEM,
        messages=[{"role": "user", "content": blocks}],
        stop_sequences=[stop],
        metadata={"user_id": "claude-b"},
    )
    assert cut.content[0].text == expected[: expected.find(stop)]
    assert (cut.stop_reason, cut.stop_sequence) == ("stop_sequence", stop)

    with client.messages.stream(
        model="default_model",
        max_tokens=20,
        system=SYSTEM,
        messages=[{"role": "user", "content": blocks}],
        metadata={"user_id": "claude-c"},
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == expected
    assert final.stop_reason == message.stop_reason


def test_anthropic_second_turn_resumes(server, reference):
    client = server.anthropic()
    turn = [{"role": "user", "content": "the agent calls the tool again"}]
    first = client.messages.create(
        model="default_model", max_tokens=10, messages=turn, extra_headers={"X-Agent-Id": "claude-turns"}
    )
    turn += [{"role": "assistant", "content": first.content[0].text}, {"role": "user", "content": "go on"}]
    second = client.messages.create(
        model="default_model", max_tokens=10, messages=turn, extra_headers={"X-Agent-Id": "claude-turns"}
    )
    assert second.usage.cache_read_input_tokens > 0
    assert second.content[0].text == reference.chat(turn, 10)[0]


def test_models_and_health(server):
    status, body = server.request("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in body["data"]] == [server.command[server.command.index("--model") + 1]]
    assert [m.id for m in server.openai().models.list()] == [body["data"][0]["id"]]
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["world_size"] == 1
    assert health["pid"] == server.proc.pid


def test_agents_listed_with_place_tokens_and_bytes_then_deleted(server):
    chat(server, "listed", [{"role": "user", "content": "list me"}], max_tokens=4)
    status, body = server.request("GET", "/v1/agents")
    assert status == 200
    row = next(r for r in body["data"] if r["id"] == "listed")
    assert row["where"] == "pool" and row["tokens"] > 0 and row["bytes"] > 0 and not row["anonymous"]
    assert body["pool"]["used_bytes"] > 0
    status, one = server.request("GET", "/v1/agents/listed")
    assert status == 200 and one["tokens"] == row["tokens"]
    status, deleted = server.request("DELETE", "/v1/agents/listed")
    assert status == 200 and deleted["deleted"] is True
    status, body = server.request("GET", "/v1/agents")
    assert "listed" not in {r["id"] for r in body["data"]}
    status, missing = server.request("DELETE", "/v1/agents/listed")
    assert status == 404 and missing["error"]["code"] == "agent_not_found"


def test_anonymous_conversation_resumes_and_fresh_prompts_stay_exact(server, reference):
    client = server.openai()
    messages = [{"role": "user", "content": "an anonymous client without an agent id"}]
    first = client.chat.completions.create(model="default_model", messages=messages, max_tokens=10)
    assert first.model_extra["agent_id"].startswith("anonymous-")
    assert first.choices[0].message.content == reference.chat(messages, 10)[0]
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "more please"},
    ]
    second = client.chat.completions.create(model="default_model", messages=messages, max_tokens=10)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert second.model_extra["agent_id"] == first.model_extra["agent_id"]
    assert second.choices[0].message.content == reference.chat(messages, 10)[0]
    other = [{"role": "user", "content": "a different anonymous conversation"}]
    third = client.chat.completions.create(model="default_model", messages=other, max_tokens=10)
    assert third.model_extra["agent_id"] != first.model_extra["agent_id"]
    assert third.choices[0].message.content == reference.chat(other, 10)[0]


def test_tools_and_template_kwargs_reach_the_template(server, reference):
    tools = [{"type": "function", "function": {"name": "read_file", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "read the file"}]
    response = chat(
        server, "tools", messages, max_tokens=8, tools=tools, extra_body={"chat_template_kwargs": {"unused_flag": True}}
    )
    # The tiny model's template ignores tools; the rendering must still be the template's own.
    assert response.usage.prompt_tokens == len(reference.chat_ids(messages, tools=tools))
    assert response.choices[0].message.content == reference.chat(messages, 8)[0]
