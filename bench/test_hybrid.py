"""Hybrid-model benchmarks, on the tests' tiny Qwen3.5-like model (a gated delta net layer and a full-attention layer).

- Warm time to first token: an agent with 4,096 tokens of history returns with
  1 new token, against mlx-lm's ``stream_generate`` on a kept in-memory cache
  of the same history (copied each round: recurrent state cannot be trimmed
  back), in alternating rounds.
- Shared prefix: a second agent whose prompt shares the first one's 4,096-token
  prefix (served from the grid checkpoint at 4,096 and the shared blocks),
  against a cold prefill of the same prompt, in alternating rounds.
- Checkpoint bytes per 1,000 tokens, next to the K and V bytes, go to extra_info.
"""

from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache

from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from conftest import idle, tokens
from test_engine import _record_pair

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
from family_models import family_model, shared_tokenizer  # noqa: E402

HISTORY = 4096


@pytest.fixture(scope="module")
def hybrid():
    return family_model("qwen3_5"), shared_tokenizer()


def _kept_copy(caches: list) -> list:
    """A copy of a cache list sharing its arrays (arrays are values; the copy's updates do not reach them)."""
    out = []
    for cache in caches:
        fresh = copy.copy(cache)
        if hasattr(fresh, "cache"):
            fresh.cache = list(cache.cache)
        out.append(fresh)
    return out


def test_ttft_hybrid_warm_engine_vs_mlx_lm_kept_cache(benchmark, hybrid):
    model, tokenizer = hybrid
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=64 << 20)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool))
    history = tokens(HISTORY - 1, 1)
    memory.submit("a", history, max_tokens=1)
    (done,) = list(memory.step())
    full = history + done.token_ids
    kept = make_prompt_cache(model)
    model(mx.array([full]), cache=kept)
    mx.eval([c.state for c in kept if hasattr(c, "keys")] + [c.cache for c in kept if hasattr(c, "cache")])
    times: dict[str, list[float]] = {"engine": [], "mlx_lm": []}
    state = {"round": 0}

    def pair():
        new = tokens(1, 100 + state["round"])
        state["round"] += 1
        idle()
        start = time.perf_counter()
        memory.submit("a", full + new, max_tokens=2)
        events = memory.stream()
        next(e for e in events if e.token is not None)
        times["engine"].append(time.perf_counter() - start)
        for event in events:
            if event.completion:
                assert event.completion.cached_tokens == HISTORY  # resumed at its last token, nothing recomputed
        idle()
        caches = _kept_copy(kept)
        start = time.perf_counter()
        next(iter(stream_generate(model, tokenizer, new, max_tokens=1, prompt_cache=caches)))
        times["mlx_lm"].append(time.perf_counter() - start)
        idle()

    benchmark.group = f"hybrid TTFT, {HISTORY} cached + 1 new token"
    benchmark.pedantic(pair, rounds=30, warmup_rounds=3)
    _record_pair(benchmark, times, "engine", "mlx_lm")
    spec = pool.spec
    state_bytes = sum(spec.bytes_per_block(i) for i in spec.state_layers)
    every = memory.engine.checkpoint_blocks * spec.block_tokens
    benchmark.extra_info.update(
        checkpoint_blocks=memory.engine.checkpoint_blocks,
        checkpoint_bytes_per_1000_tokens=state_bytes * 1000 / every,
        kv_bytes_per_1000_tokens=sum(
            spec.bytes_per_block(i) * 1000 / spec.block_tokens
            for i in range(spec.num_layers)
            if spec.kind(i).storage == "tokens"
        ),
    )
    memory.close()


def test_ttft_hybrid_shared_prefix_vs_cold(benchmark, hybrid):
    model, tokenizer = hybrid
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=64 << 20)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool))
    prefix = tokens(HISTORY, 2)
    memory.submit("donor", prefix + tokens(20, 3), max_tokens=1)
    list(memory.step())
    times: dict[str, list[float]] = {"shared": [], "cold": []}
    state = {"round": 0}

    def pair():
        agent = f"sharer-{state['round']}"
        prompt = prefix + tokens(16, 200 + state["round"])
        state["round"] += 1
        idle()
        start = time.perf_counter()
        memory.submit(agent, prompt, max_tokens=2)
        events = memory.stream()
        next(e for e in events if e.token is not None)
        times["shared"].append(time.perf_counter() - start)
        for event in events:
            if event.completion:
                assert event.completion.cache_source == "shared" and event.completion.cached_tokens == HISTORY
        memory.forget(agent)
        idle()
        start = time.perf_counter()
        next(iter(stream_generate(model, tokenizer, prompt, max_tokens=1, prompt_cache=make_prompt_cache(model))))
        times["cold"].append(time.perf_counter() - start)

    benchmark.group = f"hybrid TTFT, {HISTORY}-token shared prefix + 16 new tokens"
    benchmark.pedantic(pair, rounds=6, warmup_rounds=1)
    _record_pair(benchmark, times, "shared", "cold", warm=1)
    memory.close()
