"""BlockPoolBatchEngine behaviour beyond equivalence: validation, stops, streaming,
cancellation, continuous batching, failures and leaks."""

from __future__ import annotations

import random
import threading

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from blockpool import (
    AgentBlocks,
    BlockPool,
    BlockPoolBatchEngine,
    GenerationError,
    IncompatibleCacheError,
    InvalidRequestError,
    ModelCacheSpec,
    PoolExhaustedError,
)
from mlx_lm_reference import mlx_lm_text, mlx_lm_tokens
from tiny_models import FailingModel

pytestmark = pytest.mark.integration


@pytest.fixture
def llama(load_tiny):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=40)
    return model, tokenizer, pool, BlockPoolBatchEngine(model, tokenizer, pool)


def tokens(n: int, seed: int) -> list[int]:
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()


def finish(engine):
    return {c.uid: c for c in engine.step()}


# ------------------------------------------------------------------ the wait queue's bound


def test_the_wait_queue_is_bounded_by_default_from_the_pool(llama):
    """Twice the requests the pool could hold at once at one block per layer each; None lifts it."""
    model, tokenizer, pool, engine = llama
    bound = 2 * (pool.total_blocks // pool.spec.num_layers)
    assert engine.max_waiting == bound == 40
    uids = [engine.submit(f"q{i}", tokens(4, i), max_tokens=2) for i in range(bound)]
    before = pool.stats()
    with pytest.raises(PoolExhaustedError, match="max_waiting=40"):
        engine.submit("one-too-many", tokens(4, 99), max_tokens=2)
    assert pool.stats() == before and engine.waiting == bound  # refused: nothing changed
    assert set(finish(engine)) == set(uids)
    unbounded = BlockPoolBatchEngine(model, tokenizer, pool, max_waiting=None)
    more = [unbounded.submit(f"u{i}", tokens(4, i), max_tokens=1) for i in range(bound + 5)]
    assert set(finish(unbounded)) == set(more)
    assert pool.stats().used_blocks == pool.total_blocks - pool.available_blocks()
    with pytest.raises(InvalidRequestError, match="max_waiting"):
        BlockPoolBatchEngine(model, tokenizer, pool, max_waiting=-1)


# ------------------------------------------------------------------ validation


def test_bad_requests_change_nothing(llama, load_tiny):
    model, tokenizer, pool, engine = llama
    engine.submit("busy", tokens(10, 1), max_tokens=4)
    (done,) = finish(engine).values()
    engine.submit("busy", tokens(10, 2), max_tokens=4)  # now in flight
    start = pool.available_blocks()
    bad = [
        (dict(agent_id="a", prompt=""), "Prompt cannot be empty"),
        (dict(agent_id="a", prompt=[]), "Prompt cannot be empty"),
        (dict(agent_id="a", prompt="hi", max_tokens=0), "max_tokens"),
        (dict(agent_id="a", prompt="hi", max_tokens=-3), "max_tokens"),
        (dict(agent_id="a", prompt="hi", max_tokens=2.5), "max_tokens"),
        (dict(agent_id="", prompt="hi"), "agent_id"),
        (dict(agent_id=None, prompt="hi"), "agent_id"),
        (dict(agent_id=7, prompt="hi"), "agent_id"),
        (dict(agent_id="a", prompt="hi", cache=done.blocks), "belongs to agent"),
        (dict(agent_id="busy", prompt="hi"), "already has a generation in flight"),
        (dict(agent_id="a", prompt=[1, -2]), "token ids"),
        (dict(agent_id="a", prompt=[1, 10**6]), "token ids"),
        (dict(agent_id="a", prompt=3.5), "prompt must be"),
        (dict(agent_id="a", prompt=b"hi"), "bytes"),
        (dict(agent_id="a", prompt="a\ud800b"), "surrogate"),
        (dict(agent_id="a", prompt="hi", stop="END", max_tokens=True), "max_tokens"),
        (dict(agent_id="a", prompt="hi", keep_tokens=3), "keep_tokens"),
        (dict(agent_id="a", prompt="hi", sampler="greedy"), "sampler"),
        (dict(agent_id="a", prompt="hi", logits_processors=[1]), "logits_processors"),
        (dict(agent_id="a", prompt="hi", stop=[""]), "stop"),
    ]
    for kwargs, message in bad:
        with pytest.raises(InvalidRequestError, match=message):
            engine.submit(**kwargs)
        assert pool.available_blocks() == start, kwargs
    for c in finish(engine).values():
        pool.release(c.blocks)

    pool.release(done.blocks)  # a stale handle: a newer one was issued since, and its blocks are gone
    with pytest.raises(InvalidRequestError, match="stale"):
        engine.submit(done.agent_id, "hi", cache=done.blocks)
    by_hand = AgentBlocks(
        done.agent_id, done.blocks.spec, done.blocks.blocks, done.blocks.total_tokens, done.blocks.token_ids
    )
    with pytest.raises(InvalidRequestError, match="no longer held"):
        engine.submit(done.agent_id, "hi", cache=by_hand)

    gemma_model, _ = load_tiny("gemma3_text")
    foreign = AgentBlocks.empty("a", ModelCacheSpec.from_model(gemma_model))
    with pytest.raises(IncompatibleCacheError):
        engine.submit("a", "hi", cache=foreign)
    with pytest.raises(IncompatibleCacheError):
        BlockPoolBatchEngine(gemma_model, tokenizer, pool)
    assert pool.available_blocks() == pool.total_blocks


def test_exhaustion_is_raised_at_submit_before_compute(llama):
    _, _, pool, engine = llama
    with pytest.raises(PoolExhaustedError):
        engine.submit("big", tokens(10, 3), max_tokens=256 * 20)  # 21 blocks x 2 layers > 40
    assert pool.available_blocks() == 40 and engine.in_flight == 0


# ------------------------------------------------------------------ stopping


def test_stop_string_cuts_text_and_streams_nothing_past_it(llama):
    model, tokenizer, pool, engine = llama
    prompt = tokenizer.encode("the agent reads a file")
    engine.submit("a", prompt, max_tokens=40)
    (free_run,) = finish(engine).values()
    pool.release(free_run.blocks)
    stop = free_run.text[12:15]
    assert len(stop) == 3 and stop in free_run.text
    expected = free_run.text[: free_run.text.index(stop)]

    engine.submit("a", prompt, max_tokens=40, stop=[stop, "never-produced"])
    deltas, completion = [], None
    for event in engine.stream():
        deltas.append(event.text)
        completion = event.completion or completion
    assert completion.finish_reason == "stop"
    assert completion.text == expected == "".join(deltas)
    assert len(completion.token_ids) < len(free_run.token_ids)
    assert completion.blocks.total_tokens == len(prompt) + len(completion.token_ids)
    pool.release(completion.blocks)
    assert pool.available_blocks() == 40


def test_eos_ends_with_stop_and_is_not_in_the_text(llama):
    model, tokenizer, pool, engine = llama
    eos = min(tokenizer.eos_token_ids)

    def force_eos_at_4th(context, logits):
        # context holds the prompt and the tokens generated so far
        boost = mx.where(mx.arange(logits.shape[-1]) == eos, 1e9, 0.0)
        return logits + boost if context.size >= prompt_len + 3 else logits

    prompt = tokens(12, 4)
    prompt_len = len(prompt)
    engine.submit("a", prompt, max_tokens=30, logits_processors=[force_eos_at_4th])
    (done,) = finish(engine).values()
    assert done.finish_reason == "stop" and done.token_ids[-1] == eos and len(done.token_ids) == 4
    assert done.text == mlx_lm_text(tokenizer, done.token_ids[:-1])
    pool.release(done.blocks)


def test_logits_processors_and_samplers_come_from_mlx_lm(llama):
    model, tokenizer, pool, engine = llama
    prompt = tokens(30, 5)
    penalty = make_logits_processors(repetition_penalty=1.5, repetition_context_size=20)
    engine.submit("a", prompt, max_tokens=20, logits_processors=penalty)
    (done,) = finish(engine).values()
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 20, logits_processors=penalty)
    pool.release(done.blocks)

    runs = []
    for _ in range(2):
        mx.random.seed(7)
        engine.submit("a", prompt, max_tokens=20, sampler=make_sampler(temp=1.0))
        (done,) = finish(engine).values()
        runs.append(done.token_ids)
        pool.release(done.blocks)
    assert runs[0] == runs[1]  # seeded sampling is reproducible
    assert runs[0] != mlx_lm_tokens(model, tokenizer, prompt, 20)  # and is not greedy


