"""Every kind of bad input gets a 4xx OpenAI-style (or Anthropic-style) error object, and the server lives on."""

from __future__ import annotations

import anthropic
import openai
import pytest

pytestmark = pytest.mark.integration

CHAT = "/v1/chat/completions"
MESSAGES = "/v1/messages"
OK_MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def server(start_server):
    # 2 MiB of KV: about 4,000 tokens of the tiny model, so "can never fit" is easy to ask for.
    return start_server("--memory-mb", "2", "--max-tokens", "8")


def chat_body(**fields):
    return {"messages": OK_MESSAGES, "max_tokens": 4, **fields}


# (name, method, path, body, headers, status, words expected in the message)
CASES = [
    ("malformed JSON", "POST", CHAT, b'{"messages": [', {}, 400, "not valid JSON"),
    ("JSON that is not an object", "POST", CHAT, b"[1, 2]", {}, 400, "JSON object"),
    ("bytes that are not UTF-8", "POST", CHAT, b"\xff\xfe{}", {}, 400, "not valid JSON"),
    ("missing messages", "POST", CHAT, {"max_tokens": 4}, {}, 400, "messages"),
    ("empty messages", "POST", CHAT, {"messages": []}, {}, 400, "messages"),
    ("messages not a list", "POST", CHAT, {"messages": "hi"}, {}, 400, "messages"),
    ("message without a role", "POST", CHAT, {"messages": [{"content": "x"}]}, {}, 400, "role"),
    (
        "image content part",
        "POST",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
        {},
        400,
        "text parts",
    ),
    ("max_tokens as a string", "POST", CHAT, chat_body(max_tokens="10"), {}, 400, "max_tokens"),
    ("max_tokens zero", "POST", CHAT, chat_body(max_tokens=0), {}, 400, "max_tokens"),
    ("max_tokens a float", "POST", CHAT, chat_body(max_tokens=4.5), {}, 400, "max_tokens"),
    ("negative temperature", "POST", CHAT, chat_body(temperature=-1), {}, 400, "temperature"),
    ("temperature a string", "POST", CHAT, chat_body(temperature="hot"), {}, 400, "temperature"),
    ("top_p above one", "POST", CHAT, chat_body(top_p=1.5), {}, 400, "top_p"),
    ("top_k a float", "POST", CHAT, chat_body(top_k=1.5), {}, 400, "top_k"),
    ("min_p negative", "POST", CHAT, chat_body(min_p=-0.1), {}, 400, "min_p"),
    ("stream not a boolean", "POST", CHAT, chat_body(stream="yes"), {}, 400, "stream"),
    ("n other than one", "POST", CHAT, chat_body(n=2), {}, 400, "n=1"),
    ("logit_bias key not a token id", "POST", CHAT, chat_body(logit_bias={"abc": 1}), {}, 400, "logit_bias"),
    ("logit_bias id out of range", "POST", CHAT, chat_body(logit_bias={"99999": 1}), {}, 400, "logit_bias"),
    ("empty stop string", "POST", CHAT, chat_body(stop=""), {}, 400, "stop"),
    ("stop not strings", "POST", CHAT, chat_body(stop=[1]), {}, 400, "stop"),
    ("top_logprobs too many", "POST", CHAT, chat_body(logprobs=True, top_logprobs=50), {}, 400, "top_logprobs"),
    ("negative seed", "POST", CHAT, chat_body(seed=-1), {}, 400, "seed"),
    ("reserved agent id", "POST", CHAT, chat_body(), {"X-Agent-Id": "anonymous-x"}, 400, "reserved"),
    ("empty agent id", "POST", CHAT, chat_body(), {"X-Agent-Id": " "}, 400, "empty"),
    ("over-long user", "POST", CHAT, chat_body(user="u" * 300), {}, 400, "longer"),
    (
        "reserved template argument",
        "POST",
        CHAT,
        chat_body(chat_template_kwargs={"tokenize": False}),
        {},
        400,
        "tokenize",
    ),
    (
        "tool call arguments not JSON",
        "POST",
        CHAT,
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"id": "1", "type": "function", "function": {"name": "f", "arguments": "{oops"}}],
                }
            ]
        },
        {},
        400,
        "arguments",
    ),
    ("unknown model", "POST", CHAT, chat_body(model="gpt-4o"), {}, 404, "not served"),
    ("a request that can never fit the budget", "POST", CHAT, chat_body(max_tokens=1_000_000), {}, 400, "budget"),
    (
        "token id outside the vocabulary",
        "POST",
        "/v1/completions",
        {"prompt": [1, 99999], "max_tokens": 4},
        {},
        400,
        "token ids",
    ),
    ("empty text prompt", "POST", "/v1/completions", {"prompt": "", "max_tokens": 4}, {}, 400, "empty"),
    ("empty token prompt", "POST", "/v1/completions", {"prompt": [], "max_tokens": 4}, {}, 400, "empty"),
    ("two prompts", "POST", "/v1/completions", {"prompt": ["a", "b"], "max_tokens": 4}, {}, 400, "one prompt"),
    ("echo", "POST", "/v1/completions", {"prompt": "a", "echo": True}, {}, 400, "echo"),
    ("unknown route", "GET", "/v1/nothing", None, {}, 404, "not found"),
    ("wrong method", "GET", CHAT, None, {}, 405, "Method Not Allowed"),
    ("deleting an unknown agent", "DELETE", "/v1/agents/nobody", None, {}, 404, "no agent"),
]

