"""Two ranks under ``mlx.launch --backend ring`` on loopback serve exactly what one process does.

Rank 0 serves HTTP and sends every request to rank 1; both run the same
batch on their shard of the model (``sharded_load``: tensor-parallel), each
pool holds its shard of the KV heads and each rank persists its own shard.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import pytest
from server_process import concurrently

from blockpool import ModelCacheSpec

pytestmark = pytest.mark.integration


def two_free_ports() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one per rank)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        try:
            with socket.socket() as s:
                s.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no two consecutive free ports")


def mlx_launch() -> str:
    return str(Path(sys.executable).parent / "mlx.launch")


def test_two_ranks_on_loopback_equal_one_process_and_persist_each_shard(start_server, reference, tmp_path):
    launch = [
        mlx_launch(),
        "--backend",
        "ring",
        "--hosts",
        "127.0.0.1",
        "-n",
        "2",
        "--starting-port",
        str(two_free_ports()),
        "--",
    ]
    cache = tmp_path / "cache"
    server = start_server("--memory-mb", "16", cache_dir=cache, launch=launch)
    _, health = server.request("GET", "/health")
    assert (health["rank"], health["world_size"]) == (0, 2)

    client = server.openai()
    conversations = {
        f"tp-{i}": [{"role": "user", "content": f"rank test {i}: the coder sends a patch"}] for i in range(3)
    }
    answers = {}

    def turn(agent, messages):
        answers[agent] = client.chat.completions.create(
            model="default_model", messages=messages, max_tokens=10, extra_headers={"X-Agent-Id": agent}
        )

    for round_ in range(2):
        assert not concurrently(turn, list(conversations.items()))
        for agent, messages in conversations.items():
            answer = answers[agent]
            assert answer.choices[0].message.content == reference.chat(messages, 10)[0], agent
            if round_:
                assert answer.usage.prompt_tokens_details.cached_tokens > 0
            messages += [
                {"role": "assistant", "content": answer.choices[0].message.content},
                {"role": "user", "content": "continue"},
            ]

    # Rank 0's pool holds its shard of the KV heads: half of what one process holds for the same tokens.
    spec = ModelCacheSpec.from_model(reference.model)
    _, listed = server.request("GET", "/v1/agents")
    for row in listed["data"]:
        assert row["bytes"] * 2 == spec.bytes_for_tokens(row["tokens"]), row

    streamed = client.chat.completions.create(
        model="default_model", messages=[{"role": "user", "content": "stream on two ranks"}], max_tokens=10, stream=True
    )
    assert (
        "".join(c.choices[0].delta.content or "" for c in streamed)
        == reference.chat([{"role": "user", "content": "stream on two ranks"}], 10)[0]
    )

    os.kill(health["pid"], signal.SIGTERM)  # rank 0 drains, tells rank 1 to stop; both persist
    assert server.wait(60) == 0
    for rank in (0, 1):
        (folder,) = cache.glob(f"*-tp2-rank{rank}")
        assert len(list(folder.glob("*.safetensors"))) == len(conversations), rank
    assert server.log().count("stopped; agents persisted") == 2  # both ranks
