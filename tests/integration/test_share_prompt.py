"""A new agent's prompt shared as soon as it is prefilled (``share_prompt``), not when it completes.

The agent keeps decoding from its working cache; its prompt's blocks are in
the pool (and the prefix index) from its first token on, so an agent that
arrives meanwhile with the same system prompt shares them. Outputs stay
exact, and the pool returns to its start.
"""

from __future__ import annotations

import pytest
from test_memory_store import make_memory, tokens

from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from blockpool.errors import InvalidRequestError
from family_models import family_model, shared_tokenizer
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration

SYSTEM = tokens(1024, 21)  # four full blocks


def memory_for(load_tiny, arch: str):
    if arch in ("llama", "gemma3_text"):
        return make_memory(load_tiny, arch, num_blocks=120)
    model, tokenizer = family_model(arch), shared_tokenizer()  # a hybrid: checkpoints every block
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=64 << 20)
    return model, tokenizer, pool, AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool, checkpoint_blocks=1))


@pytest.mark.parametrize("arch", ["llama", "gemma3_text", "qwen3_5"])
def test_a_second_agent_shares_the_first_ones_prompt_while_it_decodes(load_tiny, arch):
    model, tokenizer, pool, memory = memory_for(load_tiny, arch)
    start = pool.available_blocks()
    first, second = SYSTEM + tokens(40, 22), SYSTEM + tokens(30, 23)
    memory.submit("a", first, max_tokens=24, share_prompt=True)
    events = memory.stream()
    next(e for e in events if e.token is not None)  # a is decoding; its prompt is in blocks now
    memory.submit("b", second, max_tokens=8)
    done = {e.completion.agent_id: e.completion for e in events if e.completion is not None}
    assert done["a"].token_ids == mlx_lm_tokens(model, tokenizer, first, 24)
    assert done["b"].token_ids == mlx_lm_tokens(model, tokenizer, second, 8)
    if arch == "gemma3_text":  # its sliding windows dropped the prompt's early blocks: nothing to share
        assert done["b"].cache_source == "cold"
    else:  # every full block (and, for the hybrid, its checkpoint at each block edge) is shared
        assert done["b"].cache_source == "shared" and done["b"].cached_tokens == 1024
    memory.close()
    assert pool.available_blocks() == start


def test_without_share_prompt_the_second_agent_arrives_too_early(load_tiny):
    model, tokenizer, pool, memory = make_memory(load_tiny, num_blocks=120)
    memory.submit("a", SYSTEM + tokens(40, 22), max_tokens=24)
    events = memory.stream()
    next(e for e in events if e.token is not None)
    memory.submit("b", SYSTEM + tokens(30, 23), max_tokens=8)
    done = {e.completion.agent_id: e.completion for e in events if e.completion is not None}
    assert done["b"].cache_source == "cold"
    memory.close()


def test_a_cancel_after_the_prompt_was_shared_frees_only_what_no_one_else_holds(load_tiny):
    model, tokenizer, pool, memory = make_memory(load_tiny, num_blocks=120)
    start = pool.available_blocks()
    uid = memory.submit("a", SYSTEM + tokens(40, 22), max_tokens=200, share_prompt=True)
    events = memory.stream()
    next(e for e in events if e.token is not None)
    memory.submit("b", SYSTEM + tokens(30, 23), max_tokens=40)
    next(e for e in events if e.agent_id == "b" and e.token is not None)
    memory.cancel(uid)  # a goes; b holds the shared system prompt blocks
    done = {e.completion.agent_id: e.completion for e in events if e.completion is not None}
    assert done["a"].finish_reason == "cancelled"
    assert done["b"].token_ids == mlx_lm_tokens(model, tokenizer, SYSTEM + tokens(30, 23), 40)
    memory.close()
    assert pool.available_blocks() == start


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "gathered"])
def test_a_full_pool_shares_a_paged_prompt_and_skips_a_gathered_one_without_error(load_tiny, paged):
    """A paged request's prompt is in blocks already: sharing it early takes no room. A gathered one
    would need room for a copy: without it, there is no early share, and no error."""
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=40)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, paged=paged)
    called, taken = [], []
    prompt = SYSTEM + tokens(40, 22)

    def fill_the_pool(done: int, total: int) -> None:
        if done == total and not taken:  # the prompt is in: another holder takes every free block
            for layer in range(pool.spec.num_layers):
                taken.extend(pool.allocate(pool.available_blocks(), layer, "someone-else"))

    engine.submit("a", prompt, max_tokens=8, share_prompt=called.append, prompt_progress_callback=fill_the_pool)
    (done,) = list(engine.step())
    assert taken and len(called) == (1 if paged else 0)
    if paged:
        assert called[0].total_tokens == len(prompt) and called[0].consumed  # the request went on from it
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 8)
    pool.free(taken, "someone-else")
    pool.release(done.blocks)
    assert pool.available_blocks() == pool.total_blocks


def test_share_prompt_must_be_callable(load_tiny):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=40)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    with pytest.raises(InvalidRequestError, match="share_prompt"):
        engine.submit("a", [5, 6, 7], share_prompt="yes")
    assert pool.available_blocks() == pool.total_blocks
