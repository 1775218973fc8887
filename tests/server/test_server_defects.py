"""The adversarial run's findings, each on the real server: a 400 (never a 500), and nothing left behind."""

from __future__ import annotations

import glob
import json
import shutil

import pytest
from server_process import ServerProcess, wait_until

pytestmark = pytest.mark.integration

HELLO = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(start_server):
    return start_server("--memory-mb", "4", "--anonymous-agents", "8")


def post(server, body, path="/v1/chat/completions", headers=None):
    return server.request("POST", path, {"messages": HELLO, "max_tokens": 2, **body}, headers=headers)


def raw_post(server, text: str, path="/v1/chat/completions"):
    """A body written by hand: JSON's NaN and Infinity, which Python's json.dumps would write too, made explicit."""
    return server.request("POST", path, text.encode())


@pytest.mark.parametrize(
    "field",
    [
        {"logit_bias": {"²": 1}},
        {"logit_bias": {"٣": 1}},  # an Arabic-Indic digit: isdigit() says yes, int() reads 3
        {"repetition_context_size": 10**12},
        {"presence_context_size": 10**12},
        {"frequency_context_size": 10**12},
        {"max_tokens": 10**12},
        {"max_completion_tokens": 10**12},
        {"top_k": 10**12},
        {"seed": 2**64},
        {"n": 10**12},
        {"top_logprobs": 10**12, "logprobs": True},
    ],
)
def test_out_of_range_fields_are_400(server, field):
    status, body = post(server, field)
    assert status == 400, body
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    "text",
    [
        '{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
        '{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": NaN}',
        '{"messages": [{"role": "user", "content": "hi"}], "top_p": -Infinity}',
        '{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": NaN}}',
        '{"messages": [{"role": "user", "content": "hi"}], "frequency_penalty": Infinity}',
    ],
)
def test_non_finite_numbers_are_400(server, text):
    status, body = raw_post(server, text)
    assert status == 400, body


def test_non_finite_numbers_are_400_on_the_messages_api(server):
    text = (
        '{"model": "default_model", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], '
        '"temperature": NaN}'
    )
    status, body = raw_post(server, text, "/v1/messages")
    assert status == 400 and body["type"] == "error", body


def test_a_long_user_id_names_its_field(server):
    status, body = server.request(
        "POST",
        "/v1/messages",
        {"model": "default_model", "max_tokens": 2, "messages": HELLO, "metadata": {"user_id": "u" * 300}},
    )
    assert status == 400 and "metadata.user_id" in body["error"]["message"], body


@pytest.mark.parametrize(
    "messages",
    [
        [{"role": "user", "content": None}],
        [{"role": "system", "content": None}, {"role": "user", "content": "hi"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": "abc"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "", "tool_calls": [{"id": "x"}]}],
        [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}]},
        ],
    ],
)
def test_malformed_chat_messages_are_400(server, messages):
    status, body = post(server, {"messages": messages})
    assert status == 400 and body["error"]["param"] == "messages", body


@pytest.mark.parametrize(
    "block",
    [
        {"type": "tool_use", "id": "toolu_1", "input": {}},
        {"type": "tool_use", "id": "toolu_1", "name": "", "input": {}},
        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": "text"},
    ],
)
def test_a_tool_use_block_without_a_name_or_with_bad_input_is_400(server, block):
    messages = [*HELLO, {"role": "assistant", "content": [block]}, {"role": "user", "content": "go on"}]
    status, body = server.request(
        "POST", "/v1/messages", {"model": "default_model", "max_tokens": 2, "messages": messages}
    )
    assert status == 400 and body["type"] == "error", body


@pytest.fixture(scope="module")
def server_with_context(model_dir, tmp_path_factory):
    """The tiny model with ``max_position_embeddings: 512`` in its config (llama's ModelArgs drops the field)."""
    base = tmp_path_factory.mktemp("context")
    model = shutil.copytree(model_dir, base / "model")
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 512}))
    server = ServerProcess.blockpool(model, base / "cache", base / "server.log", "--memory-mb", "4").start()
    yield server
    server.stop(timeout=60)


def test_a_prompt_longer_than_the_models_context_is_400_and_costs_nothing(server_with_context):
    server = server_with_context
    text = " ".join(f"word{i}" for i in range(600))  # well over 512 tokens, well inside the 4 MiB budget
    _, before = server.request("GET", "/v1/agents")
    status, body = post(server, {"messages": [{"role": "user", "content": text}]}, headers={"X-Agent-Id": "long"})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded", body
    _, after = server.request("GET", "/v1/agents")
    assert after["pool"] == before["pool"] and all(row["id"] != "long" for row in after["data"])


def test_max_prompt_tokens_flag(start_server):
    server = start_server("--max-prompt-tokens", "20")
    long = [{"role": "user", "content": " ".join(["tokens"] * 40)}]
    status, body = post(server, {"messages": long})
    assert status == 400 and "more than this server accepts (20" in body["error"]["message"]
    assert post(server, {})[0] == 200


def anonymous_agents(server) -> list[dict]:
    _, body = server.request("GET", "/v1/agents")
    return [row for row in body["data"] if row["anonymous"]]


def test_refused_anonymous_requests_leave_no_agents_behind(server):
    prompt = [{"role": "user", "content": "an anonymous conversation that is refused every other time"}]
    for _ in range(10):
        assert post(server, {"messages": prompt})[0] == 200
        status, body = post(server, {"messages": prompt, "max_tokens": 10**9})
        assert status == 400, body
    server.request("GET", "/health")
    kept = anonymous_agents(server)
    assert len(kept) == 1, kept


def test_max_agents_deletes_the_least_recently_used_idle_agents(start_server, tmp_path):
    server = start_server("--max-agents", "3", cache_dir=tmp_path / "cache")
    for i in range(6):
        assert post(server, {}, headers={"X-Agent-Id": f"agent-{i}"})[0] == 200
    _, body = server.request("GET", "/v1/agents")
    ids = sorted(row["id"] for row in body["data"])
    # Checked after each request ends, the one that just answered never counted: at most one over.
    assert len(ids) <= 4 and {"agent-4", "agent-5"} <= set(ids) and "agent-0" not in ids, ids
    assert "deleting idle agent 'agent-0'" in server.log() and "--max-agents 3" in server.log()
    files = glob.glob(str(tmp_path / "cache" / "*" / "*.safetensors"))
    assert len(files) <= 4, files


def test_max_disk_mb_deletes_the_least_recently_used_idle_agents(start_server, tmp_path):
    server = start_server("--max-disk-mb", "1", cache_dir=tmp_path / "cache")
    text = " ".join(f"note {i} about the pool" for i in range(200))
    for i in range(8):
        status, _ = post(
            server, {"messages": [{"role": "user", "content": f"{i} {text}"}]}, headers={"X-Agent-Id": f"d-{i}"}
        )
        assert status == 200
    files = tmp_path / "cache"
    wait_until(lambda: any(p.name.startswith("d-7-") for p in files.glob("*/*.safetensors")))  # written behind
    sizes = [p.stat().st_size for p in files.glob("*/*.safetensors")]
    assert sum(sizes) <= (1 << 20) + max(sizes), sizes
    assert "deleting idle agent 'd-0'" in server.log() and "--max-disk-mb 1" in server.log()
