"""BlockPool: allocation, ownership, accounting, thread safety and in-place writes."""

from __future__ import annotations

import random
import threading

import mlx.core as mx
import numpy as np
import pytest

from blockpool import (
    AgentBlocks,
    BlockOperationError,
    BlockPool,
    BlockWrite,
    Geometry,
    InvalidRequestError,
    KVBlock,
    LayerSpec,
    ModelCacheSpec,
    PoolExhaustedError,
)

G_SMALL = Geometry(2, 8, 8, "float32")
G_WIDE = Geometry(1, 16, 4, "float16")  # K and V with different head dims


def make_spec(*layers: LayerSpec) -> ModelCacheSpec:
    return ModelCacheSpec(layers or (LayerSpec(G_SMALL), LayerSpec(G_SMALL, window=300)))


def address(a: mx.array) -> int:
    return np.asarray(a).__array_interface__["data"][0]


def test_storage_is_preallocated_per_geometry():
    spec = make_spec(LayerSpec(G_SMALL), LayerSpec(G_WIDE), LayerSpec(G_SMALL))
    pool = BlockPool(spec, num_blocks=30)
    assert pool.total_blocks == 30
    assert pool.available_blocks(0) == 20 and pool.available_blocks(1) == 10  # split by layer count
    k0, v0 = pool._planes[0]["k"], pool._planes[0]["v"]
    assert k0.shape == (20, 2, 256, 8) and v0.shape == (20, 2, 256, 8)
    assert pool._planes[1]["k"].shape == (10, 1, 256, 16) and pool._planes[1]["v"].shape == (10, 1, 256, 4)
    assert pool.total_bytes == 20 * G_SMALL.bytes_per_block() + 10 * G_WIDE.bytes_per_block()


def test_memory_budget_becomes_blocks():
    spec = make_spec()
    per_block = G_SMALL.bytes_per_block()
    pool = BlockPool(spec, memory_bytes=10 * 2 * per_block + 5)
    assert pool.total_blocks == 20 and pool.total_bytes <= 10 * 2 * per_block + 5
    with pytest.raises(InvalidRequestError):
        BlockPool(spec, memory_bytes=per_block)
    with pytest.raises(InvalidRequestError):
        BlockPool(spec, num_blocks=4, memory_bytes=10**6)


def test_allocate_is_all_or_nothing():
    pool = BlockPool(make_spec(), num_blocks=6)
    got = pool.allocate(4, 0, "a")
    assert [b.layer_id for b in got] == [0] * 4 and len({b.block_id for b in got}) == 4
    with pytest.raises(PoolExhaustedError) as info:
        pool.allocate(3, 1, "b")
    assert (info.value.requested, info.value.available) == (3, 2)
    assert "asked for 3 blocks" in str(info.value) and "only 2 are free" in str(info.value)
    assert pool.available_blocks() == 2 and pool.used_blocks("b") == 0
    pool.check_invariants()


def test_reserve_spans_layers_and_fails_whole():
    pool = BlockPool(make_spec(), num_blocks=6)
    with pytest.raises(PoolExhaustedError):
        pool.reserve({0: 4, 1: 3}, "a")
    assert pool.available_blocks() == 6
    got = pool.reserve({0: 4, 1: 2}, "a")
    assert len(got[0]) == 4 and len(got[1]) == 2 and pool.available_blocks() == 0
    pool.check_invariants()


def test_free_refuses_foreign_and_double_free():
    pool = BlockPool(make_spec(), num_blocks=6)
    mine = pool.allocate(2, 0, "a")
    theirs = pool.allocate(1, 0, "b")
    with pytest.raises(BlockOperationError, match="does not hold"):
        pool.free(theirs, "a")
    with pytest.raises(BlockOperationError, match="named twice"):
        pool.free([mine[0], mine[0]], "a")
    with pytest.raises(BlockOperationError):  # one bad block: nothing is freed
        pool.free(mine + theirs, "a")
    assert pool.used_blocks("a") == 2
    pool.free(mine, "a")
    with pytest.raises(BlockOperationError, match="it is free"):
        pool.free(mine[:1], "a")
    with pytest.raises(BlockOperationError, match="belongs to layer 0"):
        pool.free([KVBlock(1, theirs[0].block_id)], "b")
    pool.free(theirs, "b")
    assert pool.available_blocks() == 6
    pool.check_invariants()


