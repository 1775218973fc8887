"""Engine benchmarks, on the tests' tiny llama (2 layers, hidden 64), each against mlx-lm in the same run.

- Warm time to first token: an agent resumes from 4,096 cached tokens with 1
  new token (and again with 16), against mlx-lm's own single-stream path with
  a kept prompt cache (``stream_generate(..., prompt_cache=cache)``, trimmed back
  after each round), and against a cold prefill of the whole history. A third
  side, the same ``stream_generate`` on caches rebuilt from the blocks
  (``to_mlx_caches``), measures what reconstruction alone costs: the floor
  for any engine that keeps history in blocks.
- Decode throughput: 8 agents batched, against mlx-lm's ``BatchGenerator`` on the
  same prompts.

The engine and its mlx-lm counterpart run in alternating rounds of one
benchmark, so that both see the same (shared, noisy) machine; their medians,
p95s and the ratio go to ``extra_info``, which bench/gate.py checks.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator, stream_generate
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from blockpool import AgentBlocks, BlockPool, BlockPoolBatchEngine, ModelCacheSpec, to_mlx_caches
from conftest import idle, record_seconds, tokens

HISTORY, DECODE_AGENTS, DECODE_TOKENS = 4096, 8, 64


@pytest.fixture(scope="module")
def warm_agent(llama):
    model, tokenizer = llama
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=96)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    engine.submit("template", tokens(HISTORY - 1, 1), max_tokens=1)  # 4,096 tokens cached
    (done,) = list(engine.step())
    assert done.blocks.total_tokens == HISTORY
    return engine, pool, done.blocks


@pytest.mark.parametrize("new", [1, 16], ids=lambda n: f"{n}-new")
def test_ttft_warm_engine_vs_mlx_lm_prompt_cache(benchmark, warm_agent, llama, new):
    """Alternating rounds: the engine resuming a fresh agent that shares the template's
    4,096-token blocks, then mlx-lm's stream_generate on a kept prompt cache of the same
    4,096 tokens (trimmed back after each round), then stream_generate on caches rebuilt
    from the template's blocks. Each is timed from the request to its first token."""
    engine, pool, template = warm_agent
    model, tokenizer = llama
    prompt = tokens(new, 2)
    cache = make_prompt_cache(model)
    for _ in stream_generate(model, tokenizer, template.token_ids, max_tokens=1, prompt_cache=cache):
        pass
    trim_prompt_cache(cache, cache[0].offset - HISTORY)
    times: dict[str, list[float]] = {"engine": [], "mlx_lm": [], "reconstructed_mlx_lm": []}
    state = {"round": 0}

    def pair():
        agent = f"round-{state['round']}"
        state["round"] += 1
        pool.share(template.all_blocks(), agent)
        handle = AgentBlocks(
            agent, template.spec, {k: list(v) for k, v in template.blocks.items()}, HISTORY, list(template.token_ids)
        )
        idle()  # each side starts on an idle device: mlx-lm's abandoned generator leaves a step running
        start = time.perf_counter()
        engine.submit(agent, prompt, cache=handle, max_tokens=2)
        events = engine.stream()
        next(e for e in events if e.token is not None)
        times["engine"].append(time.perf_counter() - start)
        for event in events:  # the second token and the write-back, untimed
            if event.completion:
                pool.release(event.completion.blocks)

        idle()
        start = time.perf_counter()
        next(iter(stream_generate(model, tokenizer, prompt, max_tokens=1, prompt_cache=cache)))
        times["mlx_lm"].append(time.perf_counter() - start)
        trim_prompt_cache(cache, cache[0].offset - HISTORY)

        idle()
        start = time.perf_counter()
        rebuilt = to_mlx_caches(pool, template, spare_tokens=new + 1)
        next(iter(stream_generate(model, tokenizer, prompt, max_tokens=1, prompt_cache=rebuilt)))
        times["reconstructed_mlx_lm"].append(time.perf_counter() - start)

    benchmark.group = f"TTFT, {HISTORY} cached + {new} new tokens"
    benchmark.pedantic(pair, rounds=40, warmup_rounds=4)
    assert pool.used_blocks("template") == template.num_blocks and pool.stats().working_bytes == 0  # nothing leaked
    _record_pair(benchmark, times, "engine", "mlx_lm", warm=4)
    benchmark.extra_info["reconstructed_ratio"] = (
        benchmark.extra_info["reconstructed_mlx_lm_median_ms"] / benchmark.extra_info["mlx_lm_median_ms"]
    )


