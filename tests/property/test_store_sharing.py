"""Hypothesis: agents whose prompts share a base up to random points, on the real store and model.

Each step an agent sends the base cut at a random point (inside a block,
at a block's edge, or not at all) plus tokens of its own, or its own
history plus more. Whatever the store shares (whole blocks, a part of one
copied on write, the agent's own cache), every output equals mlx-lm's on a
fresh cache, the pool's books balance, and closing the store returns the
pool to its start.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration

BASE = mx.random.randint(3, 512, (700,), key=mx.random.key(40)).tolist()

STEP = st.tuples(
    st.integers(0, 3),  # the agent
    st.booleans(),  # continue its own history (when it has one) rather than start from the base
    st.integers(0, len(BASE)),  # where the base is cut
    st.integers(1, 30),  # own tokens after it
    st.integers(1, 5),  # tokens to generate
)


@settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.lists(STEP, min_size=2, max_size=6), seed=st.integers(0, 1000))
def test_random_shared_prefixes_stay_exact_and_balance_the_pool(load_tiny, steps, seed):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=60)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool))
    histories: dict[int, list[int]] = {}
    for i, (agent, own, cut, extra, max_tokens) in enumerate(steps):
        tail = mx.random.randint(3, 512, (extra,), key=mx.random.key(seed * 100 + i)).tolist()
        prompt = (histories[agent] if own and agent in histories else BASE[:cut]) + tail
        memory.submit(f"agent-{agent}", prompt, max_tokens=max_tokens)
        (done,) = list(memory.step())
        assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, max_tokens), (i, done.cache_source)
        assert done.cached_tokens + done.prompt_tokens == len(prompt)
        histories[agent] = prompt + done.token_ids
        pool.check_invariants()
    memory.close()
    assert pool.available_blocks() == pool.total_blocks
    pool.check_invariants()
