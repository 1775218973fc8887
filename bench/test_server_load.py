"""Load test: a bounded burst of concurrent multi-turn chats against ``blockpool serve`` on loopback.

16 agents x 3 turns (48 requests per round), all agents at once, 12 tokens
per answer, each prompt a short system prompt and a growing conversation.
Bounded: 3 rounds (plus one warm-up), each must finish within 300 s.
Recorded: requests per second, time to first token (p50, p95) and wall
time per round; every answer is checked against mlx-lm's own greedy output
for the same conversation, and the test fails on any lost (errored,
unanswered) or wrong response.
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from conftest import record_seconds
from server_workload import ChatWorkload, ServerProcess

WORKLOAD = ChatWorkload(agents=16, turns=3, max_tokens=12, system_words=20)
ROUNDS, WARMUP = 3, 1


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from mlx_lm import load

    model_dir = tiny_models.write_model_dir(tmp_path_factory.mktemp("load-model"), "llama")
    base = tmp_path_factory.mktemp("load")
    server = ServerProcess.blockpool(model_dir, base / "cache", base / "blockpool.log", "--memory-mb", "64").start()
    yield server, load(str(model_dir))
    server.stop()


def test_server_load_concurrent_chats(benchmark, served):
    from mlx_lm_reference import mlx_lm_text, mlx_lm_tokens

    server, (model, tokenizer) = served
    results = []
    state = {"round": 0}

    def burst():
        result = WORKLOAD.run(server, tag=f"load{state['round']}", timeout=300)
        state["round"] += 1
        results.append(result)

    benchmark.group = "server load, 16 agents x 3 turns"
    benchmark.pedantic(burst, rounds=ROUNDS, warmup_rounds=WARMUP)

    expected_requests = WORKLOAD.agents * WORKLOAD.turns
    lost = sum(expected_requests - len(r.answers) for r in results)
    errors = [e for r in results for e in r.errors]
    wrong = []
    eos = set(tokenizer.eos_token_ids)
    for r in results:
        for key, messages in r.conversations.items():
            prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            tokens = mlx_lm_tokens(model, tokenizer, prompt, WORKLOAD.max_tokens)
            text = mlx_lm_text(tokenizer, tokens[:-1] if tokens and tokens[-1] in eos else tokens)
            if r.answers[key] != text:
                wrong.append(key)
    measured = results[WARMUP:]
    ttft_ms = np.array([t for r in measured for t in r.ttft_s]) * 1e3
    walls = np.array([r.wall_s for r in measured])
    benchmark.extra_info.update(
        requests_per_round=expected_requests,
        requests_per_s=float(expected_requests / np.median(walls)),
        ttft_p50_ms=float(np.percentile(ttft_ms, 50)),
        ttft_p95_ms=float(np.percentile(ttft_ms, 95)),
        lost=lost,
        wrong=len(wrong),
    )
    record_seconds(benchmark)
    assert not errors, errors[:3]
    assert lost == 0
    assert not wrong, wrong[:5]
