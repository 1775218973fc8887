"""Paged attention (issue 20): what a running request holds, how many run at once, and its speed against mlx-lm.

On the tests' 4-layer llama (hidden 128, 2 KV heads of 32, float32: 2 KiB of KV
per token), written to disk and loaded with mlx_lm.load. Histories are made
once per module by the engine's own prefill (bit-exact with mlx-lm's), and
mlx-lm's kept caches are built from the same blocks (``to_mlx_caches``), so
both sides resume the same K and V.

- Memory per running request: the most the pool charges while a request of
  328 and of 16,385 tokens runs, over its KV bytes (target: at most 1.1x its
  KV plus one block of every layer).
- Peak memory of a resume: MLX's peak while an agent resumes 4,096 (and
  16,384) cached tokens and decodes 16, above what was active before, over
  the history's KV bytes (target: at most 0.25 plus the activations; the
  gate takes no activations off). mlx-lm's own figure on a kept cache is
  recorded beside it.
- Agents decoding at once: the most agents with 4,096-token histories that
  one 64 MiB budget runs at once, paged against gathered (target: at least
  1.8x).
- Decode time per token with 8 and 32 agents at 4,096 tokens each, against
  mlx-lm's ``BatchGenerator`` on contiguous caches, rounds alternating
  (target: at most 1.0x).
- Warm time to first token at 256, 1,024, 4,096 and 16,384 cached tokens + 1
  new token, against mlx-lm's ``stream_generate`` on a kept cache, rounds
  alternating (targets: at most 1.1x at 256, 1.05x beyond).
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import BatchGenerator, stream_generate
from mlx_lm.models.cache import trim_prompt_cache

from blockpool import (
    AgentBlocks,
    BlockPool,
    BlockPoolBatchEngine,
    ModelCacheSpec,
    PoolExhaustedError,
    from_mlx_caches,
    to_mlx_caches,
    truncate,
)
from conftest import idle, record_seconds, tokens
from pool_watch import most_charged

STEPS = 16  # tokens decoded per agent and round


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    from mlx_lm import load

    import tiny_models

    return load(str(tiny_models.write_model_dir(tmp_path_factory.mktemp("llama4"), "llama_4layer")))


def template(model4, history: int, memory_bytes: int = 256 << 20):
    """An engine over its own pool, and an agent holding ``history`` tokens made by its prefill."""
    model, tokenizer = model4
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=memory_bytes)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    engine.submit("template", tokens(history - 1, 1), max_tokens=1)
    (done,) = list(engine.step())
    assert done.blocks.total_tokens == history and engine.paged.paged
    return engine, pool, done.blocks


@pytest.fixture(scope="module")
def template_4k(model4):
    return template(model4, 4096)


@pytest.fixture(scope="module")
def template_16k(model4):
    return template(model4, 16384, memory_bytes=512 << 20)


def share_prefix(pool, handle: AgentBlocks, agent: str, length: int) -> AgentBlocks:
    """A new agent holding the first ``length`` tokens of ``handle`` (its full blocks, shared)."""
    b = handle.spec.block_tokens
    blocks = {layer: list(held[: -(-length // b)]) for layer, held in handle.blocks.items()}
    pool.share([blk for held in blocks.values() for blk in held], agent)
    return AgentBlocks(agent, handle.spec, blocks, length, list(handle.token_ids[:length]))


def kv_bytes(spec: ModelCacheSpec, n: int) -> int:
    """K and V of ``n`` tokens, as stored (no block rounding)."""
    return n * sum(layer.geometry.token_bytes() for layer in spec.layers)


def block_row_bytes(pool) -> int:
    """One block of every layer."""
    return sum(pool.bytes_per_block(i) for i in range(pool.spec.num_layers))


def alternating(*sides: Callable[[int], None]) -> Callable[[], None]:
    """One benchmark round: each side once (given the round's number), after waiting for MLX's streams,
    in an order flipped every round, so that neither contender always runs first."""
    rounds = itertools.count()

    def one_round() -> None:
        r = next(rounds)
        for side in sides if r % 2 == 0 else reversed(sides):
            idle()
            side(r)

    return one_round


# ------------------------------------------------------------------ memory


def test_memory_per_running_request_328(benchmark, model4):
    """A cold 327-token prompt and one generated token: 328 tokens, in a pool of its own."""
    model, tokenizer = model4
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=64 << 20)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    results = {}

    def run():
        charged, done = most_charged(engine, pool, lambda: engine.submit("a", tokens(327, 5), max_tokens=1))
        results["charged"], results["total"] = charged, done.blocks.total_tokens
        pool.release(done.blocks)

    benchmark.group = "paged: memory per running request"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    _record_memory(benchmark, pool, results["charged"], results["total"])


def test_memory_per_running_request_16385(benchmark, template_16k):
    """The 16,384-token agent resumed with one new token: what the running request adds to its blocks."""
    engine, pool, handle = template_16k
    results = {}
    state = {"handle": handle}

    def run():
        # Everything the request holds is charged while it runs: its blocks (held before) and new ones.
        blocks_before = sum(pool.bytes_per_block(b.layer_id) for b in state["handle"].all_blocks())
        charged, done = most_charged(
            engine, pool, lambda: engine.submit("template", [7], cache=state["handle"], max_tokens=1)
        )
        results["charged"], results["total"] = charged + blocks_before, done.blocks.total_tokens
        state["handle"] = truncate(pool, done.blocks, 16384)  # back to the template for the next round

    benchmark.group = "paged: memory per running request"
    benchmark.pedantic(run, rounds=2, warmup_rounds=0)
    _record_memory(benchmark, pool, results["charged"], results["total"])


def _record_memory(benchmark, pool, charged: int, total: int) -> None:
    kv = kv_bytes(pool.spec, total)
    allowed = 1.1 * kv + block_row_bytes(pool)
    benchmark.extra_info.update(
        charged_bytes=charged,
        kv_bytes=kv,
        charged_over_kv=charged / kv,
        charged_over_allowed=charged / allowed,
    )


def test_peak_memory_of_a_resume_4096(benchmark, template_4k, model4):
    _peak_of_resume(benchmark, template_4k, model4, 4096)


def test_peak_memory_of_a_resume_16384(benchmark, template_16k, model4):
    _peak_of_resume(benchmark, template_16k, model4, 16384)


def _peak_of_resume(benchmark, fixture, model4, history: int) -> None:
    engine, pool, handle = fixture
    model, tokenizer = model4
    no_eos = {"logits_processors": [lambda _, logits: _no_eos(logits)]}
    results: dict[str, list[float]] = {"rise": [], "activations": []}
    state = {"round": 0}

    def run():
        agent = f"peak-{state['round']}"
        state["round"] += 1
        resumed = share_prefix(pool, handle, agent, history)
        idle()
        mx.reset_peak_memory()
        active = mx.get_active_memory()
        engine.submit(agent, [11], cache=resumed, max_tokens=STEPS, **no_eos)
        (done,) = list(engine.step())
        idle()
        results["rise"].append(mx.get_peak_memory() - active)
        assert len(done.token_ids) == STEPS
        pool.release(done.blocks)
        # mlx-lm's own decode of the same, on a kept cache with room for it: its peak rise, for reference.
        cache = to_mlx_caches(pool, handle, spare_tokens=STEPS + 1)
        idle()
        mx.reset_peak_memory()
        active = mx.get_active_memory()
        for _ in stream_generate(model, tokenizer, [11], max_tokens=STEPS, prompt_cache=cache, **no_eos):
            pass
        idle()
        results["activations"].append(mx.get_peak_memory() - active)
        del cache

    benchmark.group = f"paged: peak memory of a resume, {history} cached + {STEPS} decoded"
    benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    kv = kv_bytes(pool.spec, history)
    rise, mlx_lm = float(np.median(results["rise"])), float(np.median(results["activations"]))
    benchmark.extra_info.update(
        history_kv_bytes=kv,
        peak_rise_bytes=rise,
        mlx_lm_peak_rise_bytes=mlx_lm,  # for reference: mlx-lm's own, on a kept cache with room
        peak_rise_over_kv=rise / kv,  # everything above what was active: activations are not taken off
        mlx_lm_peak_rise_over_kv=mlx_lm / kv,
    )


def _no_eos(logits: mx.array) -> mx.array:
    return logits.at[..., 0].add(-1e9)  # token 0 is the tiny EOS: every request runs its full length


# ------------------------------------------------------------------ agents decoding at once


def test_agents_decoding_at_once_in_a_budget(benchmark, template_4k, model4):
    """The most agents with 4,096-token histories (each in blocks of its own, none spilled: the engine
    alone) that one 64 MiB budget runs at once, paged and gathered: K agents are submitted together,
    each with one new token and 16 to decode, and K grows while all K decode at once."""
    _, pool4k, handle = template_4k
    model, tokenizer = model4
    caches = to_mlx_caches(pool4k, handle)
    spec, budget = pool4k.spec, 64 << 20
    counts: dict[str, int] = {}

    def all_at_once(paged: bool, agents: int) -> bool:
        pool = BlockPool(spec, memory_bytes=budget)
        engine = BlockPoolBatchEngine(model, tokenizer, pool, paged=paged, max_waiting=None)
        handles = []
        try:  # each agent's own copy of the history, in blocks of its own
            for i in range(agents):
                handles.append(from_mlx_caches(pool, caches, handle.token_ids, AgentBlocks.empty(f"a{i}", spec)))
        except PoolExhaustedError:
            return False  # their histories alone do not fit
        for i, h in enumerate(handles):
            engine.submit(f"a{i}", [13 + i], cache=h, max_tokens=STEPS)
        most, done = 0, []
        while engine.in_flight:
            for event in engine.tick():
                if event.completion is not None:
                    done.append(event.completion)
            most = max(most, len(engine._stepper.batch))
        for c in done:
            if c.blocks is not None:
                pool.release(c.blocks)
        return most == agents and all(c.finish_reason in ("stop", "length") for c in done)

    def run():
        for mode, paged in (("paged", True), ("gathered", False)):
            agents = 1
            while all_at_once(paged, agents + 1):
                agents += 1
            counts[mode] = agents

    benchmark.group = "paged: agents decoding at once in a budget"
    benchmark.pedantic(run, rounds=1, warmup_rounds=0)
    benchmark.extra_info.update(
        budget_bytes=budget,
        history_kv_bytes=kv_bytes(spec, 4096),
        paged_at_once=counts["paged"],
        gathered_at_once=counts["gathered"],
        paged_over_gathered=counts["paged"] / counts["gathered"],
    )


# ------------------------------------------------------------------ speed


@pytest.mark.parametrize("agents", [8, 32], ids=lambda n: f"agents{n}")
def test_decode_per_token_vs_batch_generator(benchmark, template_4k, model4, agents):
    """Rounds alternate: ``agents`` agents resuming the 4,096-token history with one new token each and
    decoding 16, through the engine (paged, the history's blocks shared) and through mlx-lm's
    BatchGenerator (a contiguous copy of the history per agent). Timed: from each side's second token
    to its last, per step (both sides pay their admission before that)."""
    engine, pool, handle = template_4k
    model, tokenizer = model4
    kept = to_mlx_caches(pool, handle)
    mx.eval([c.state for c in kept])
    times: dict[str, list[float]] = {"engine": [], "batch_generator": []}
    outputs: dict[str, list[list[int]]] = {}
    no_eos = [lambda _, logits: _no_eos(logits)]

    def engine_side(r: int) -> None:
        uids = []
        for i in range(agents):
            agent = f"d{r}-{i}"
            uids.append(engine.submit(agent, [20 + i], cache=share_prefix(pool, handle, agent, 4096),
                                      max_tokens=STEPS, logits_processors=no_eos))  # fmt: skip
        stamps, got = [], {u: [] for u in uids}
        for event in engine.stream():
            if event.token is not None:
                got[event.uid].append(event.token)
                if all(len(t) >= 2 for t in got.values()) and not stamps:
                    stamps.append(time.perf_counter())
            if event.completion is not None:
                pool.release(event.completion.blocks)
        stamps.append(time.perf_counter())
        times["engine"].append((stamps[-1] - stamps[0]) / (STEPS - 2))
        outputs["engine"] = [got[u] for u in uids]

    def generator_side(_: int) -> None:
        generator = BatchGenerator(model, stop_tokens=[[0]], logits_processors=no_eos)
        caches = [copy.deepcopy(kept) for _ in range(agents)]
        uids = generator.insert([[20 + i] for i in range(agents)], max_tokens=[STEPS] * agents, caches=caches)
        del caches
        got: dict[int, list[int]] = {u: [] for u in uids}
        stamps = []
        while responses := generator.next_generated():
            for r in responses:
                got[r.uid].append(r.token)
            if all(len(t) >= 2 for t in got.values()) and not stamps:
                stamps.append(time.perf_counter())
        stamps.append(time.perf_counter())
        generator.close()
        times["batch_generator"].append((stamps[-1] - stamps[0]) / (STEPS - 2))
        outputs["batch_generator"] = [got[u] for u in uids]

    benchmark.group = f"paged: decode per token, {agents} agents x 4096 tokens"
    benchmark.pedantic(alternating(engine_side, generator_side), rounds=6 if agents == 8 else 4, warmup_rounds=1)
    assert outputs["engine"] == outputs["batch_generator"]  # the same work, token for token
    _record_pair(benchmark, times, "engine", "batch_generator", warm=1)


@pytest.mark.parametrize("history", [256, 1024, 4096, 16384])
def test_warm_ttft_vs_mlx_lm_kept_cache(benchmark, request, model4, history):
    """Rounds alternate: a new agent resuming ``history`` cached tokens (shared blocks) with one new
    token through the engine, and mlx-lm's stream_generate with the same one token on a kept cache of
    the same K and V (trimmed back after each round), each timed to its first token."""
    engine, pool, handle = request.getfixturevalue("template_16k" if history > 4096 else "template_4k")
    model, tokenizer = model4
    cache = to_mlx_caches(pool, share_prefix(pool, handle, "ttft-kept", history), spare_tokens=2)
    times: dict[str, list[float]] = {"engine": [], "mlx_lm": []}

    def engine_side(r: int) -> None:
        agent = f"ttft-{history}-{r}"
        resumed = share_prefix(pool, handle, agent, history)
        idle()
        start = time.perf_counter()
        engine.submit(agent, [9], cache=resumed, max_tokens=2)
        events = engine.stream()
        next(e for e in events if e.token is not None)
        times["engine"].append(time.perf_counter() - start)
        for event in events:
            if event.completion:
                pool.release(event.completion.blocks)

    def mlx_lm_side(_: int) -> None:
        idle()
        start = time.perf_counter()
        next(iter(stream_generate(model, tokenizer, [9], max_tokens=1, prompt_cache=cache)))
        times["mlx_lm"].append(time.perf_counter() - start)
        trim_prompt_cache(cache, cache[0].offset - history)

    benchmark.group = f"paged: warm TTFT, {history} cached + 1 new token"
    benchmark.pedantic(alternating(engine_side, mlx_lm_side), rounds=40, warmup_rounds=5)
    pool.free([b for b in share_prefix_blocks(handle, history)], "ttft-kept")
    _record_pair(benchmark, times, "engine", "mlx_lm", warm=5)


def share_prefix_blocks(handle: AgentBlocks, length: int) -> list:
    b = handle.spec.block_tokens
    return [blk for held in handle.blocks.values() for blk in held[: -(-length // b)]]


def _record_pair(benchmark, times, ours: str, theirs: str, warm: int) -> None:
    stats = {name: np.array(values[warm:]) * 1e3 for name, values in times.items()}
    for name, ms in stats.items():
        benchmark.extra_info[f"{name}_median_ms"] = float(np.median(ms))
        benchmark.extra_info[f"{name}_p95_ms"] = float(np.percentile(ms, 95))
    benchmark.extra_info["ratio"] = float(np.median(stats[ours]) / np.median(stats[theirs]))
    record_seconds(benchmark)
