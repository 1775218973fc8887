"""AgentMemory benchmarks on the tests' tiny llama.

- Save and load one agent at 1K and 4K tokens, and bytes on disk, against
  mlx-lm's save_prompt_cache / load_prompt_cache of the same cache.
- Time to first token for an agent resuming from the pool and from disk,
  against a cold prefill (4,096 history tokens + 16 new ones).
- Agents that fit in one fixed memory budget, with a shared 2K system
  prompt, against mlx-lm's server cache (``LRUPromptCache``) in the same
  budget; both counted after running the agents' turns.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import LRUPromptCache, load_prompt_cache, make_prompt_cache, save_prompt_cache

from blockpool import AgentBlocks, AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec, from_mlx_caches
from blockpool.persistence import export_agent, import_agent, load_agent_file, save_agent_file
from conftest import record_seconds, tokens

LENGTHS = [1024, 4096]


@pytest.fixture(scope="module", params=LENGTHS, ids=lambda n: f"{n}-tokens")
def agent_cache(request, llama):
    """An mlx-lm cache of n prefilled tokens, and the same cache stored as blocks."""
    model, _ = llama
    n = request.param
    history = tokens(n, 1)
    cache = make_prompt_cache(model)
    model(mx.array([history]), cache=cache)
    mx.eval([c.state for c in cache])
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
    agent = from_mlx_caches(pool, cache, history, AgentBlocks.empty("a", pool.spec))
    return n, cache, pool, agent


def test_save_blockpool(benchmark, agent_cache, tmp_path):
    n, _, pool, agent = agent_cache
    path = tmp_path / "a.safetensors"
    benchmark.group = f"save one agent, {n} tokens"
    benchmark.pedantic(lambda: save_agent_file(path, export_agent(pool, agent, "fp")), rounds=10, warmup_rounds=1)
    record_seconds(benchmark)
    benchmark.extra_info["bytes_on_disk"] = path.stat().st_size


def test_save_mlx_lm(benchmark, agent_cache, tmp_path):
    n, cache, _, _ = agent_cache
    path = tmp_path / "a.safetensors"
    benchmark.group = f"save one agent, {n} tokens"
    benchmark.pedantic(lambda: save_prompt_cache(str(path), cache), rounds=10, warmup_rounds=1)
    record_seconds(benchmark)
    benchmark.extra_info["bytes_on_disk"] = path.stat().st_size


def test_load_blockpool(benchmark, agent_cache, tmp_path):
    n, _, pool, agent = agent_cache
    path = tmp_path / "a.safetensors"
    save_agent_file(path, export_agent(pool, agent, "fp"))

    def load():  # read, verify the checksum, write into pool blocks
        pool.release(import_agent(pool, load_agent_file(path, "fp", pool.spec)))

    benchmark.group = f"load one agent, {n} tokens"
    benchmark.pedantic(load, rounds=10, warmup_rounds=1)
    record_seconds(benchmark)


def test_load_mlx_lm(benchmark, agent_cache, tmp_path):
    n, cache, _, _ = agent_cache
    path = tmp_path / "a.safetensors"
    save_prompt_cache(str(path), cache)

    def load():
        mx.eval([c.state for c in load_prompt_cache(str(path))])

    benchmark.group = f"load one agent, {n} tokens"
    benchmark.pedantic(load, rounds=10, warmup_rounds=1)
    record_seconds(benchmark)


@pytest.fixture(scope="module")
def memory(llama, tmp_path_factory):
    model, tokenizer = llama
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=96)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool), cache_dir=tmp_path_factory.mktemp("agents"))
    history = tokens(4096, 2)
    memory.submit("agent", history, max_tokens=1)
    list(memory.step())
    return memory, history


def _resume(benchmark, memory, history, where: str):
    state = {"round": 0}

    def setup():
        if where == "disk":
            memory.spill("agent")
        state["round"] += 1
        return (history + tokens(16, 100 + state["round"]),), {}

    def first_token(prompt):
        memory.submit("agent", prompt, max_tokens=1)
        (done,) = list(memory.step())
        assert done.error is None and done.finish_reason == "length" and len(done.token_ids) == 1
        assert done.cache_source == where and done.prompt_tokens == 16

    benchmark.group = "TTFT, 4096 history + 16 new tokens, AgentMemory"
    benchmark.pedantic(first_token, setup=setup, rounds=10, warmup_rounds=1)
    record_seconds(benchmark)


def test_ttft_from_pool(benchmark, memory):
    _resume(benchmark, *memory, "pool")


def test_ttft_from_disk(benchmark, memory):
    _resume(benchmark, *memory, "disk")


def test_ttft_cold(benchmark, memory):
    store, history = memory
    state = {"round": 0}

    def setup():  # a history nobody holds: nothing to reuse or share
        state["round"] += 1
        return (f"cold-{state['round']}", tokens(4096, 300 + state["round"]) + tokens(16, 200 + state["round"])), {}

    def first_token(agent, prompt):
        store.submit(agent, prompt, max_tokens=1)
        (done,) = list(store.step())
        assert done.error is None and len(done.token_ids) == 1
        assert done.cache_source == "cold"
        store.forget(agent)

    benchmark.group = "TTFT, 4096 history + 16 new tokens, AgentMemory"
    benchmark.pedantic(first_token, setup=setup, rounds=3, warmup_rounds=0)
    record_seconds(benchmark)


BUDGET = 16 << 20  # bytes of KV memory
SYSTEM, OWN, AGENTS = 2048, 200, 160


def test_agents_in_budget_blockpool(benchmark, llama):
    """Agents that stay in memory at once: a 2K shared system prompt plus their own turn."""
    model, tokenizer = llama
    system = tokens(SYSTEM, 3)

    def run():
        pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=BUDGET)
        memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool))  # no disk: eviction drops
        for i in range(AGENTS):
            memory.submit(f"agent-{i}", system + tokens(OWN, 10 + i), max_tokens=8)
            (done,) = list(memory.step())
            assert done.error is None and done.token_ids
        hot = memory.stats().hot_agents
        memory.close()
        return hot, pool.total_bytes

    benchmark.group = f"agents in a {BUDGET >> 20} MiB budget"
    hot, pool_bytes = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(agents=hot, budget_bytes=pool_bytes)
    record_seconds(benchmark)


def test_agents_in_budget_mlx_lm_prompt_caches(benchmark, llama):
    """mlx-lm's server cache, ``LRUPromptCache(max_bytes=BUDGET)``, after the same turns, run
    as mlx_lm.server runs them (fetch the nearest cache, generate, insert): the agents it still holds."""
    model, tokenizer = llama
    system = tokens(SYSTEM, 3)

    def run():
        lru = LRUPromptCache(max_size=10_000, max_bytes=BUDGET)
        per_agent = 0
        for i in range(AGENTS):
            prompt = system + tokens(OWN, 10 + i)
            cache, rest = lru.fetch_nearest_cache("tiny-llama", prompt)  # the server keys by model name
            if cache is None:
                cache, rest = make_prompt_cache(model), prompt
            generated = [r.token for r in stream_generate(model, tokenizer, rest, max_tokens=8, prompt_cache=cache)]
            lru.insert_cache("tiny-llama", prompt + generated[:-1], cache)
            per_agent = sum(c.nbytes for c in cache)
        return len(lru), per_agent

    benchmark.group = f"agents in a {BUDGET >> 20} MiB budget"
    agents, per_agent = benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(agents=agents, bytes_per_agent=per_agent, budget_bytes=BUDGET)
    record_seconds(benchmark)
