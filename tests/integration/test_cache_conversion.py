"""Round trips between mlx-lm caches and blocks on tiny real models: logits must match exactly."""

from __future__ import annotations

import copy

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from blockpool import (
    AgentBlocks,
    BlockPool,
    ModelCacheSpec,
    PoolExhaustedError,
    from_mlx_caches,
    plan_extension,
    to_mlx_caches,
)
from blockpool.cache_conversion import fresh_blocks
from tiny_models import tiny_model

pytestmark = pytest.mark.integration

ARCHS = ["llama", "qwen2", "qwen3", "gemma3_text", "mixtral", "qwen3_moe"]


def random_tokens(n: int, seed: int) -> list[int]:
    return mx.random.randint(0, 512, (n,), key=mx.random.key(seed)).tolist()


def assert_continues_identically(model, original, rebuilt, next_token: int, steps: int = 6) -> None:
    """Decode ``steps`` tokens from both caches; every logit must be bit-identical."""
    for _ in range(steps):
        a = model(mx.array([[next_token]]), cache=original)
        b = model(mx.array([[next_token]]), cache=rebuilt)
        assert mx.array_equal(a, b).item()
        next_token = int(mx.argmax(a[0, -1]))
    chunk = random_tokens(5, 99)  # and a multi-token prefill after that
    assert mx.array_equal(model(mx.array([chunk]), cache=original), model(mx.array([chunk]), cache=rebuilt)).item()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("length", [37, 600])
def test_round_trip_is_exact(arch, length):
    model = tiny_model(arch)
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=64)
    tokens = random_tokens(length, length)
    original = make_prompt_cache(model)
    next_token = int(mx.argmax(model(mx.array([tokens]), cache=original)[0, -1]))

    agent = from_mlx_caches(pool, original, tokens, AgentBlocks.empty("a", spec))
    assert agent.total_tokens == length and agent.token_ids == tokens
    assert_continues_identically(model, original, to_mlx_caches(pool, agent), next_token)

    pool.release(agent)
    pool.check_invariants()
    assert pool.available_blocks() == 64


def test_gemma_past_its_window_over_many_turns():
    """Sliding layers drop blocks that leave the window, and rebuild the ring exactly."""
    model = tiny_model("gemma3_text")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=48)
    original = make_prompt_cache(model)
    tokens = random_tokens(40, 1)
    next_token = int(mx.argmax(model(mx.array([tokens]), cache=original)[0, -1]))
    agent = AgentBlocks.empty("a", spec)
    for turn in range(4):
        for _ in range(9 + 7 * turn):  # decode: the sliding caches become rotated rings
            tokens.append(next_token)
            next_token = int(mx.argmax(model(mx.array([[next_token]]), cache=original)[0, -1]))
        agent = from_mlx_caches(pool, original, tokens, agent)
        assert agent.ring_index  # rebuilt in the ring's physical order
        assert_continues_identically(model, copy.deepcopy(original), to_mlx_caches(pool, agent), next_token)

        chunk = [next_token] + random_tokens(150 * turn + 100, turn)
        tokens += chunk
        next_token = int(mx.argmax(model(mx.array([chunk]), cache=original)[0, -1]))
        agent = from_mlx_caches(pool, original, tokens, agent)
        assert_continues_identically(model, copy.deepcopy(original), to_mlx_caches(pool, agent), next_token)

        for layer in (0, 2):  # sliding: only the blocks covering the last 32 tokens
            assert len(agent.blocks[layer]) <= spec.max_blocks(layer)
        for layer in (1, 3):  # full: every block
            assert len(agent.blocks[layer]) == -(-len(tokens) // 256)
        assert pool.used_blocks() == agent.num_blocks
        pool.check_invariants()
    pool.release(agent)
    assert pool.available_blocks() == 48


def test_resume_writes_only_new_tokens():
    model = tiny_model("llama")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=16)
    cache = make_prompt_cache(model)
    tokens = random_tokens(300, 2)
    model(mx.array([tokens]), cache=cache)
    agent = from_mlx_caches(pool, cache, tokens, AgentBlocks.empty("a", spec))
    first = [list(b) for b in agent.blocks.values()]

    # Change the stored history in the cache: a resume must not rewrite it.
    for c in cache:
        c.keys[..., :300, :] = 0.0
        c.values[..., :300, :] = 0.0
    more = random_tokens(20, 3)
    model(mx.array([more]), cache=cache)
    agent = from_mlx_caches(pool, cache, tokens + more, agent)
    assert [b[:2] for b in agent.blocks.values()] == first  # same blocks, none added
    k, _ = pool.read({0: agent.blocks[0]})[0]
    assert mx.abs(k[..., :300, :]).max().item() > 0  # old tokens untouched
    assert mx.array_equal(k[..., 300:320, :], cache[0].keys[..., 300:320, :]).item()


def test_shared_partial_block_is_copied_on_write():
    model = tiny_model("llama")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=16)
    cache = make_prompt_cache(model)
    tokens = random_tokens(100, 4)
    model(mx.array([tokens]), cache=cache)
    owner = from_mlx_caches(pool, cache, tokens, AgentBlocks.empty("owner", spec))
    pool.share(owner.all_blocks(), "other")

    more = random_tokens(10, 5)
    model(mx.array([more]), cache=cache)
    counts = fresh_blocks(plan_extension(pool, owner, 110))
    assert counts == {0: 1, 1: 1}  # one fresh copy per layer
    grown = from_mlx_caches(pool, cache, tokens + more, owner)
    assert all(pool.refcount(b) == 1 for b in grown.all_blocks())
    assert all(pool.refcount(b) == 1 for b in owner.all_blocks())  # "other" still holds the originals
    rebuilt = to_mlx_caches(pool, grown)
    assert mx.array_equal(rebuilt[0].keys[..., :110, :], cache[0].keys[..., :110, :]).item()
    pool.release(grown)
    pool.free(owner.all_blocks(), "other")
    assert pool.available_blocks() == 16


def test_extraction_that_does_not_fit_changes_nothing():
    model = tiny_model("llama")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=4)
    squatter = pool.allocate(2, 0, "squatter")
    cache = make_prompt_cache(model)
    tokens = random_tokens(300, 6)  # needs 2 blocks per layer, only 2 are free
    model(mx.array([tokens]), cache=cache)
    with pytest.raises(PoolExhaustedError):
        from_mlx_caches(pool, cache, tokens, AgentBlocks.empty("a", spec))
    assert pool.available_blocks() == 2 and pool.used_blocks("a") == 0
    pool.free(squatter, "squatter")
    pool.check_invariants()


def test_plans_are_exact_and_change_nothing():
    model = tiny_model("gemma3_text")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=32)
    empty = AgentBlocks.empty("a", spec)
    before = pool.stats()
    # Window 32: a sliding layer needs only the block that holds tokens 968..999.
    assert fresh_blocks(plan_extension(pool, empty, 1000)) == {0: 1, 1: 4, 2: 1, 3: 4}
    assert fresh_blocks(plan_extension(pool, empty, 270)) == {0: 2, 1: 2, 2: 2, 3: 2}  # 238..269 straddle two
    assert pool.stats() == before  # planning is pure
    cache = make_prompt_cache(model)
    tokens = random_tokens(100, 7)
    model(mx.array([tokens]), cache=cache)
    agent = from_mlx_caches(pool, cache, tokens, empty)
    assert agent.num_blocks == 4 and pool.used_blocks("a") == 4 and empty.consumed
    pool.release(agent)
    assert pool.available_blocks() == 32
