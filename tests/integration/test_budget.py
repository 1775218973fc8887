"""The budget bounds all KV (issue 11): requests wait for room, the youngest is preempted
when decoding runs out of it, and MLX's own peak memory stays under the budget plus the
model's activations.

Every output is compared with a cold mlx-lm run of the same history.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors

from blockpool import (
    AgentMemory,
    BlockPool,
    BlockPoolBatchEngine,
    ModelCacheSpec,
    PoolExhaustedError,
)
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration

NO_EOS = make_logits_processors(logit_bias={0: -1e9})  # token 0 is EOS: every request runs its full length


def tokens(n: int, seed: int) -> list[int]:
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()


def sized_engine(model, tokenizer, budget_of, **engine_args):
    """An engine whose pool's budget is ``budget_of(sizing_engine)`` bytes."""
    spec = ModelCacheSpec.from_model(model)
    sizing = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, num_blocks=256))
    pool = BlockPool(spec, memory_bytes=budget_of(sizing))
    return pool, BlockPoolBatchEngine(model, tokenizer, pool, **engine_args)


def activation_allowance(model, tokenizer, history: list[int], prompt: list[int], max_tokens: int) -> int:
    """MLX peak memory of mlx-lm itself resuming ``history`` (a kept prompt cache) with ``prompt``,
    minus its KV cache: the activations any engine pays on top of its KV for such a turn."""
    cache = make_prompt_cache(model)
    for _ in stream_generate(model, tokenizer, history, max_tokens=1, prompt_cache=cache):
        pass
    mx.synchronize()
    mx.reset_peak_memory()
    base = mx.get_active_memory() - sum(c.nbytes for c in cache)
    for _ in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=cache):
        pass
    mx.synchronize()
    return max(0, mx.get_peak_memory() - base - sum(c.nbytes for c in cache))


def test_more_agents_than_fit_all_complete_exactly_and_within_the_budget(load_tiny, tmp_path):
    """Eight agents with 1,400-token histories, submitted at once, into a budget for about three."""
    model, tokenizer = load_tiny("llama_hd64")  # 2 KiB of KV per token
    histories = {f"agent-{i}": tokens(1400 + 3 * i, 100 + i) for i in range(8)}
    step = 512
    pool, engine = sized_engine(model, tokenizer, lambda e: 3 * e.request_bytes(0, 1410, 12), prefill_step_size=step)
    memory = AgentMemory(engine, cache_dir=tmp_path)

    for agent, history in histories.items():  # first turn: every history is prefilled, then spilled
        memory.submit(agent, history, max_tokens=4)
    first = {c.agent_id: c for c in memory.step()}

    follow = {
        agent: history + first[agent].token_ids + tokens(9, 200 + i)
        for i, (agent, history) in enumerate(histories.items())
    }
    longest = max(histories, key=lambda a: len(follow[a]))
    allowance = activation_allowance(
        model, tokenizer, histories[longest] + first[longest].token_ids, tokens(9, 999), 12
    )
    mx.synchronize()
    mx.reset_peak_memory()
    start = mx.get_active_memory() - pool.stats().used_bytes  # what is held besides the budget (weights...)
    uids = {memory.submit(agent, prompt, max_tokens=12): agent for agent, prompt in follow.items()}  # all at once
    done = {c.agent_id: c for c in memory.step()}
    peak = mx.get_peak_memory() - start

    assert set(done) == set(histories) and all(c.finish_reason in ("stop", "length") for c in done.values())
    for agent, prompt in follow.items():
        assert done[agent].token_ids == mlx_lm_tokens(model, tokenizer, prompt, 12), agent
        assert done[agent].cache_source in ("pool", "disk") and done[agent].cached_tokens >= 1400
    assert any(c.queued_seconds > 0 for c in done.values())  # more than fit: some waited
    # The bound: the budget (5% slack for rounding) plus the activations mlx-lm itself needs.
    assert peak <= 1.05 * pool.total_bytes + allowance, (peak, pool.total_bytes, allowance)
    assert len(uids) == 8
    memory.close()
    assert pool.stats().used_bytes == 0