ANTHROPIC_CASES = [
    ("missing max_tokens", {"model": "m", "messages": OK_MESSAGES}, 400, "max_tokens"),
    (
        "image block",
        {
            "model": "default_model",
            "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "image", "source": {}}]}],
        },
        400,
        "image",
    ),
    (
        "system role in messages",
        {"model": "default_model", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]},
        400,
        "role",
    ),
    ("unknown model", {"model": "claude-opus", "max_tokens": 4, "messages": OK_MESSAGES}, 404, "not served"),
    (
        "empty stop sequence",
        {"model": "default_model", "max_tokens": 4, "messages": OK_MESSAGES, "stop_sequences": [""]},
        400,
        "stop_sequences",
    ),
]


@pytest.mark.parametrize("name,method,path,body,headers,status,words", CASES, ids=[c[0] for c in CASES])
def test_bad_openai_input_gets_a_4xx_error_object(server, name, method, path, body, headers, status, words):
    got, answer = server.request(method, path, body, headers)
    assert got == status, answer
    error = answer["error"]
    assert words.lower() in error["message"].lower()
    assert error["type"] and "param" in error and "code" in error


@pytest.mark.parametrize("name,body,status,words", ANTHROPIC_CASES, ids=[c[0] for c in ANTHROPIC_CASES])
def test_bad_messages_input_gets_an_anthropic_error_object(server, name, body, status, words):
    got, answer = server.request("POST", MESSAGES, body)
    assert got == status, answer
    assert answer["type"] == "error"
    assert answer["error"]["type"] == ("not_found_error" if status == 404 else "invalid_request_error")
    assert words.lower() in answer["error"]["message"].lower()


def test_official_clients_raise_their_bad_request_errors(server):
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        server.openai().chat.completions.create(model="default_model", messages=OK_MESSAGES, max_tokens=0)
    with pytest.raises(openai.NotFoundError, match="not served"):
        server.openai().chat.completions.create(model="gpt-4o", messages=OK_MESSAGES)
    with pytest.raises(anthropic.BadRequestError, match="image"):
        server.anthropic().messages.create(
            model="default_model",
            max_tokens=4,
            messages=[
                {
                    "role": "user",
                    "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": ""}}],
                }
            ],
        )


def test_the_server_lives_on_after_every_bad_request(server):
    # Runs after the cases above (same module, same server).
    status, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ok" and health["in_flight"] == 0
    status, answer = server.request("POST", CHAT, chat_body(), {"X-Agent-Id": "after-errors"})
    assert status == 200 and answer["usage"]["completion_tokens"] >= 1
    assert "Traceback" not in server.log()
