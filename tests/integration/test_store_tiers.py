"""AgentMemory's tiers under one budget: durable write-behind, the agents listing, prefixes that
outlive their agents in the cached-free queue, queued agents that move to disk while they wait,
and deterministic (synchronous) disk work. Every output is compared with a cold mlx-lm run."""

from __future__ import annotations

import mlx.core as mx
import pytest

from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, InvalidRequestError, ModelCacheSpec
from blockpool.persistence import agent_file_name
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration


def tokens(n: int, seed: int) -> list[int]:
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()


def store(load_tiny, tmp_path, budget=None, **options):
    model, tokenizer = load_tiny("llama")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, memory_bytes=budget) if budget else BlockPool(spec, num_blocks=96)
    return (
        model,
        tokenizer,
        pool,
        AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool), cache_dir=tmp_path, **options),
    )


def turn(memory, agent, prompt, max_tokens=6):
    memory.submit(agent, prompt, max_tokens=max_tokens)
    (done,) = list(memory.step())
    return done


def test_durable_agents_are_on_disk_before_their_next_turn(load_tiny, tmp_path):
    model, tokenizer, pool, memory = store(load_tiny, tmp_path, durable=True)
    with pytest.raises(InvalidRequestError, match="cache_dir"):
        AgentMemory(memory.engine, durable=True)
    prompt = tokens(40, 1)
    done = turn(memory, "a", prompt)
    assert memory.wait_durable("a", timeout=60)
    assert (tmp_path / agent_file_name("a")).is_file()
    (info,) = memory.agents()
    assert (info.agent_id, info.where, info.tokens, info.durable) == ("a", "pool", 40 + len(done.token_ids), True)
    assert info.bytes > 0
    # A second store on the same directory, as after a crash (the first is never closed), resumes from it.
    _, _, _, restarted = store(load_tiny, tmp_path)
    follow = prompt + done.token_ids + tokens(5, 2)
    again = turn(restarted, "a", follow)
    assert again.cache_source == "disk" and again.token_ids == mlx_lm_tokens(model, tokenizer, follow, 6)
    restarted.close()
    memory.close()
    assert pool.stats().used_bytes == 0


def test_agents_lists_every_tier(load_tiny, tmp_path):
    _, _, pool, memory = store(load_tiny, tmp_path)
    turn(memory, "on-disk", tokens(30, 3))
    memory.spill("on-disk")
    turn(memory, "hot", tokens(30, 4))
    uid = memory.submit("running", tokens(20, 5), max_tokens=50)
    listed = {a.agent_id: a for a in memory.agents()}
    assert {a: (i.where, i.durable) for a, i in listed.items()} == {
        "on-disk": ("disk", True),
        "hot": ("pool", False),
        "running": ("running", False),
    }
    assert listed["on-disk"].tokens == 36 and listed["running"].tokens == 20
    memory.cancel(uid)
    list(memory.step())
    memory.close()


def test_a_prefix_outlives_its_agents_in_the_cached_free_queue(load_tiny, tmp_path):
    """The donor is spilled to disk, yet its system-prompt blocks still serve a newcomer."""
    model, tokenizer, pool, memory = store(load_tiny, tmp_path)
    system = tokens(512, 6)  # two full blocks
    turn(memory, "donor", system + tokens(10, 7))
    memory.spill("donor")
    assert pool.stats().cached_free_blocks == 4  # two blocks x two layers, freed but findable
    prompt = system + tokens(12, 8)
    done = turn(memory, "newcomer", prompt)
    assert done.cache_source == "shared" and done.cached_tokens == 512
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 6)
    memory.close()
    assert pool.stats().used_bytes == 0


