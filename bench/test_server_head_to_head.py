"""Head to head: the same concurrent multi-agent chat workloads against ``blockpool serve`` and ``mlx_lm.server``.

Both servers run as users start them (subprocesses on loopback), on the
tests' tiny llama, at the same time; each round sends the same workload to
one and then the other (the order alternates), with prompts no earlier
round used, so every round starts cold on both. Both must answer with the
same text, request for request. Recorded: each server's wall time for the
workload (median, p95) and its time to first token per request (p50, p95);
``ratio`` is blockpool's median wall time over mlx_lm.server's (the gate:
at most 1.0).

Workloads (EOS kept out by a logit bias, on both servers alike, so every
answer has ``max_tokens`` tokens):
- 6 agents x 3 turns, all at once, a shared 396-token system prompt (one
  full block and a part), 16 tokens per answer (in CI's quick gate);
- 16 agents x 4 turns, all at once, a short system prompt, 12 tokens per
  answer (the full gate);
- 16 new agents x 1 turn, all at once, one ~2,000-token system prompt, 16
  tokens per answer (the full gate). Recorded besides: the prompt tokens
  each server prefilled rather than took from its cache (from the usage
  each stream reports). ``blockpool`` prefills the system prompt once (the
  first agent's prompt is written to the pool at its first token, the
  others wait for it and share it to the token, its partly used last block
  copied on write; docs/server.md), so its prefilled tokens stay near one
  system prompt plus each agent's own tail.
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from conftest import record_seconds
from server_workload import ChatWorkload, ServerProcess

SHARED_PROMPT = ChatWorkload(
    agents=6, turns=3, max_tokens=16, system_words=80, logit_bias={"0": -1000.0}
)  # 0: the tiny EOS
SIXTEEN_AGENTS = ChatWorkload(agents=16, turns=4, max_tokens=12, system_words=20, logit_bias={"0": -1000.0})
ONE_SYSTEM_PROMPT = ChatWorkload(agents=16, turns=1, max_tokens=16, system_words=420, logit_bias={"0": -1000.0})
ROUNDS, WARMUP = 6, 1


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    model = tiny_models.write_model_dir(tmp_path_factory.mktemp("h2h-model"), "llama")
    base = tmp_path_factory.mktemp("h2h")
    ours = ServerProcess.blockpool(model, base / "cache", base / "blockpool.log", "--memory-mb", "256")
    theirs = ServerProcess.mlx_lm(model, base / "mlx_lm.log")
    ours.start()
    theirs.start()
    yield {"blockpool": ours, "mlx_lm_server": theirs}
    ours.stop()
    theirs.stop()


def test_server_head_to_head_vs_mlx_lm_server(benchmark, servers):
    benchmark.group = "server head to head, 6 agents x 3 turns"
    head_to_head(benchmark, servers, SHARED_PROMPT, ROUNDS)


def test_server_16_agents_vs_mlx_lm_server(benchmark, servers):
    benchmark.group = "server head to head, 16 agents x 4 turns"
    head_to_head(benchmark, servers, SIXTEEN_AGENTS, 4)


def test_server_shared_system_prompt_16_agents(benchmark, servers):
    benchmark.group = "server, 16 new agents with one 2,000-token system prompt"
    head_to_head(benchmark, servers, ONE_SYSTEM_PROMPT, 3)
    # Of all the prompt tokens, the share blockpool prefilled (one system prompt in 16 is 1/16 plus tails).
    info = benchmark.extra_info
    info["blockpool_prefilled_share"] = info["blockpool_prefilled_tokens"] / info["prompt_tokens"]


def head_to_head(benchmark, servers, workload: ChatWorkload, rounds: int) -> None:
    """Run ``workload`` on both servers, round by round (the order alternating); record and check."""
    walls: dict[str, list[float]] = {name: [] for name in servers}
    ttfts: dict[str, list[float]] = {name: [] for name in servers}
    prefilled: dict[str, list[int]] = {name: [] for name in servers}
    prompts: list[int] = []
    mismatches: list[str] = []
    state = {"round": 0}
    tag = f"{workload.agents}x{workload.turns}"

    def pair():
        r = state["round"]
        state["round"] += 1
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        results = {}
        for name in order:
            result = workload.run(servers[name], tag=f"{tag} round{r}")
            assert not result.errors, (name, result.errors[:3])
            assert len(result.prompt_tokens) == workload.agents * workload.turns, (name, "usage missing")
            results[name] = result
            walls[name].append(result.wall_s)
            prefilled[name].append(result.prefilled_tokens)
            if r >= WARMUP:
                ttfts[name] += result.ttft_s
        prompts.append(sum(results["blockpool"].prompt_tokens))
        ours, theirs = results["blockpool"].answers, results["mlx_lm_server"].answers
        assert ours.keys() == theirs.keys() and len(ours) == workload.agents * workload.turns
        mismatches.extend(f"round {r} {key}" for key in ours if ours[key] != theirs[key])

    benchmark.pedantic(pair, rounds=rounds, warmup_rounds=WARMUP)
    assert not mismatches, f"different text from the two servers: {mismatches[:5]}"
    for name in servers:
        wall_ms = np.array(walls[name][WARMUP:]) * 1e3
        ttft_ms = np.array(ttfts[name]) * 1e3
        benchmark.extra_info[f"{name}_median_ms"] = float(np.median(wall_ms))
        benchmark.extra_info[f"{name}_p95_ms"] = float(np.percentile(wall_ms, 95))
        benchmark.extra_info[f"{name}_ttft_p50_ms"] = float(np.percentile(ttft_ms, 50))
        benchmark.extra_info[f"{name}_ttft_p95_ms"] = float(np.percentile(ttft_ms, 95))
        benchmark.extra_info[f"{name}_prefilled_tokens"] = int(np.median(prefilled[name][WARMUP:]))
    benchmark.extra_info["prompt_tokens"] = int(np.median(prompts[WARMUP:]))
    benchmark.extra_info["ratio"] = (
        benchmark.extra_info["blockpool_median_ms"] / benchmark.extra_info["mlx_lm_server_median_ms"]
    )
    benchmark.extra_info["requests_per_round"] = workload.agents * workload.turns
    record_seconds(benchmark)
