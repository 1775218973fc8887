"""A budget that holds one request at a time: every request still completes, exactly.

The README says ``AgentMemory`` makes room by writing idle agents to disk.
These are the two patterns where it once failed requests instead (a queued
agent read back from disk was counted twice at admission): one request at a
time, and all agents at once. The pool is the smallest at which one
request fits (``engine.request_bytes``), so every turn must make room.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration


def tokens(n: int, seed: int) -> list[int]:
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()


def smallest_store(load_tiny, tmp_path, final_tokens: int, deterministic: bool = False):
    """A store whose pool holds exactly one request of ``final_tokens`` tokens (history, prompt, generated)."""
    model, tokenizer = load_tiny("llama_4layer")
    spec = ModelCacheSpec.from_model(model)
    sizing = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, num_blocks=256))
    budget = sizing.request_bytes(0, final_tokens, 0)
    pool = BlockPool(spec, memory_bytes=budget)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    assert engine.fits_ever(0, final_tokens, 0) and not engine.fits_ever(0, final_tokens + 512, 0)
    return model, tokenizer, pool, AgentMemory(engine, cache_dir=tmp_path, deterministic=deterministic)


@pytest.mark.parametrize(
    "deterministic", [False, True], ids=["background-io", "in-line-io (each rank under mlx.launch)"]
)
def test_one_request_at_a_time_makes_room_by_spilling(load_tiny, tmp_path, deterministic):
    """Three agents with 600-token histories, two turns each: the second turns come from disk."""
    max_tokens, follow = 8, 20
    histories = {f"a{i}": tokens(600, i) for i in range(3)}
    final = 600 + max_tokens + follow + max_tokens
    model, tokenizer, pool, memory = smallest_store(load_tiny, tmp_path, final, deterministic)
    start = pool.stats()
    sources = []
    for turn in range(2):
        for agent, history in histories.items():
            memory.submit(agent, history, max_tokens=max_tokens)
            (done,) = list(memory.step())
            assert done.finish_reason in ("stop", "length"), done.error
            assert done.token_ids == mlx_lm_tokens(model, tokenizer, history, max_tokens)
            sources.append(done.cache_source)
            histories[agent] = history + done.token_ids + tokens(follow, 100 + 10 * turn + int(agent[1:]))
            pool.check_invariants()
    assert sources[:3] == ["cold"] * 3 and sources[3:] == ["disk"] * 3
    memory.close()
    assert pool.stats() == start


def test_all_agents_at_once_wait_for_room_and_complete(load_tiny, tmp_path):
    """Six agents with 1,000-token histories submitted together, twice: every turn completes."""
    max_tokens, follow, agents = 4, 8, 6
    histories = {f"a{i}": tokens(1000, 50 + i) for i in range(agents)}
    model, tokenizer, pool, memory = smallest_store(load_tiny, tmp_path, 1000 + 2 * max_tokens + follow)
    start = pool.stats()
    for turn in range(2):
        uids = {memory.submit(agent, history, max_tokens=max_tokens): agent for agent, history in histories.items()}
        done = {c.uid: c for c in memory.step()}
        assert set(done) == set(uids)
        for uid, agent in uids.items():
            completion = done[uid]
            assert completion.finish_reason in ("stop", "length"), completion.error
            assert completion.token_ids == mlx_lm_tokens(model, tokenizer, histories[agent], max_tokens), agent
            if turn:
                assert completion.cached_tokens >= 1000  # resumed from its own cache, from the pool or from disk
        for uid, agent in uids.items():
            histories[agent] = histories[agent] + done[uid].token_ids + tokens(follow, 200 + 10 * turn + int(agent[1:]))
        pool.check_invariants()
    memory.close()
    assert pool.stats() == start