def test_queued_agents_move_to_disk_while_they_wait_and_resume_exactly(load_tiny, tmp_path):
    """Six agents with histories submit at once into a budget for two: the queued ones are spilled to
    give room, read back in the background when next in line, and resumed exactly."""
    model, tokenizer = load_tiny("llama")
    sizing = BlockPoolBatchEngine(model, tokenizer, BlockPool(ModelCacheSpec.from_model(model), num_blocks=96))
    _, _, pool, memory = store(load_tiny, tmp_path, budget=2 * sizing.request_bytes(300, 9, 8))
    histories = {f"agent-{i}": tokens(300, 20 + i) for i in range(6)}
    for agent, history in histories.items():
        histories[agent] = history + turn(memory, agent, history, 4).token_ids
    follow = {agent: history + tokens(9, 40 + i) for i, (agent, history) in enumerate(histories.items())}
    for agent, prompt in follow.items():
        memory.submit(agent, prompt, max_tokens=8)
    done = {c.agent_id: c for c in memory.step()}
    for agent, prompt in follow.items():
        assert done[agent].token_ids == mlx_lm_tokens(model, tokenizer, prompt, 8), agent
        assert done[agent].cache_source in ("pool", "disk") and done[agent].cached_tokens >= 300
    assert {c.cache_source for c in done.values()} == {"pool", "disk"}
    assert not memory.write_errors
    memory.close()
    assert pool.stats().used_bytes == 0


def test_deterministic_stores_make_the_same_decisions(load_tiny, tmp_path):
    """Two stores with deterministic disk work, fed the same calls, end in the same states."""
    runs = []
    for name in ("rank-0", "rank-1"):
        model, tokenizer = load_tiny("llama")
        sizing = BlockPoolBatchEngine(model, tokenizer, BlockPool(ModelCacheSpec.from_model(model), num_blocks=96))
        _, _, pool, memory = store(
            load_tiny, tmp_path / name, budget=2 * sizing.request_bytes(200, 9, 8), deterministic=True
        )
        trace = []
        for round_ in range(2):
            for i in range(4):
                memory.submit(f"agent-{i}", tokens(200, i) + tokens(9 * round_, 50 + i), max_tokens=8)
            for event in memory.stream():
                trace.append((event.agent_id, event.token, event.completion.cache_source if event.completion else None))
        trace.append(tuple((a.agent_id, a.where, a.tokens) for a in memory.agents()))
        runs.append(trace)
        memory.close()
    assert runs[0] == runs[1]


def test_a_cancelled_turn_never_shortens_the_agents_file(load_tiny, tmp_path):
    model, tokenizer, pool, memory = store(load_tiny, tmp_path, durable=True)
    prompt = tokens(40, 9)
    done = turn(memory, "a", prompt)
    history = prompt + done.token_ids
    assert memory.wait_durable("a", timeout=60)
    diverging = prompt[:20] + tokens(30, 10)  # a different conversation under the same agent id
    uid = memory.submit("a", diverging, max_tokens=50)
    memory.cancel(uid)
    (cancelled,) = list(memory.step())
    assert cancelled.finish_reason == "cancelled"
    assert memory.wait_durable("a", timeout=60)
    memory.close()  # persists every agent: not over the longer finished turn
    _, _, _, restarted = store(load_tiny, tmp_path)
    follow = history + tokens(5, 11)
    again = turn(restarted, "a", follow)
    assert again.cache_source == "disk" and again.cached_tokens == len(history)
    assert again.token_ids == mlx_lm_tokens(model, tokenizer, follow, 6)
    restarted.close()


def test_a_hot_agent_resumes_in_a_budget_that_holds_it_once(load_tiny, tmp_path):
    """The budget holds the agent's blocks and one request's working memory, not the blocks twice:
    resuming from the pool must not count blocks it already holds (it once did, and every resume
    failed with PoolExhaustedError in a budget like this one)."""
    model, tokenizer = load_tiny("llama")
    spec = ModelCacheSpec.from_model(model)
    history, new, generated = 1000, 16, 4
    engine_probe = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, num_blocks=8))
    final = history + 3 * (new + generated)  # the longest request of the test
    budget = engine_probe.request_bytes(final, 0, 0) + 2 * engine_probe.pool.bytes_per_block(0)
    _, _, pool, memory = store(load_tiny, tmp_path, budget=budget)
    first = tokens(history - generated, 40)
    done = turn(memory, "a", first, max_tokens=generated)
    assert done.finish_reason == "length"
    for round_ in range(3):
        prompt = first + done.token_ids + tokens(new, 41 + round_)
        done = turn(memory, "a", prompt, max_tokens=generated)
        assert done.error is None and done.cache_source == "pool", (done.finish_reason, done.error)
        assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, generated)
        first = prompt
    memory.close()
    assert pool.stats().used_bytes == 0
