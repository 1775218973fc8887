"""Misuse of the engine, on the real engine and a real tiny model: stale and foreign
handles, leaving ``step()`` early, Ctrl-C inside the model, and two threads driving.

Each case ends with mlx-lm's exact output or a typed error, no block leaked, nothing
hung, and the engine usable afterwards.
"""

from __future__ import annotations

import copy
import threading

import mlx.core as mx
import pytest

from blockpool import (
    BlockPool,
    BlockPoolBatchEngine,
    EngineBusyError,
    GenerationError,
    InvalidRequestError,
    ModelCacheSpec,
)
from mlx_lm_reference import mlx_lm_tokens
from tiny_models import FailingModel

pytestmark = pytest.mark.integration


def tokens(n: int, seed: int) -> list[int]:
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()


@pytest.fixture
def llama(load_tiny):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=48)
    return model, tokenizer, pool, BlockPoolBatchEngine(model, tokenizer, pool)


def run(engine, *args, **kwargs):
    engine.submit(*args, **kwargs)
    (done,) = list(engine.step())
    return done


# ------------------------------------------------------------------ handles


def test_a_stale_handle_is_refused_and_the_live_cache_survives(llama):
    model, tokenizer, pool, engine = llama
    turn1, turn2, turn3 = tokens(40, 1), tokens(7, 2), tokens(5, 3)
    first = run(engine, "a", turn1, max_tokens=6)
    spare_copy = copy.copy(first.blocks)  # a user keeps a copy of the turn-1 handle
    second = run(engine, "a", turn2, cache=first.blocks, max_tokens=6)
    before = pool.stats()
    for stale in (first.blocks, spare_copy):
        with pytest.raises(InvalidRequestError, match="stale"):
            engine.submit("a", turn3, cache=stale, max_tokens=6)
    assert pool.stats() == before  # refused before anything changed
    third = run(engine, "a", turn3, cache=second.blocks, max_tokens=6)
    history = turn1 + first.token_ids + turn2 + second.token_ids + turn3
    assert third.token_ids == mlx_lm_tokens(model, tokenizer, history, 6)
    pool.release(third.blocks)
    pool.check_invariants()
    assert pool.stats().used_bytes == 0


def test_a_handle_from_another_pool_is_refused(llama):
    model, tokenizer, pool, engine = llama
    other_pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=48)
    other = BlockPoolBatchEngine(model, tokenizer, other_pool)
    foreign = run(other, "a", tokens(30, 4), max_tokens=4).blocks  # same layout, same agent id
    mine = run(engine, "a", tokens(30, 5), max_tokens=4).blocks
    with pytest.raises(InvalidRequestError, match="another pool"):
        engine.submit("a", tokens(5, 6), cache=foreign)
    again = run(engine, "a", tokens(5, 6), cache=mine, max_tokens=4)
    assert again.token_ids == mlx_lm_tokens(model, tokenizer, tokens(30, 5) + mine.token_ids[30:] + tokens(5, 6), 4)
    pool.release(again.blocks)
    other_pool.release(foreign)
    assert pool.stats().used_bytes == 0 and other_pool.stats().used_bytes == 0


# ------------------------------------------------------------------ leaving step() early


def test_breaking_out_of_step_loses_nothing(llama):
    model, tokenizer, pool, engine = llama
    prompts = {"short": tokens(12, 7), "long": tokens(20, 8)}
    engine.submit("short", prompts["short"], max_tokens=3)
    engine.submit("long", prompts["long"], max_tokens=24)
    first = next(engine.step())  # leave after the first completion, while "long" is mid-generation
    assert first.agent_id == "short"
    (rest,) = list(engine.step())
    assert rest.agent_id == "long"
    for done in (first, rest):
        assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompts[done.agent_id], done.generation_tokens)
        assert done.blocks.token_ids == prompts[done.agent_id] + done.token_ids  # the blocks hold what was returned
        pool.release(done.blocks)
    assert pool.stats().used_bytes == 0


def test_breaking_out_of_stream_after_one_token_resumes_exactly(llama):
    model, tokenizer, pool, engine = llama
    prompt = tokens(15, 9)
    engine.submit("a", prompt, max_tokens=10)
    engine.submit("b", tokens(9, 10), max_tokens=10)
    seen: dict[str, list[int]] = {"a": [], "b": []}
    ends = {}
    for _ in range(6):  # six separate loops, each left after one event
        for event in engine.stream():
            if event.token is not None:
                seen[event.agent_id].append(event.token)
            if event.completion:
                ends[event.agent_id] = event.completion
            break
    for event in engine.stream():
        if event.token is not None:
            seen[event.agent_id].append(event.token)
        if event.completion:
            ends[event.agent_id] = event.completion
    assert seen["a"] == ends["a"].token_ids == mlx_lm_tokens(model, tokenizer, prompt, 10)
    assert seen["b"] == ends["b"].token_ids
    for done in ends.values():
        pool.release(done.blocks)
    assert pool.stats().used_bytes == 0