def _record_pair(benchmark, times, ours: str, theirs: str, tokens_per_round: int | None = None, warm: int = 3) -> None:
    stats = {name: np.array(values[warm:]) * 1e3 for name, values in times.items()}  # warm-up rounds run too
    for name, ms in stats.items():
        benchmark.extra_info[f"{name}_median_ms"] = float(np.median(ms))
        benchmark.extra_info[f"{name}_p95_ms"] = float(np.percentile(ms, 95))
        if tokens_per_round:
            benchmark.extra_info[f"{name}_tokens_per_s"] = float(tokens_per_round / np.median(ms) * 1e3)
    benchmark.extra_info["ratio"] = float(np.median(stats[ours]) / np.median(stats[theirs]))
    record_seconds(benchmark)


@pytest.mark.parametrize("new", [1, 16], ids=lambda n: f"{n}-new")
def test_ttft_cold_prefill(benchmark, llama, new):
    model, tokenizer = llama
    full = tokens(HISTORY, 1) + tokens(new, 2)

    def cold():
        next(iter(stream_generate(model, tokenizer, full, max_tokens=1, prompt_cache=make_prompt_cache(model))))

    benchmark.group = f"TTFT, {HISTORY} cached + {new} new tokens"
    benchmark.pedantic(cold, rounds=5, warmup_rounds=1)
    record_seconds(benchmark)


def _prompts() -> list[list[int]]:
    return [tokens(20 + 9 * i, 100 + i) for i in range(DECODE_AGENTS)]


def test_decode_8_agents_engine_vs_batch_generator(benchmark, llama):
    """Alternating rounds: 8 agents x 64 tokens through the engine, then the same
    prompts through mlx-lm's BatchGenerator. Both include prefill; the tokens are the same."""
    model, tokenizer = llama
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    stop = [[t] for t in sorted(tokenizer.eos_token_ids)]
    times: dict[str, list[float]] = {"engine": [], "batch_generator": []}
    outputs: dict[str, list[list[int]]] = {}

    def pair():
        start = time.perf_counter()
        uids = [engine.submit(f"agent-{i}", prompt, max_tokens=DECODE_TOKENS) for i, prompt in enumerate(_prompts())]
        done = {c.uid: c for c in engine.step()}
        times["engine"].append(time.perf_counter() - start)
        outputs["engine"] = [done[u].token_ids for u in uids]
        for c in done.values():
            pool.release(c.blocks)

        start = time.perf_counter()
        generator = BatchGenerator(model, stop_tokens=stop)
        uids = generator.insert(_prompts(), max_tokens=[DECODE_TOKENS] * DECODE_AGENTS)
        got: dict[int, list[int]] = {u: [] for u in uids}
        while responses := generator.next_generated():
            for r in responses:
                got[r.uid].append(r.token)
        generator.close()
        times["batch_generator"].append(time.perf_counter() - start)
        outputs["batch_generator"] = [got[u] for u in uids]

    benchmark.group = "decode, 8 agents x 64 tokens"
    benchmark.pedantic(pair, rounds=12, warmup_rounds=3)
    assert outputs["engine"] == outputs["batch_generator"]  # the same work, token for token
    _record_pair(benchmark, times, "engine", "batch_generator", sum(len(t) for t in outputs["engine"]))
