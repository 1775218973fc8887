"""Engine benchmarks, all on one tiny llama (2 layers, hidden 64) in the same run.

- Warm time-to-first-token: one agent resumes with 4,096 cached tokens and
  sends 16 new ones. Against: cold prefill of the same 4,112 tokens, and
  mlx-lm's own in-memory prompt-cache reuse (``stream_generate`` with a kept
  ``prompt_cache``, trimmed back after each round).
- Decode throughput: 8 agents batched, against mlx-lm's ``BatchGenerator``
  on the same prompts.

The engine and its mlx-lm counterpart run in alternating rounds of one
benchmark, so that both see the same (shared, noisy) machine; their medians
and the ratio go to ``extra_info``, which bench/gate.py checks.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from conftest import record_seconds, tokens
from mlx_lm.generate import BatchGenerator, stream_generate
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

from blockpool import AgentBlocks, BlockPool, BlockPoolBatchEngine, ModelCacheSpec

HISTORY, NEW, DECODE_AGENTS, DECODE_TOKENS = 4096, 16, 8, 64


def first_token_time(responses) -> None:
    next(iter(responses))


@pytest.fixture(scope="module")
def warm_agent(llama):
    model, tokenizer = llama
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    engine.submit("template", tokens(HISTORY - 1, 1), max_tokens=1)  # 4,096 tokens cached
    (done,) = list(engine.step())
    assert done.blocks.total_tokens == HISTORY
    return engine, pool, done.blocks


def test_ttft_warm_engine_vs_mlx_lm_prompt_cache(benchmark, warm_agent, llama):
    """Alternating rounds, so both paths see the same machine: the engine resuming a
    fresh agent that shares the template's 4,096-token blocks, then mlx-lm's
    stream_generate on a kept prompt cache of the same 4,096 tokens (trimmed back
    after each round). Each is timed from the request to its first token."""
    engine, pool, template = warm_agent
    model, tokenizer = llama
    prompt = tokens(NEW, 2)
    cache = make_prompt_cache(model)
    for _ in stream_generate(model, tokenizer, template.token_ids, max_tokens=1, prompt_cache=cache):
        pass
    trim_prompt_cache(cache, cache[0].offset - HISTORY)
    times: dict[str, list[float]] = {"engine": [], "mlx_lm": []}
    state = {"round": 0}

    def pair():
        agent = f"round-{state['round']}"
        state["round"] += 1
        pool.share(template.all_blocks(), agent)
        handle = AgentBlocks(agent, template.spec, {k: list(v) for k, v in template.blocks.items()}, HISTORY, list(template.token_ids))
        start = time.perf_counter()
        engine.submit(agent, prompt, cache=handle, max_tokens=2)
        events = engine.stream()
        next(e for e in events if e.token is not None)
        times["engine"].append(time.perf_counter() - start)
        for event in events:  # the second token and the write-back, untimed
            if event.completion:
                pool.release(event.completion.blocks)

        start = time.perf_counter()
        next(iter(stream_generate(model, tokenizer, prompt, max_tokens=1, prompt_cache=cache)))
        times["mlx_lm"].append(time.perf_counter() - start)
        trim_prompt_cache(cache, cache[0].offset - HISTORY)

    benchmark.group = "TTFT, 4096 cached + 16 new tokens"
    benchmark.pedantic(pair, rounds=30, warmup_rounds=3)
    assert pool.used_blocks() == template.num_blocks  # nothing leaked
    _record_pair(benchmark, times, "engine", "mlx_lm")


def _record_pair(benchmark, times, ours: str, theirs: str, tokens_per_round: int | None = None) -> None:
    warm = 3  # pedantic's warm-up rounds run the function too
    stats = {name: np.array(values[warm:]) * 1e3 for name, values in times.items()}
    for name, ms in stats.items():
        benchmark.extra_info[f"{name}_median_ms"] = float(np.median(ms))
        benchmark.extra_info[f"{name}_p95_ms"] = float(np.percentile(ms, 95))
        if tokens_per_round:
            benchmark.extra_info[f"{name}_tokens_per_s"] = float(tokens_per_round / np.median(ms) * 1e3)
    benchmark.extra_info["ratio"] = float(np.median(stats[ours]) / np.median(stats[theirs]))
    record_seconds(benchmark)


def test_ttft_cold_prefill(benchmark, llama):
    model, tokenizer = llama
    full = tokens(HISTORY, 1) + tokens(NEW, 2)

    def cold():
        first_token_time(stream_generate(model, tokenizer, full, max_tokens=1, prompt_cache=make_prompt_cache(model)))

    benchmark.group = "TTFT, 4096 cached + 16 new tokens"
    benchmark.pedantic(cold, rounds=5, warmup_rounds=1)
    record_seconds(benchmark)


def _prompts() -> list[list[int]]:
    return [tokens(20 + 9 * i, 100 + i) for i in range(DECODE_AGENTS)]


def test_decode_8_agents_engine_vs_batch_generator(benchmark, llama):
    """Alternating rounds: 8 agents x 64 tokens through the engine, then the same
    prompts through mlx-lm's BatchGenerator."""
    model, tokenizer = llama
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    stop = [[t] for t in sorted(tokenizer.eos_token_ids)]
    times: dict[str, list[float]] = {"engine": [], "batch_generator": []}
    counts = {}

    def pair():
        start = time.perf_counter()
        for i, prompt in enumerate(_prompts()):
            engine.submit(f"agent-{i}", prompt, max_tokens=DECODE_TOKENS)
        done = list(engine.step())
        times["engine"].append(time.perf_counter() - start)
        for c in done:
            pool.release(c.blocks)
        counts["engine"] = sum(c.generation_tokens for c in done)

        start = time.perf_counter()
        generator = BatchGenerator(model, stop_tokens=stop)
        generator.insert(_prompts(), max_tokens=[DECODE_TOKENS] * DECODE_AGENTS)
        count = 0
        while responses := generator.next_generated():
            count += len(responses)
        generator.close()
        times["batch_generator"].append(time.perf_counter() - start)
        counts["batch_generator"] = count

    benchmark.group = "decode, 8 agents x 64 tokens"
    benchmark.pedantic(pair, rounds=12, warmup_rounds=3)
    assert counts["engine"] == counts["batch_generator"]
    _record_pair(benchmark, times, "engine", "batch_generator", counts["engine"])