# ------------------------------------------------------------------ interrupts and failures


@pytest.mark.parametrize("error", [KeyboardInterrupt(), SystemExit(3), MemoryError("simulated")], ids=type)
def test_an_interrupt_inside_the_model_fails_the_batch_and_leaves_the_engine_usable(load_tiny, error):
    model, tokenizer = load_tiny("llama")
    wrapped = FailingModel(model, error=error)
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=48)
    engine = BlockPoolBatchEngine(wrapped, tokenizer, pool)
    history = run(engine, "keep", tokens(30, 11), max_tokens=4)
    start = pool.stats()

    wrapped.armed = True  # the first step with both requests in the batch is interrupted
    engine.submit("keep", tokens(5, 12), cache=history.blocks, max_tokens=20)
    engine.submit("other", tokens(8, 13), max_tokens=20)
    if isinstance(error, Exception):
        done = list(engine.step())  # a model error becomes "error" completions
    else:
        with pytest.raises(type(error)):
            for _ in engine.step():
                pass
        done = list(engine.step())  # the failed requests are handed out on the next call
    assert {c.finish_reason for c in done} == {"error"} and len(done) == 2
    assert all(isinstance(c.error, GenerationError) for c in done)
    assert pool.stats() == start  # the working memory is back, the history intact
    kept = next(c for c in done if c.agent_id == "keep").blocks
    again = run(engine, "keep", tokens(6, 14), cache=kept, max_tokens=6)  # usable, and exact
    assert again.token_ids == mlx_lm_tokens(model, tokenizer, history.blocks.token_ids + tokens(6, 14), 6)
    pool.release(again.blocks)
    assert pool.stats().used_bytes == 0


def test_an_interrupt_during_prefill_fails_only_that_request(load_tiny):
    model, tokenizer = load_tiny("llama")
    wrapped = FailingModel(model, batch=1, error=KeyboardInterrupt())
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=48)
    engine = BlockPoolBatchEngine(wrapped, tokenizer, pool)
    wrapped.armed = True
    engine.submit("a", tokens(300, 15), max_tokens=4)
    with pytest.raises(KeyboardInterrupt):
        list(engine.step())
    (failed,) = list(engine.step())
    assert failed.finish_reason == "error" and pool.stats().used_bytes == 0
    done = run(engine, "a", tokens(300, 15), max_tokens=4)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, tokens(300, 15), 4)
    pool.release(done.blocks)


# ------------------------------------------------------------------ threads


def test_a_second_thread_driving_gets_a_typed_error_while_submits_still_work(llama):
    model, tokenizer, pool, engine = llama
    engine.submit("long", tokens(10, 16), max_tokens=60)
    results: dict[str, object] = {}
    started, release = threading.Event(), threading.Event()

    def intruder() -> None:
        started.wait()
        try:
            list(engine.step())
        except EngineBusyError as e:
            results["busy"] = e
        results["uid"] = engine.submit("late", tokens(8, 17), max_tokens=5)  # submitting is fine
        release.set()

    thread = threading.Thread(target=intruder)
    thread.start()
    done = {}
    for event in engine.stream():
        if not started.is_set():
            started.set()
            assert release.wait(60)  # the intruder tried, and submitted, while this thread drives
        if event.completion:
            done[event.completion.agent_id] = event.completion
    thread.join(60)
    assert isinstance(results["busy"], EngineBusyError)
    assert set(done) == {"long", "late"}
    assert done["late"].token_ids == mlx_lm_tokens(model, tokenizer, tokens(8, 17), 5)
    for c in done.values():
        pool.release(c.blocks)
    assert pool.stats().used_bytes == 0


def test_tick_from_the_driving_thread_and_step_after_it(llama):
    model, tokenizer, pool, engine = llama
    uid = engine.submit("a", tokens(20, 18), max_tokens=8)
    events = []
    while engine.in_flight:
        events += engine.tick()
    (done,) = [e.completion for e in events if e.completion]
    assert done.uid == uid and [e.token for e in events if e.token is not None] == done.token_ids
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, tokens(20, 18), 8)
    assert engine.tick() == [] and list(engine.step()) == []
    pool.release(done.blocks)
