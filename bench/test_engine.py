"""Engine benchmarks, all on one tiny llama (2 layers, hidden 64) in the same run.

- Warm time-to-first-token: one agent resumes with 4,096 cached tokens and
  sends 16 new ones. Against: cold prefill of the same 4,112 tokens, and
  mlx-lm's own in-memory prompt-cache reuse (``stream_generate`` with a kept
  ``prompt_cache``, trimmed back after each round).
- Decode throughput: 8 agents batched, against mlx-lm's ``BatchGenerator``
  on the same prompts.

Each round is timed from the request to its first token. Gated on ratios
by bench/gate.py.
"""

from __future__ import annotations

import mlx.core as mx
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


def test_ttft_engine_warm(benchmark, warm_agent):
    engine, pool, template = warm_agent
    prompt = tokens(NEW, 2)
    state = {"round": 0}

    def setup():
        teardown()
        # Each round resumes a fresh agent that shares the template's full blocks.
        agent = f"round-{state['round']}"
        state["round"] += 1
        pool.share(template.all_blocks(), agent)
        handle = AgentBlocks(agent, template.spec, {k: list(v) for k, v in template.blocks.items()}, HISTORY, list(template.token_ids))
        return (handle,), {}

    def warm(handle):
        engine.submit(handle.agent_id, prompt, cache=handle, max_tokens=2)
        events = engine.stream()
        next(e for e in events if e.token is not None)  # the first token: stop the clock
        state["events"] = events

    def teardown():
        for event in state.pop("events", ()):  # the second token and the write-back
            if event.completion:
                pool.release(event.completion.blocks)

    benchmark.group = "TTFT, 4096 cached + 16 new tokens"
    benchmark.pedantic(warm, setup=setup, rounds=20, warmup_rounds=2)
    teardown()
    assert pool.used_blocks() == template.num_blocks  # nothing leaked
    record_seconds(benchmark)


def test_ttft_mlx_lm_prompt_cache(benchmark, llama):
    model, tokenizer = llama
    cache = make_prompt_cache(model)
    history = tokens(HISTORY, 1)
    for _ in stream_generate(model, tokenizer, history, max_tokens=1, prompt_cache=cache):
        pass
    trim_prompt_cache(cache, 1)  # keep exactly the 4,096 history tokens
    prompt = tokens(NEW, 2)

    def warm():
        first_token_time(stream_generate(model, tokenizer, prompt, max_tokens=1, prompt_cache=cache))
        trim_prompt_cache(cache, cache[0].offset - HISTORY)

    benchmark.group = "TTFT, 4096 cached + 16 new tokens"
    benchmark.pedantic(warm, rounds=20, warmup_rounds=2)
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


def test_decode_engine_8_agents(benchmark, llama):
    model, tokenizer = llama
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    def run():
        for i, prompt in enumerate(_prompts()):
            engine.submit(f"agent-{i}", prompt, max_tokens=DECODE_TOKENS)
        done = list(engine.step())
        for c in done:
            pool.release(c.blocks)
        return sum(c.generation_tokens for c in done)

    benchmark.group = "decode, 8 agents x 64 tokens"
    generated = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    record_seconds(benchmark, tokens=generated)


def test_decode_mlx_lm_batch_generator_8_agents(benchmark, llama):
    model, tokenizer = llama
    stop = [[t] for t in sorted(tokenizer.eos_token_ids)]

    def run():
        generator = BatchGenerator(model, stop_tokens=stop)
        generator.insert(_prompts(), max_tokens=[DECODE_TOKENS] * DECODE_AGENTS)
        count = 0
        while responses := generator.next_generated():
            count += len(responses)
        generator.close()
        return count

    benchmark.group = "decode, 8 agents x 64 tokens"
    generated = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    record_seconds(benchmark, tokens=generated)
