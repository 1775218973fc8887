"""EXP-005: the engine's greedy output equals mlx-lm's own single-sequence generation.

Token for token, in float32 and bfloat16. Every case below is exact on this
machine, so no tolerance is used: the engine reaches mlx-lm's own decode
loop (BatchGenerator), and reconstruction is bit-exact (see
test_cache_conversion.py).
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from blockpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration

ARCHS = ["llama", "qwen3", "gemma3_text"]
DTYPES = [mx.float32, mx.bfloat16]


def random_tokens(n: int, seed: int) -> list[int]:
    # Ids 3.. avoid the tokenizer's special tokens (0 is EOS).
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()


@pytest.fixture(params=[(a, d) for a in ARCHS for d in DTYPES], ids=lambda p: f"{p[0]}-{str(p[1]).split('.')[-1]}")
def setup(request, load_tiny):
    model, tokenizer = load_tiny(*request.param)
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=160)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    yield model, tokenizer, pool, engine
    assert pool.available_blocks() == pool.total_blocks  # every test frees what it made


def run_one(engine, agent, prompt, max_tokens, cache=None):
    engine.submit(agent, prompt, cache=cache, max_tokens=max_tokens)
    (completion,) = list(engine.step())
    return completion


def test_short_prompt(setup):
    model, tokenizer, pool, engine = setup
    prompt = tokenizer.encode("the agent reads a file and writes")
    done = run_one(engine, "a", prompt, 32)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 32)
    pool.release(done.blocks)


def test_prompt_over_1000_tokens(setup):
    model, tokenizer, pool, engine = setup
    prompt = random_tokens(1100, 1)  # five blocks
    done = run_one(engine, "a", prompt, 24)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 24)
    assert done.blocks.total_tokens == 1100 + len(done.token_ids)
    pool.release(done.blocks)


def test_resume_over_three_turns_equals_cold_run_on_full_history(setup):
    model, tokenizer, pool, engine = setup
    history: list[int] = []
    cache = None
    for turn in range(3):
        prompt = random_tokens(40 + 90 * turn, 10 + turn)  # crosses block and window edges
        done = run_one(engine, "a", prompt, 20, cache=cache)
        history += prompt
        assert done.cached_tokens == len(history) - len(prompt)
        assert done.token_ids == mlx_lm_tokens(model, tokenizer, history, 20), f"turn {turn}"
        history += done.token_ids
        cache = done.blocks
    pool.release(cache)


def test_five_agents_of_different_lengths_batched(setup):
    model, tokenizer, pool, engine = setup
    prompts = {f"agent-{i}": random_tokens(5 + 61 * i, 20 + i) for i in range(5)}
    for agent, prompt in prompts.items():
        engine.submit(agent, prompt, max_tokens=16)
    done = {c.agent_id: c for c in engine.step()}
    for agent, prompt in prompts.items():
        assert done[agent].token_ids == mlx_lm_tokens(model, tokenizer, prompt, 16), agent
        pool.release(done[agent].blocks)


def test_resumed_agents_batched_with_fresh_ones(setup):
    model, tokenizer, pool, engine = setup
    first = {f"agent-{i}": random_tokens(30 + 50 * i, 30 + i) for i in range(3)}
    for agent, prompt in first.items():
        engine.submit(agent, prompt, max_tokens=8)
    caches = {c.agent_id: c for c in engine.step()}
    second = {agent: random_tokens(7 + 13 * i, 40 + i) for i, agent in enumerate(first)}
    for agent, prompt in second.items():
        engine.submit(agent, prompt, cache=caches[agent].blocks, max_tokens=12)
    engine.submit("fresh", random_tokens(70, 50), max_tokens=12)
    done = {c.agent_id: c for c in engine.step()}
    for agent in first:
        history = first[agent] + caches[agent].token_ids + second[agent]
        assert done[agent].token_ids == mlx_lm_tokens(model, tokenizer, history, 12), agent
    for c in done.values():
        pool.release(c.blocks)


def test_gemma_history_crossing_the_sliding_window(load_tiny):
    """Window 32: the second and third turns resume agents whose history is past it."""
    for dtype in DTYPES:
        model, tokenizer = load_tiny("gemma3_text", dtype)
        pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
        engine = BlockPoolBatchEngine(model, tokenizer, pool)
        histories = {"short": random_tokens(20, 60), "long": random_tokens(300, 61)}
        caches = {}
        for agent, prompt in histories.items():
            engine.submit(agent, prompt, max_tokens=20)  # "short" crosses 32 while decoding
        for c in engine.step():
            assert c.token_ids == mlx_lm_tokens(model, tokenizer, histories[c.agent_id], 20)
            histories[c.agent_id] += c.token_ids
            caches[c.agent_id] = c.blocks
        for agent in histories:
            assert len(caches[agent].blocks[0]) <= 2  # sliding layer: only the window's blocks
            follow_up = random_tokens(45, 62)
            histories[agent] += follow_up
            engine.submit(agent, follow_up, cache=caches[agent], max_tokens=20)
        for c in engine.step():
            assert c.token_ids == mlx_lm_tokens(model, tokenizer, histories[c.agent_id], 20), c.agent_id
            pool.release(c.blocks)
        assert pool.available_blocks() == 64
