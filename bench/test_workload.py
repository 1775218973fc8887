"""Side by side: one multi-agent, multi-turn workload, several ways to keep (or not keep) KV caches.

The workload: 6 agents, 4 turns each; every agent starts from the same
1,024-token system prompt, and each turn appends 48 new prompt tokens and
16 generated ones to its history. Every contender sends the same token
sequences through the same tiny llama (2 layers, hidden 64), and must
produce exactly the tokens of a cold mlx-lm run of every turn (computed once
by a fixture, so the check holds whatever runs first).

Sequential (one request at a time, agents interleaved):
- cold: mlx-lm with a fresh prompt cache every turn (full prefill);
- mlx-lm prompt cache per agent, kept in memory;
- mlx-lm save_prompt_cache / load_prompt_cache around every turn;
- mlx-lm server's ``LRUPromptCache`` (fetch nearest, generate, insert),
  byte limit = the blockpool budget;
- blockpool ``AgentMemory``, a pool for every agent ("pool");
- blockpool ``AgentMemory``, a pool for two agents, the rest on disk ("disk").

All agents at once (each turn, the six requests are submitted together):
- mlx-lm's server pattern: ``LRUPromptCache`` for the caches, one
  ``BatchGenerator`` batch for the requests;
- blockpool ``AgentMemory``.

Recorded per contender: time to first token per turn, total wall time, and
the peak KV bytes held (caches' arrays for mlx-lm; everything the pool
charges for blockpool, which includes the running batch's working caches).
For blockpool also MLX's own peak memory over the run, against its budget.
``bench/gate.py`` checks blockpool's wall time against ``LRUPromptCache``'s.
"""

from __future__ import annotations

import time

import mlx.core as mx
import pytest
from mlx_lm.generate import BatchGenerator, stream_generate
from mlx_lm.models.cache import LRUPromptCache, load_prompt_cache, make_prompt_cache, save_prompt_cache

from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from conftest import idle, tokens

AGENTS, TURNS, SYSTEM, NEW, GENERATED = 6, 4, 1024, 48, 16
BUDGET = 4 << 20  # sequential: bytes of KV memory for blockpool, and the LRU's byte limit
# All at once, the running batch holds every agent's history too (padded to the longest): blockpool
# counts that against its budget, mlx-lm's LRU limit does not. Both get a limit that holds them all.
CONCURRENT_BUDGET = 16 << 20


class Workload:
    """The turns, in order, and each contender's record of them."""

    def __init__(self):
        system = tokens(SYSTEM, 7)
        self.histories = {f"agent-{i}": list(system) for i in range(AGENTS)}
        self.series: list[tuple[int, float]] = []
        self.peak = 0

    def rounds(self):
        """Per turn, every agent's prompt (its history plus this turn's new tokens)."""
        for turn in range(TURNS):
            for i, agent in enumerate(self.histories):
                self.histories[agent] += tokens(NEW, 1000 * turn + i)
            yield dict(self.histories)

    def turns(self):
        for prompts in self.rounds():
            yield from prompts.items()

    def answered(self, agent: str, prompt: list[int], generated: list[int], ttft: float) -> None:
        self.series.append((len(prompt), ttft * 1e3))
        self.histories[agent] = prompt + generated

    def held(self, nbytes: int) -> None:
        self.peak = max(self.peak, nbytes)


def _mlx_turn(model, tokenizer, cache, prompt, start):
    """One turn through mlx-lm: returns (generated tokens, time to first token)."""
    first, out = None, []
    for r in stream_generate(model, tokenizer, prompt, max_tokens=GENERATED, prompt_cache=cache):
        first = first or time.perf_counter()
        out.append(r.token)
    return out, first - start


def _nbytes(cache) -> int:
    return sum(c.nbytes for c in cache)


@pytest.fixture(scope="module")
def reference(llama):
    """Every agent's final history with a cold mlx-lm prefill of every turn: what every contender must produce."""
    model, tokenizer = llama
    work = Workload()
    for agent, prompt in work.turns():
        out, _ = _mlx_turn(model, tokenizer, make_prompt_cache(model), prompt, time.perf_counter())
        work.answered(agent, prompt, out, 0.0)
    return work.histories


@pytest.fixture(scope="module")
def allowance(llama):
    """The activations of the workload's largest forward pass, measured on mlx-lm itself: MLX's peak
    while mlx-lm prefills a first turn cold (system prompt plus 48 tokens), minus its KV cache."""
    model, tokenizer = llama
    prompt = Workload().histories["agent-0"] + tokens(NEW, 0)
    cache = make_prompt_cache(model)
    idle()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=GENERATED, prompt_cache=cache):
        pass
    idle()
    return max(0, mx.get_peak_memory() - base - _nbytes(cache))