# ------------------------------------------------------------------ streaming and cancel


def test_stream_yields_tokens_then_one_completion_per_request(llama):
    _, _, pool, engine = llama
    uids = [engine.submit(f"a{i}", tokens(10 + 20 * i, 6 + i), max_tokens=6) for i in range(3)]
    seen = {u: [] for u in uids}
    ends = {}
    for event in engine.stream():
        seen[event.uid].append(event.token)
        if event.completion:
            ends[event.uid] = event.completion
    for uid in uids:
        assert seen[uid] == ends[uid].token_ids
        pool.release(ends[uid].blocks)


def test_a_cancel_during_a_long_prefill_takes_effect_before_the_next_chunk(load_tiny):
    """A cancel from another thread while a prompt prefills stops it at the end of the chunk that
    is running: no further chunk runs, and the pool gets everything back."""
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=40)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, prefill_step_size=64)
    progress: list[int] = []
    uid = None

    def on_progress(done: int, total: int) -> None:
        progress.append(done)
        if done == 64:  # the first chunk is in: cancel as another thread would
            threading.Thread(target=engine.cancel, args=(uid,)).start()
            threading.Event().wait(0.05)  # the other thread's cancel lands while this chunk ends

    uid = engine.submit("a", tokens(1000, 30), max_tokens=4, prompt_progress_callback=on_progress)
    (done,) = list(engine.step())
    assert done.finish_reason == "cancelled" and done.blocks.total_tokens == 0  # a cold request: no history
    assert progress == [0, 64]  # 15 more chunks were due; none ran
    assert pool.available_blocks() == 40