def test_bad_agent_and_layer_ids():
    pool = BlockPool(make_spec(), num_blocks=4)
    for bad in ("", None, 3):
        with pytest.raises(InvalidRequestError):
            pool.allocate(1, 0, bad)
    with pytest.raises(InvalidRequestError):
        pool.allocate(1, 7, "a")
    with pytest.raises(InvalidRequestError):
        pool.allocate(-1, 0, "a")
    assert pool.available_blocks() == 4


def test_sharing_counts_references():
    pool = BlockPool(make_spec(), num_blocks=4)
    blocks = pool.allocate(2, 0, "a")
    pool.share(blocks, "b")
    assert [pool.refcount(b) for b in blocks] == [2, 2]
    with pytest.raises(BlockOperationError, match="already holds"):
        pool.share(blocks, "b")
    stats = pool.stats()
    assert stats.used_blocks == 2 and stats.shared_blocks == 2
    assert stats.agents["a"].blocks == 2 and stats.agents["b"].blocks == 2
    assert stats.used_bytes == 2 * G_SMALL.bytes_per_block()
    pool.free(blocks, "a")
    assert pool.available_blocks() == 2 and [pool.refcount(b) for b in blocks] == [1, 1]
    pool.free(blocks, "b")
    assert pool.available_blocks() == 4
    with pytest.raises(BlockOperationError, match="it is free"):
        pool.share(blocks, "c")
    pool.check_invariants()


def test_stats_snapshot():
    pool = BlockPool(make_spec(LayerSpec(G_SMALL), LayerSpec(G_WIDE)), num_blocks=10)
    pool.allocate(3, 0, "a")
    pool.allocate(2, 1, "a")
    pool.allocate(1, 1, "b")
    s = pool.stats()
    assert (s.total_blocks, s.used_blocks, s.free_blocks) == (10, 6, 4)
    assert s.agents["a"].bytes == 3 * G_SMALL.bytes_per_block() + 2 * G_WIDE.bytes_per_block()
    assert s.used_bytes == sum(a.bytes for a in s.agents.values())


def test_writes_reject_free_foreign_layer_and_shared_blocks():
    spec = make_spec()
    pool = BlockPool(spec, num_blocks=4)
    blocks = pool.allocate(2, 0, "a")
    keys = mx.ones((1, 2, 10, 8))
    with pytest.raises(BlockOperationError, match="is free"):
        pool.write([BlockWrite(0, [KVBlock(0, 3)], keys, keys)])
    with pytest.raises(BlockOperationError, match="not a block of layer 1"):
        pool.write([BlockWrite(1, blocks[:1], keys, keys)])
    pool.share(blocks[:1], "b")
    with pytest.raises(BlockOperationError, match="shared"):
        pool.write([BlockWrite(0, blocks[:1], keys, keys)])
    with pytest.raises(ValueError):  # wrong head dim: the op refuses, nothing is written
        pool.write([BlockWrite(0, blocks[1:], mx.ones((1, 2, 10, 4)), mx.ones((1, 2, 10, 4)))])
    pool.check_invariants()


def test_read_returns_what_was_written():
    spec = make_spec(LayerSpec(G_SMALL), LayerSpec(G_WIDE))
    pool = BlockPool(spec, num_blocks=8)
    got = pool.reserve({0: 2, 1: 2}, "a")
    k0 = mx.random.normal((1, 2, 300, 8))
    k1 = mx.random.normal((1, 1, 300, 16)).astype(mx.float16)
    v1 = mx.random.normal((1, 1, 300, 4)).astype(mx.float16)
    pool.write([BlockWrite(0, got[0], k0, -k0), BlockWrite(1, got[1], k1, v1)])
    out = pool.read(got)
    assert mx.array_equal(out[0][0][:, :, :300], k0).item() and mx.array_equal(out[0][1][:, :, :300], -k0).item()
    assert mx.array_equal(out[1][0][:, :, :300], k1).item() and mx.array_equal(out[1][1][:, :, :300], v1).item()