@pytest.fixture(scope="module")
def batched_allowance(llama):
    """The activations of the all-at-once workload's largest forward pass, measured on mlx-lm itself:
    MLX's peak while mlx-lm's BatchGenerator prefills the first round's prompts together (as the
    engine does, with the same prefill batch and step sizes), minus the KV caches it returns.
    On the CPU attention scores are materialized, so this grows with the number of prompts
    prefilled together; ``prefill_batch_size`` bounds it."""
    model, tokenizer = llama
    prompts = list(next(Workload().rounds()).values())
    stop = [[t] for t in sorted(tokenizer.eos_token_ids)]
    idle()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    generator = BatchGenerator(model, stop_tokens=stop)
    generator.insert(prompts, max_tokens=[GENERATED] * len(prompts))
    kv = 0
    while responses := generator.next_generated():
        kv += sum(_nbytes(r.prompt_cache) for r in responses if r.finish_reason is not None)
    generator.close()
    idle()
    return max(0, mx.get_peak_memory() - base - kv)


def _record_peak(benchmark, peak: int, budget: int, allowance: int) -> None:
    """MLX's peak over the run against the budget: gated at 1.05 x budget + the activation allowance."""
    benchmark.extra_info.update(
        mlx_peak_bytes=peak,
        budget_bytes=budget,
        activation_allowance_bytes=allowance,
        peak_over_bound=peak / (1.05 * budget + allowance),
    )


def _run(benchmark, group, name, run, reference, **info):
    work = Workload()
    benchmark.group = group
    start = time.perf_counter()
    benchmark.pedantic(lambda: run(work), rounds=1, warmup_rounds=0)
    wall = time.perf_counter() - start
    benchmark.extra_info.update(
        contender=name, series=work.series, wall_s=wall, wall_median_ms=wall * 1e3, peak_kv_bytes=work.peak, **info
    )
    assert work.histories == reference, f"{name} generated other tokens than cold prefill"


SEQUENTIAL = "multi-agent workload, sequential"
CONCURRENT = "multi-agent workload, all agents at once"


def test_cold_prefill(benchmark, llama, reference):
    model, tokenizer = llama

    def run(work):
        for agent, prompt in work.turns():
            start = time.perf_counter()
            cache = make_prompt_cache(model)
            out, ttft = _mlx_turn(model, tokenizer, cache, prompt, start)
            work.held(_nbytes(cache))
            work.answered(agent, prompt, out, ttft)

    _run(benchmark, SEQUENTIAL, "cold prefill every turn", run, reference)


def test_mlx_lm_prompt_cache_per_agent(benchmark, llama, reference):
    model, tokenizer = llama

    def run(work):
        caches, held = {}, {}
        for agent, prompt in work.turns():
            start = time.perf_counter()
            cache = caches.setdefault(agent, make_prompt_cache(model))
            out, ttft = _mlx_turn(model, tokenizer, cache, prompt[cache[0].offset :], start)
            held[agent] = _nbytes(cache)
            work.held(sum(held.values()))
            work.answered(agent, prompt, out, ttft)

    _run(benchmark, SEQUENTIAL, "mlx-lm prompt cache per agent (memory)", run, reference)


def test_mlx_lm_save_and_load_per_turn(benchmark, llama, reference, tmp_path):
    model, tokenizer = llama

    def run(work):
        offsets = {}
        for agent, prompt in work.turns():
            start = time.perf_counter()
            path = tmp_path / f"{agent}.safetensors"
            cache = load_prompt_cache(str(path)) if agent in offsets else make_prompt_cache(model)
            out, ttft = _mlx_turn(model, tokenizer, cache, prompt[offsets.get(agent, 0) :], start)
            save_prompt_cache(str(path), cache)
            offsets[agent] = cache[0].offset
            work.held(_nbytes(cache))  # one live cache at a time
            work.answered(agent, prompt, out, ttft)

    _run(benchmark, SEQUENTIAL, "mlx-lm save/load per turn (disk)", run, reference)


def test_mlx_lm_server_lru_prompt_cache(benchmark, llama, reference):
    model, tokenizer = llama

    def run(work):
        lru = LRUPromptCache(max_size=1000, max_bytes=BUDGET)
        for agent, prompt in work.turns():
            start = time.perf_counter()
            cache, rest = lru.fetch_nearest_cache("model", prompt)
            cache = cache if cache is not None else make_prompt_cache(model)
            out, ttft = _mlx_turn(model, tokenizer, cache, rest, start)
            work.held(lru.nbytes + _nbytes(cache))
            lru.insert_cache("model", prompt + out, cache)  # stream_generate fed every token it yielded
            work.answered(agent, prompt, out, ttft)

    _run(benchmark, SEQUENTIAL, "mlx-lm server LRUPromptCache", run, reference)


