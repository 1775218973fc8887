"""Overload queues requests, past the queue limit the answer is 429, and a client that leaves cancels its request."""

from __future__ import annotations

import socket
import threading

import openai
import pytest
from server_process import wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def server(start_server):
    # One request decodes at a time and one more may wait: the third gets 429.
    return start_server("--memory-mb", "16", "--max-concurrency", "1", "--queue-limit", "1")


def no_eos(reference) -> dict:
    """A logit bias that keeps the model from ever ending by itself, so a request runs until max_tokens."""
    return {str(t): -1000.0 for t in reference.eos}


def agent_row(server, agent):
    _, body = server.request("GET", "/v1/agents")
    return next((r for r in body["data"] if r["id"] == agent), None), body["pool"]


def test_overload_queues_then_refuses_with_429_and_a_stream_disconnect_cancels(server, reference):
    client = server.openai()
    stream = client.chat.completions.create(
        model="default_model",
        messages=[{"role": "user", "content": "go on forever"}],
        max_tokens=4000,
        logit_bias=no_eos(reference),
        stream=True,
        extra_headers={"X-Agent-Id": "long-runner"},
    )
    chunks = iter(stream)
    next(chunks)
    next(chunks)  # it is decoding now

    queued_messages = [{"role": "user", "content": "a short question"}]
    queued: dict = {}
    thread = threading.Thread(
        target=lambda: queued.update(
            r=client.chat.completions.create(
                model="default_model", messages=queued_messages, max_tokens=6, user="queued"
            )
        )
    )
    thread.start()
    wait_until(lambda: server.request("GET", "/health")[1]["in_flight"] == 2)

    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(model="default_model", messages=queued_messages, max_tokens=6, user="refused")
    assert refused.value.response.headers["retry-after"] == "1"
    assert refused.value.body["code"] == "queue_full"

    stream.close()  # the client goes away mid-stream
    thread.join(60)
    assert queued["r"].choices[0].message.content == reference.chat(queued_messages, 6)[0]
    wait_until(lambda: "agent=long-runner source=cold" in server.log() and "finish=cancelled" in server.log())
    row, _ = agent_row(server, "long-runner")
    # Its blocks went back: a fresh agent cancelled keeps no tokens.
    assert row is None or (row["where"] != "running" and row["tokens"] == 0 and row["bytes"] == 0)


def test_a_non_streaming_client_that_leaves_cancels_its_request(server, reference):
    body = (
        b'{"messages": [{"role": "user", "content": "long answer please"}], "max_tokens": 4000, "logit_bias": '
        + str(no_eos(reference)).replace("'", '"').encode()
        + b"}"
    )
    with socket.create_connection(("127.0.0.1", server.port)) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nX-Agent-Id: leaver\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        wait_until(lambda: (agent_row(server, "leaver")[0] or {}).get("where") == "running")
    wait_until(
        lambda: (
            "agent=leaver source=cold cached=0/" in server.log()
            and (agent_row(server, "leaver")[0] or {}).get("where") != "running"
        )
    )
    row, _ = agent_row(server, "leaver")
    assert row is None or (row["tokens"] == 0 and row["bytes"] == 0)
    assert "finish=cancelled" in server.log().split("agent=leaver", 1)[1].splitlines()[0]