def test_cancel_pending_and_running_requests(llama):
    _, _, pool, engine = llama
    engine.submit("a", tokens(20, 8), max_tokens=6)
    (first,) = finish(engine).values()
    held = pool.used_blocks()

    pending = engine.submit("a", tokens(5, 9), cache=first.blocks, max_tokens=50)
    assert engine.cancel(pending)
    (cancelled,) = finish(engine).values()
    # The history comes back as a fresh handle to the same blocks; the submitted one is consumed.
    assert cancelled.finish_reason == "cancelled" and cancelled.blocks.blocks == first.blocks.blocks
    assert cancelled.blocks.token_ids == first.blocks.token_ids and first.blocks.consumed
    assert pool.used_blocks() == held

    running = engine.submit("a", tokens(5, 9), cache=cancelled.blocks, max_tokens=50)
    other = engine.submit("b", tokens(9, 10), max_tokens=50)
    results = {}
    for event in engine.stream():
        if event.uid == running and event.token is not None and not results:
            results["cancel"] = engine.cancel(running)
            results["again"] = engine.cancel(other, free_blocks=True)
        if event.completion:
            results[event.uid] = event.completion
    assert results["cancel"] and results["again"]
    assert results[running].finish_reason == "cancelled" and results[running].blocks.blocks == first.blocks.blocks
    assert results[other].finish_reason == "cancelled" and results[other].blocks is None
    assert pool.used_blocks() == held
    assert not engine.cancel(running)  # already over
    pool.release(results[running].blocks)
    assert pool.available_blocks() == 40


def test_requests_from_another_thread_join_the_running_batch(llama):
    _, _, pool, engine = llama
    long_uid = engine.submit("long", tokens(10, 11), max_tokens=120)
    order = []
    submitted = threading.Event()

    def late_submit():
        order.append(("short-submitted", engine.submit("short", tokens(8, 12), max_tokens=5)))
        submitted.set()

    thread = threading.Thread(target=late_submit)
    long_tokens = 0
    for event in engine.stream():
        if event.uid == long_uid and event.token is not None:
            long_tokens += 1
            if long_tokens == 1:
                thread.start()  # submits while this loop keeps decoding
            elif long_tokens == 20:
                assert submitted.wait(10)  # by now it has (the lock is never held for long)
        if event.completion:
            order.append((event.completion.agent_id, event.completion))
    thread.join()
    names = [name for name, _ in order]
    assert submitted.is_set() and names == ["short-submitted", "short", "long"]
    for _, completion in order[1:]:
        pool.release(completion.blocks)