def test_donation_rule_writes_in_place():
    """The pool's own writes never copy a plane; a stray reference makes one copy."""
    pool = BlockPool(make_spec(), num_blocks=64)
    blocks = pool.allocate(2, 0, "a")
    before = address(pool._planes[0]["k"])
    plane_bytes = pool._planes[0]["k"].nbytes
    for step in range(3):
        keys = mx.full((1, 2, 300, 8), float(step))
        mx.eval(keys)
        mx.reset_peak_memory()
        start = mx.get_active_memory()
        pool.write([BlockWrite(0, blocks, keys, keys)])
        pool.read({0: blocks})  # reads are evaluated: they leave no reference behind
        assert address(pool._planes[0]["k"]) == before
        assert mx.get_peak_memory() - start < plane_bytes // 2

    # Breaking the rule: keep a reference to the plane across a write.
    stray = pool._planes[0]["k"]
    snapshot = np.array(stray)
    pool.write([BlockWrite(0, blocks, mx.zeros((1, 2, 300, 8)), mx.zeros((1, 2, 300, 8)))])
    assert address(pool._planes[0]["k"]) != address(stray)  # the write had to copy
    np.testing.assert_array_equal(np.array(stray), snapshot)  # and the stray view is untouched
    del stray
    after = address(pool._planes[0]["k"])
    pool.write([BlockWrite(0, blocks, mx.ones((1, 2, 300, 8)), mx.ones((1, 2, 300, 8)))])
    assert address(pool._planes[0]["k"]) == after  # in place again


def test_threaded_stress_keeps_the_books():
    pool = BlockPool(make_spec(), num_blocks=64)
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        held: list[KVBlock] = []
        agent = f"agent-{seed}"
        try:
            for _ in range(300):
                op = rng.random()
                if op < 0.5:
                    try:
                        held += pool.allocate(rng.randint(1, 4), rng.randint(0, 1), agent)
                    except PoolExhaustedError:
                        pass
                elif held:
                    rng.shuffle(held)
                    k = rng.randint(1, len(held))
                    pool.free(held[:k], agent)
                    held = held[k:]
                if rng.random() < 0.05:
                    pool.check_invariants()
            pool.free(held, agent)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    pool.check_invariants()
    assert pool.available_blocks() == 64 and pool.stats().agents == {}


def test_agent_blocks_check_their_invariants(gemma_spec):
    b = [KVBlock(i, i) for i in range(4)]
    ok = AgentBlocks("a", gemma_spec, {0: [b[0]], 1: [b[1]], 2: [b[2]], 3: [b[3]]}, 10, list(range(10)))
    assert ok.num_blocks == 4 and ok.first_block(0) == 0
    with pytest.raises(ValueError, match="token ids"):
        AgentBlocks("a", gemma_spec, ok.blocks, 10, [1, 2])
    with pytest.raises(ValueError, match="layer 1 \\(full\\) holds 1 blocks; 300 tokens need 2"):
        AgentBlocks("a", gemma_spec, ok.blocks, 300, list(range(300)))
    with pytest.raises(ValueError, match="another layer"):
        AgentBlocks("a", gemma_spec, {0: [b[1]], 1: [b[1]], 2: [b[2]], 3: [b[3]]}, 10, list(range(10)))
    with pytest.raises(ValueError, match="cover layers"):
        AgentBlocks("a", gemma_spec, {0: [b[0]]}, 10, list(range(10)))
    # Past its 32-token window a sliding layer needs only the blocks covering the window.
    long = {0: [KVBlock(0, 9)], 1: [KVBlock(1, 1), KVBlock(1, 2)], 2: [KVBlock(2, 8)], 3: [KVBlock(3, 3), KVBlock(3, 4)]}
    agent = AgentBlocks("a", gemma_spec, long, 400, list(range(400)))
    assert agent.first_block(0) == 1 and agent.first_block(1) == 0