def test_requests_wait_their_turn_first_in_first_out(load_tiny):
    model, tokenizer = load_tiny("llama")
    pool, engine = sized_engine(model, tokenizer, lambda e: e.request_bytes(0, 20, 40))  # one at a time
    prompts = [tokens(20, 300 + i) for i in range(4)]
    uids = [engine.submit(f"a{i}", p, max_tokens=40, logits_processors=NO_EOS) for i, p in enumerate(prompts)]
    assert engine.waiting == 4 and engine.request_state(uids[3]).state == "waiting"
    done = []
    for c in engine.step():  # the caller frees each agent's blocks as it gets them
        done.append(c)
        pool.release(c.blocks)
    assert [c.uid for c in done] == uids  # admitted, and so finished, in submission order
    for c, prompt in zip(done, prompts):
        assert c.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 40, logits_processors=NO_EOS)
    assert pool.stats().used_bytes == 0 and engine.request_state(uids[0]) is None


def test_a_request_that_could_never_fit_is_refused_at_submit(load_tiny):
    model, tokenizer = load_tiny("llama")
    pool, engine = sized_engine(model, tokenizer, lambda e: e.request_bytes(0, 20, 40))
    before = pool.stats()
    assert engine.fits_ever(0, 20, 40) and not engine.fits_ever(0, 20, 2000)
    with pytest.raises(PoolExhaustedError, match="whole budget"):
        engine.submit("big", tokens(20, 1), max_tokens=2000)
    assert pool.stats() == before and engine.in_flight == 0


def test_decode_growth_preempts_the_youngest_and_it_resumes_exactly(load_tiny):
    model, tokenizer = load_tiny("llama")
    # Room for either alone to its end, for both while short, not for both at full length:
    # a step boundary forces a choice.
    pool, engine = sized_engine(model, tokenizer, lambda e: e.request_bytes(0, 24, 600))
    prompts = {"old": tokens(20, 21), "young": tokens(24, 22)}
    for agent, prompt in prompts.items():
        engine.submit(agent, prompt, max_tokens=600, logits_processors=NO_EOS)
    done = {}
    for c in engine.step():
        done[c.agent_id] = c
        assert c.blocks.token_ids == prompts[c.agent_id] + c.token_ids
        pool.release(c.blocks)  # the caller frees each finished agent: the preempted one needs the room
    assert done["young"].preemptions >= 1 and done["old"].preemptions == 0
    for agent, prompt in prompts.items():
        assert done[agent].finish_reason == "length"
        assert done[agent].token_ids == mlx_lm_tokens(model, tokenizer, prompt, 600, logits_processors=NO_EOS), agent
    pool.check_invariants()
    assert pool.stats().used_bytes == 0


def test_cancelling_waiting_and_preempted_requests_returns_everything(load_tiny):
    model, tokenizer = load_tiny("llama")
    pool, engine = sized_engine(
        model, tokenizer, lambda e: e.request_bytes(0, 24, 600) + e.request_bytes(0, 30, 2) // 2
    )
    history = tokens(30, 31)
    engine.submit("h", history, max_tokens=2)
    (h,) = list(engine.step())
    start = pool.stats()
    engine.submit("old", tokens(20, 32), max_tokens=600, logits_processors=NO_EOS)
    young = engine.submit("h", tokens(5, 33), cache=h.blocks, max_tokens=600, logits_processors=NO_EOS)
    ended, waiting = {}, None
    for event in engine.stream():
        completion = event.completion
        state = engine.request_state(young)
        if waiting is None and state is not None and state.preemptions and state.state == "waiting":
            waiting = engine.submit("w", tokens(9, 34), max_tokens=4)  # waits: admissions pause after a preemption
            assert engine.request_state(waiting).state == "waiting"
            assert engine.cancel(young) and engine.cancel(waiting)  # one preempted, one never admitted
        if completion is not None:
            ended[completion.uid] = completion
    assert ended[young].finish_reason == "cancelled" and ended[waiting].finish_reason == "cancelled"
    back = ended[young].blocks
    assert back.token_ids == h.blocks.token_ids  # the history as it was before the request
    assert ended[waiting].blocks is None
    pool.release(next(c for c in ended.values() if c and c.agent_id == "old").blocks)
    assert pool.stats().block_bytes == start.block_bytes and pool.stats().working_bytes == 0
    again = engine.submit("h", tokens(5, 35), cache=back, max_tokens=3)
    (resumed,) = list(engine.step())
    assert resumed.uid == again and resumed.token_ids == mlx_lm_tokens(
        model, tokenizer, history + h.token_ids + tokens(5, 35), 3
    )
    pool.release(resumed.blocks)
    assert pool.stats().used_bytes == 0