# ------------------------------------------------------------------ failure and leaks


def test_model_failure_returns_blocks_and_engine_recovers(load_tiny):
    model, tokenizer = load_tiny("llama")
    wrapped = FailingModel(model)
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=40)
    engine = BlockPoolBatchEngine(wrapped, tokenizer, pool)
    engine.submit("keep", tokens(30, 13), max_tokens=4)
    (history,) = finish(engine).values()
    start = pool.available_blocks()

    wrapped.armed = True  # the first decode step with both requests in the batch fails
    engine.submit("keep", tokens(5, 14), cache=history.blocks, max_tokens=30)
    engine.submit("other", tokens(12, 15), max_tokens=30)
    done = list(engine.step())
    assert {c.finish_reason for c in done} == {"error"}
    for c in done:
        assert isinstance(c.error, GenerationError) and "simulated device failure" in str(c.error)
    assert pool.available_blocks() == start  # working memory returned; history intact
    kept = next(c for c in done if c.agent_id == "keep").blocks
    assert kept.blocks == history.blocks.blocks and pool.holds("keep", kept.all_blocks())

    prompt = tokens(9, 16)  # the engine is usable again
    engine.submit("keep", prompt, cache=kept, max_tokens=8)
    (again,) = finish(engine).values()
    full = history.blocks.token_ids + prompt
    assert again.finish_reason in ("stop", "length")
    assert again.token_ids == mlx_lm_tokens(model, tokenizer, full, 8)
    pool.release(again.blocks)
    assert pool.available_blocks() == 40


def test_fifty_random_sequences_leak_nothing(llama):
    _, _, pool, engine = llama
    rng = random.Random(0)
    start = pool.available_blocks()
    caches: dict[str, AgentBlocks] = {}
    refused = 0
    for step in range(50):
        uids = []
        for agent in rng.sample(["a", "b", "c", "d"], rng.randint(1, 3)):
            cache = caches.pop(agent, None)
            max_tokens = 100_000 if rng.random() < 0.15 else rng.randint(1, 12)  # 100,000 can never fit in 40 blocks
            try:
                uids.append(engine.submit(agent, tokens(rng.randint(1, 60), step), cache=cache, max_tokens=max_tokens))
            except PoolExhaustedError:
                refused += 1
                if cache is not None:
                    caches[agent] = cache  # a refused submit changes nothing: the handle stays the agent's
        if uids and rng.random() < 0.3:
            engine.cancel(rng.choice(uids), free_blocks=rng.random() < 0.5)
        for done in engine.step():
            if done.blocks is None:
                continue
            if rng.random() < 0.4:
                pool.release(done.blocks)
            else:
                caches[done.agent_id] = done.blocks
        pool.check_invariants()
    for blocks in caches.values():
        pool.release(blocks)
    assert refused > 0  # the refusal path ran
    assert pool.available_blocks() == start


def test_the_first_token_is_handed_out_before_the_next_pass_runs(load_tiny):
    """A decode step launches the next forward pass before it reads the current tokens; a request's
    first token is read as soon as its pass is done instead, so its time to first token holds one
    forward pass, not two. The token is shown once, and its K/V reaches the blocks all the same."""
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=40)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    passes = []
    original = type(model).__call__

    class Counting(type(model)):
        def __call__(self, *args, **kwargs):
            passes.append(args[0].shape)
            return original(self, *args, **kwargs)

    model.__class__ = Counting
    try:
        prompt = tokens(40, 31)
        engine.submit("a", prompt, max_tokens=6)
        events = engine.stream()
        first = next(e for e in events if e.token is not None)
        assert len(passes) == 2  # the prompt's chunk, then its last token: no pass for the second token yet
        rest = [e for e in events if e.token is not None or e.completion]
    finally:
        model.__class__ = type(model).__mro__[1]
    done = rest[-1].completion
    shown = [first.token] + [e.token for e in rest if e.token is not None]
    assert shown == done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 6)  # each token once, exact
    assert done.blocks.total_tokens == len(prompt) + 6  # the last one's K/V is in the blocks too
    pool.release(done.blocks)