def _blockpool_sequential(work, model, tokenizer, budget, cache_dir):
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=budget)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool), cache_dir=cache_dir)
    idle()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    for agent, prompt in work.turns():
        start = time.perf_counter()
        uid = memory.submit(agent, prompt, max_tokens=GENERATED)
        first = done = None
        for event in memory.stream():
            if event.uid == uid and event.token is not None:
                first = first or time.perf_counter()
            work.held(pool.stats().used_bytes)
            if event.completion is not None:
                done = event.completion
        work.answered(agent, prompt, done.token_ids, first - start)
    peak = mx.get_peak_memory() - base
    memory.close()
    return peak


def test_blockpool_from_pool(benchmark, llama, reference, allowance):
    model, tokenizer = llama
    peak = {}
    _run(
        benchmark,
        SEQUENTIAL,
        "blockpool (pool)",
        lambda work: peak.setdefault("mlx", _blockpool_sequential(work, model, tokenizer, BUDGET, None)),
        reference,
    )
    _record_peak(benchmark, peak["mlx"], BUDGET, allowance)


def test_blockpool_from_disk(benchmark, llama, reference, allowance, tmp_path):
    model, tokenizer = llama
    engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(ModelCacheSpec.from_model(model), num_blocks=256))
    final = SYSTEM + TURNS * (NEW + GENERATED)
    small = engine.request_bytes(final - NEW - GENERATED, NEW, GENERATED) * 2  # about two agents: the rest wait on disk
    peak = {}
    _run(
        benchmark,
        SEQUENTIAL,
        "blockpool (disk, pool for 2 agents)",
        lambda work: peak.setdefault("mlx", _blockpool_sequential(work, model, tokenizer, small, tmp_path)),
        reference,
    )
    _record_peak(benchmark, peak["mlx"], small, allowance)


# ------------------------------------------------------------------ all agents at once


def test_mlx_lm_server_pattern_all_at_once(benchmark, llama, reference):
    """What mlx_lm.server does with concurrent requests: caches from LRUPromptCache, one BatchGenerator batch."""
    model, tokenizer = llama
    stop = [[t] for t in sorted(tokenizer.eos_token_ids)]

    def run(work):
        lru = LRUPromptCache(max_size=1000, max_bytes=CONCURRENT_BUDGET)
        for prompts in work.rounds():
            start = time.perf_counter()
            generator = BatchGenerator(model, stop_tokens=stop)
            agents, caches, rests = list(prompts), [], []
            for agent in agents:
                cache, rest = lru.fetch_nearest_cache("model", prompts[agent])
                caches.append(cache if cache is not None else make_prompt_cache(model))
                rests.append(rest)
            uids = generator.insert(
                rests,
                max_tokens=[GENERATED] * len(agents),
                caches=caches,
                all_tokens=[prompts[a][: len(prompts[a]) - len(r)] for a, r in zip(agents, rests)],
            )
            by_uid = dict(zip(uids, agents))
            out = {a: [] for a in agents}
            first = {}
            while responses := generator.next_generated():
                for r in responses:
                    first.setdefault(by_uid[r.uid], time.perf_counter())
                    out[by_uid[r.uid]].append(r.token)
                    if r.finish_reason is not None:
                        lru.insert_cache("model", prompts[by_uid[r.uid]] + out[by_uid[r.uid]], r.prompt_cache)
                work.held(lru.nbytes + generator.prompt_cache_nbytes)
            generator.close()
            for agent in agents:
                work.answered(agent, prompts[agent], out[agent], first[agent] - start)

    _run(benchmark, CONCURRENT, "mlx-lm server pattern (LRUPromptCache + BatchGenerator)", run, reference)


def test_blockpool_all_at_once(benchmark, llama, reference, batched_allowance):
    model, tokenizer = llama
    peak = {}

    def run(work):
        pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=CONCURRENT_BUDGET)
        memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool))
        idle()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        for prompts in work.rounds():
            start = time.perf_counter()
            uids = {memory.submit(agent, prompt, max_tokens=GENERATED): agent for agent, prompt in prompts.items()}
            first, done = {}, {}
            for event in memory.stream():
                if event.token is not None:
                    first.setdefault(event.uid, time.perf_counter())
                work.held(pool.stats().used_bytes)
                if event.completion is not None:
                    done[event.uid] = event.completion
            for uid, agent in uids.items():
                work.answered(agent, prompts[agent], done[uid].token_ids, first[uid] - start)
        peak["mlx"] = mx.get_peak_memory() - base
        memory.close()

    _run(benchmark, CONCURRENT, "blockpool (all at once)", run, reference)
    _record_peak(benchmark, peak["mlx"], CONCURRENT_BUDGET, batched_allowance)
