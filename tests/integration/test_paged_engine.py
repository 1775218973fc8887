"""Paged attention in the engine: on by default where the model allows, the same tokens as gathering, KV held once.

The paged and gathered engines run the same multi-turn, multi-agent
conversations on pools of full-precision, 8-bit and 4-bit blocks, on a
model with only full attention (llama) and one with sliding windows
(gemma 3, 32-token windows); each turn's tokens must agree, and each pool must return to
where it started. What a running request holds is read off the pool while
it decodes: paged, its history's blocks and the blocks its new tokens need;
gathered, a working copy of the whole history on top.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from blockpool import BlockPool, BlockPoolBatchEngine, InvalidRequestError, ModelCacheSpec
from family_models import family_model, shared_tokenizer
from pool_watch import most_charged


def _prompt(n: int, seed: int) -> list[int]:
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()


def test_paged_is_the_default_where_the_model_allows_and_can_be_turned_off(load_tiny):
    model, tokenizer = load_tiny("llama")
    spec = ModelCacheSpec.from_model(model)
    engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, num_blocks=16))
    assert engine.paged.paged and engine.paged.layers == tuple(range(spec.num_layers))
    off = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, num_blocks=16), paged=False)
    assert not off.paged.paged and "paged=False" in off.paged.detail
    assert BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, num_blocks=16), paged=True).paged.paged


def test_paged_true_on_a_model_that_cannot_page_says_why():
    model = family_model("mamba")  # recurrent state only: nothing to attend over
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=16)
    with pytest.raises(InvalidRequestError, match="cannot run paged: no full or sliding-window attention"):
        BlockPoolBatchEngine(model, shared_tokenizer(), pool, paged=True)
    assert pool.used_blocks() == 0
    engine = BlockPoolBatchEngine(model, shared_tokenizer(), pool)  # the default gathers, with the reason
    assert not engine.paged.paged and "no full or sliding-window attention" in engine.paged.detail
    with pytest.raises(InvalidRequestError, match="paged must be None, True or False"):
        BlockPoolBatchEngine(model, shared_tokenizer(), pool, paged="yes")


def _conversation(model, tokenizer, bits: int | None, paged: bool) -> list[dict[str, list[int]]]:
    """Three agents, three turns each (the later turns resume their blocks); each turn's tokens per agent."""
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=96, kv_bits=bits, kv_group_size=32)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, paged=paged)
    assert engine.paged.paged is paged
    held: dict[str, object] = {}
    turns = []
    for turn in range(3):
        for i in range(3):
            agent = f"agent-{i}"
            # Lengths that end inside a block and cross into the next one while decoding.
            prompt = _prompt(250 + 37 * i if turn == 0 else 5 + 3 * i, 100 * turn + i)
            engine.submit(agent, prompt, cache=held.get(agent), max_tokens=14)
        done = {c.agent_id: c for c in engine.step()}
        assert all(c.finish_reason in ("stop", "length") for c in done.values())
        turns.append({agent: c.token_ids for agent, c in done.items()})
        held = {agent: c.blocks for agent, c in done.items()}
    for blocks in held.values():
        pool.release(blocks)
    assert pool.used_blocks() == 0 and pool.used_bytes == 0
    return turns


@pytest.mark.parametrize("bits", [None, 8, 4])
@pytest.mark.parametrize("arch", ["llama_hd64", "gemma3_hd32"])
def test_paged_and_gathered_engines_give_the_same_tokens(load_tiny, arch, bits):
    model, tokenizer = load_tiny(arch)
    paged = _conversation(model, tokenizer, bits, paged=True)
    gathered = _conversation(model, tokenizer, bits, paged=False)
    assert paged == gathered


@pytest.mark.parametrize("paged", [True, False])
def test_a_running_request_holds_its_history_once_when_paged(load_tiny, paged):
    model, tokenizer = load_tiny("llama")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=64)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, paged=paged)
    engine.submit("agent", _prompt(999, 7), max_tokens=1)
    (history,) = engine.step()  # 1,000 tokens in 4 blocks of every layer, the last one not full
    history_bytes = pool.used_bytes
    block_row = sum(pool.bytes_per_block(i) for i in range(spec.num_layers))
    assert history_bytes == 4 * block_row
    resume = lambda: engine.submit("agent", _prompt(10, 8), cache=history.blocks, max_tokens=40)  # noqa: E731
    extra, done = most_charged(engine, pool, resume)
    pool.release(done.blocks)
    if paged:  # 1,050 tokens: its 4 blocks written in place, and one new block of every layer
        assert extra <= block_row
    else:  # a working copy of the whole history, besides its blocks
        assert extra >= history_bytes
    assert pool.used_blocks() == 0
