"""A prompt that diverges from another agent's inside a block shares that block's first tokens.

The follower takes a reference to the donor's block and resumes at the
divergence; the block is copied before either writes to it (copy on
write), so both stay exact, each later turn too, and the pool returns to
its start. Outputs are compared with mlx-lm's on a fresh cache.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from blockpool.store.prefix_index import MIN_PARTIAL_TOKENS
from family_models import family_model, shared_tokenizer
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration

B = 256


def tokens(n: int, seed: int) -> list[int]:
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()


def make_memory(load_tiny, cache_dir=None):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=80)
    return model, tokenizer, pool, AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool), cache_dir=cache_dir)


def turn(memory, agent, prompt, max_tokens=8):
    memory.submit(agent, prompt, max_tokens=max_tokens)
    (done,) = list(memory.step())
    return done


@pytest.mark.parametrize(
    "diverge",
    [MIN_PARTIAL_TOKENS, 100, B + 17, 2 * B - 1, 560],
    ids=["first-block-min", "first-block", "second-block", "last-of-a-full-block", "donor-s-partial-last-block"],
)
def test_a_follower_shares_to_the_divergence_and_both_stay_exact(load_tiny, diverge):
    model, tokenizer, pool, memory = make_memory(load_tiny)
    start = pool.available_blocks()
    donor = tokens(600, 1)
    first = turn(memory, "donor", donor)
    follower = donor[:diverge] + tokens(30, 2)
    done = turn(memory, "follower", follower)
    assert done.cache_source == "shared" and done.cached_tokens == diverge
    assert done.prompt_tokens == len(follower) - diverge
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, follower, 8)
    # The follower wrote its own copy of the shared block: the two hold no partly shared block now.
    ends = {layer: blocks[-1] for layer, blocks in done.blocks.blocks.items()}
    assert all(pool.refcount(block) == 1 for block in ends.values())
    # The donor comes back: its own blocks are intact.
    history = donor + first.token_ids + tokens(12, 3)
    again = turn(memory, "donor", history)
    assert again.cache_source == "pool" and again.cached_tokens == len(donor) + len(first.token_ids)
    assert again.token_ids == mlx_lm_tokens(model, tokenizer, history, 8)
    memory.close()
    assert pool.available_blocks() == start
    pool.check_invariants()


def test_fewer_common_tokens_than_the_minimum_are_prefilled(load_tiny):
    model, tokenizer, pool, memory = make_memory(load_tiny)
    donor = tokens(300, 4)
    turn(memory, "donor", donor)
    follower = donor[: MIN_PARTIAL_TOKENS - 1] + tokens(40, 5)
    done = turn(memory, "follower", follower)
    assert done.cache_source == "cold" and done.cached_tokens == 0
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, follower, 8)
    memory.close()
    assert pool.available_blocks() == pool.total_blocks


def test_the_donor_rewrites_its_shared_block_while_the_follower_runs(load_tiny):
    """The donor diverges inside the very block the follower is reading: it gets its own copy."""
    model, tokenizer, pool, memory = make_memory(load_tiny)
    donor = tokens(400, 6)
    turn(memory, "donor", donor)
    follower = donor[:350] + tokens(20, 7)
    memory.submit("follower", follower, max_tokens=24)
    events = memory.stream()
    next(e for e in events if e.token is not None)  # the follower holds the donor's block now
    rest = [e.completion for e in events if e.completion]
    (follower_done,) = rest
    assert follower_done.cached_tokens == 350
    assert follower_done.token_ids == mlx_lm_tokens(model, tokenizer, follower, 24)
    diverged = donor[:370] + tokens(15, 8)  # the donor cuts its own history back inside that block
    done = turn(memory, "donor", diverged)
    assert done.cached_tokens == 370
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, diverged, 8)
    again = turn(memory, "follower", follower + follower_done.token_ids + tokens(5, 9))
    assert again.cache_source == "pool"
    assert again.token_ids == mlx_lm_tokens(model, tokenizer, follower + follower_done.token_ids + tokens(5, 9), 8)
    memory.close()
    assert pool.available_blocks() == pool.total_blocks


def test_a_cancelled_follower_goes_to_disk_and_comes_back_exact(load_tiny, tmp_path):
    """A follower cancelled before its first write-back still holds the donor's block; its file and
    its next turn are exact."""
    model, tokenizer, pool, memory = make_memory(load_tiny, cache_dir=tmp_path)
    donor = tokens(500, 10)
    turn(memory, "donor", donor)
    follower = donor[:300] + tokens(40, 11)
    uid = memory.submit("follower", follower, max_tokens=50)
    memory.cancel(uid)
    (cancelled,) = list(memory.step())
    assert cancelled.finish_reason == "cancelled" and cancelled.blocks.total_tokens == 300
    assert all(pool.refcount(blocks[-1]) == 2 for blocks in cancelled.blocks.blocks.values())  # the donor's
    assert memory.spill("follower") and memory.where("follower") == "disk"
    prompt = follower + tokens(10, 12)
    done = turn(memory, "follower", prompt)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 8)
    assert done.cache_source in ("disk", "shared") and done.cached_tokens >= 300
    memory.close()
    assert pool.available_blocks() == pool.total_blocks


def test_a_hybrid_model_with_recurrent_layers_shares_whole_blocks_only():
    model, tokenizer = family_model("qwen3_5"), shared_tokenizer()
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=64 << 20)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool, checkpoint_blocks=1))
    donor = tokens(600, 13)
    turn(memory, "donor", donor)
    follower = donor[:400] + tokens(30, 14)
    done = turn(memory, "follower", follower)
    assert done.cached_tokens == B  # its state exists at checkpoints on block ends, never at 400
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, follower, 8)
    memory.close()
    assert pool.available_blocks() == pool.total_blocks
