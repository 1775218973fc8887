"""Head to head: the same concurrent multi-agent chat workload against ``blockpool serve`` and ``mlx_lm.server``.

Both servers run as users start them (subprocesses on loopback), on the
tests' tiny llama, at the same time; each round sends the same workload to
one and then the other (the order alternates), with prompts no earlier
round used, so every round starts cold on both. Both must answer with the
same text, request for request. Recorded: each server's wall time for the
workload (median, p95) and its time to first token per request (p50, p95);
``ratio`` is blockpool's median wall time over mlx_lm.server's (the gate:
at most 1.0).

Workload: 6 agents x 3 turns, a shared ~200-word (about 1,000-token) system prompt, 16 tokens
per answer (EOS kept out by a logit bias, on both servers alike).
"""

from __future__ import annotations

import numpy as np
import pytest

import tiny_models
from conftest import record_seconds
from server_workload import ChatWorkload, ServerProcess

WORKLOAD = ChatWorkload(
    agents=6, turns=3, max_tokens=16, system_words=200, logit_bias={"0": -1000.0}
)  # 0: the tiny EOS
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
    walls: dict[str, list[float]] = {name: [] for name in servers}
    ttfts: dict[str, list[float]] = {name: [] for name in servers}
    mismatches: list[str] = []
    state = {"round": 0}

    def pair():
        r = state["round"]
        state["round"] += 1
        order = list(servers) if r % 2 == 0 else list(reversed(servers))
        results = {}
        for name in order:
            result = WORKLOAD.run(servers[name], tag=f"round{r}")
            assert not result.errors, (name, result.errors[:3])
            results[name] = result
            walls[name].append(result.wall_s)
            if r >= WARMUP:
                ttfts[name] += result.ttft_s
        ours, theirs = results["blockpool"].answers, results["mlx_lm_server"].answers
        assert ours.keys() == theirs.keys() and len(ours) == WORKLOAD.agents * WORKLOAD.turns
        mismatches.extend(f"round {r} {key}" for key in ours if ours[key] != theirs[key])

    benchmark.group = "server head to head, 6 agents x 3 turns"
    benchmark.pedantic(pair, rounds=ROUNDS, warmup_rounds=WARMUP)
    assert not mismatches, f"different text from the two servers: {mismatches[:5]}"
    for name in servers:
        wall_ms = np.array(walls[name][WARMUP:]) * 1e3
        ttft_ms = np.array(ttfts[name]) * 1e3
        benchmark.extra_info[f"{name}_median_ms"] = float(np.median(wall_ms))
        benchmark.extra_info[f"{name}_p95_ms"] = float(np.percentile(wall_ms, 95))
        benchmark.extra_info[f"{name}_ttft_p50_ms"] = float(np.percentile(ttft_ms, 50))
        benchmark.extra_info[f"{name}_ttft_p95_ms"] = float(np.percentile(ttft_ms, 95))
    benchmark.extra_info["ratio"] = (
        benchmark.extra_info["blockpool_median_ms"] / benchmark.extra_info["mlx_lm_server_median_ms"]
    )
    benchmark.extra_info["requests_per_round"] = WORKLOAD.agents * WORKLOAD.turns
    record_seconds(benchmark)
