"""BlockPool: allocation, ownership, accounting, thread safety and in-place writes."""

from __future__ import annotations

import random
import threading

import mlx.core as mx
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


def test_storage_is_elastic_and_accounted_in_bytes():
    spec = make_spec(LayerSpec(G_SMALL), LayerSpec(G_WIDE), LayerSpec(G_SMALL))
    pool = BlockPool(spec, num_blocks=30)
    assert pool.total_blocks == 30
    assert pool.total_bytes == 20 * G_SMALL.bytes_per_block() + 10 * G_WIDE.bytes_per_block()  # split by layer count
    assert pool.stats().used_bytes == 0  # nothing preallocated
    before = mx.get_active_memory()
    blocks = pool.reserve({0: 3, 1: 2}, "a")
    keys = mx.ones((1, 2, 3 * 256, 8))
    pool.write([BlockWrite(0, blocks[0], keys, keys)])
    assert mx.get_active_memory() - before >= 3 * G_SMALL.bytes_per_block()  # written blocks are real arrays
    assert pool.stats().block_bytes == 3 * G_SMALL.bytes_per_block() + 2 * G_WIDE.bytes_per_block()
    pool.free(blocks[0] + blocks[1], "a")
    assert pool.stats().used_bytes == 0
    pool.check_invariants()


def test_memory_budget_becomes_blocks():
    spec = make_spec()
    per_block = G_SMALL.bytes_per_block()
    pool = BlockPool(spec, memory_bytes=10 * 2 * per_block + 5)
    assert pool.total_blocks == 20 and pool.total_bytes == 10 * 2 * per_block + 5
    with pytest.raises(InvalidRequestError):
        BlockPool(spec, memory_bytes=per_block)
    with pytest.raises(InvalidRequestError):
        BlockPool(spec, num_blocks=4, memory_bytes=10**6)
    for bad in (0, -5, 2.5, True, "10"):
        with pytest.raises(InvalidRequestError):
            BlockPool(spec, memory_bytes=bad)


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
    with pytest.raises(BlockOperationError, match="is free"):
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
    assert stats.used_bytes == stats.block_bytes == 2 * G_SMALL.bytes_per_block()
    pool.free(blocks, "a")
    assert pool.available_blocks() == 2 and [pool.refcount(b) for b in blocks] == [1, 1]
    pool.free(blocks, "b")
    assert pool.available_blocks() == 4
    with pytest.raises(BlockOperationError, match="is free"):
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
    with pytest.raises(BlockOperationError, match="not a block of layer 0"):
        pool.write([BlockWrite(0, [KVBlock(0, 99)], keys, keys)])
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


def test_partial_blocks_keep_their_earlier_tokens():
    pool = BlockPool(make_spec(), num_blocks=8)
    (blocks,) = pool.reserve({0: 2}, "a").values()
    first = mx.random.normal((1, 2, 100, 8))
    pool.write([BlockWrite(0, blocks[:1], first, -first)])
    more = mx.random.normal((1, 2, 200, 8))
    pool.write([BlockWrite(0, blocks, more, -more, offset=100)])  # runs on into the second block
    keys, values = pool.read({0: blocks})[0]
    expected = mx.concatenate([first, more], axis=2)
    assert mx.array_equal(keys[:, :, :300], expected).item() and mx.array_equal(values[:, :, :300], -expected).item()


def test_working_and_transient_bytes_count_against_the_budget():
    pool = BlockPool(make_spec(), num_blocks=10)
    unit = G_SMALL.bytes_per_block()
    owner = object()
    assert pool.charge(owner, 6 * unit) and pool.stats().working_bytes == 6 * unit
    assert pool.available_blocks() == 4
    with pytest.raises(PoolExhaustedError):
        pool.allocate(5, 0, "a")
    assert not pool.charge(owner, 11 * unit) and pool.working_bytes(owner) == 6 * unit  # refused: unchanged
    assert pool.charge(owner, 11 * unit, force=True) and pool.available_blocks() == 0  # memory already held
    assert pool.charge(owner, 0) and pool.stats().working_bytes == 0
    with pool.transient(8 * unit):
        assert pool.stats().transient_bytes == 8 * unit and pool.available_blocks() == 2
        with pytest.raises(PoolExhaustedError):
            with pool.transient(3 * unit):
                pass
    assert pool.stats().transient_bytes == 0 and pool.available_blocks() == 10
    pool.check_invariants()


def test_freed_indexed_blocks_stay_findable_until_their_memory_is_needed():
    pool = BlockPool(make_spec(), num_blocks=4)
    blocks = pool.allocate(2, 0, "a")
    keys = mx.ones((1, 2, 512, 8))
    pool.write([BlockWrite(0, blocks, keys, keys)])
    generations = [pool.generation(b) for b in blocks]
    pool.mark_cacheable(blocks)
    pool.free(blocks, "a")
    assert pool.stats().cached_free_blocks == 2 and pool.available_blocks() == 4  # cached, yet reclaimable
    assert all(pool.is_live(b, g) for b, g in zip(blocks, generations))
    pool.share(blocks[1:], "b")  # revived by a sharer: no copy, same tokens
    assert pool.refcount(blocks[1]) == 1 and pool.stats().cached_free_blocks == 1
    pool.allocate(3, 0, "c")  # needs the cached block's memory: it is dropped, oldest first
    assert not pool.is_live(blocks[0], generations[0]) and pool.is_live(blocks[1], generations[1])
    pool.check_invariants()


def test_make_room_asks_the_reclaimers():
    pool = BlockPool(make_spec(), num_blocks=6)
    held = pool.allocate(4, 0, "idle")
    calls = []

    def reclaim(missing: int) -> int:
        calls.append(missing)
        pool.free(held, "idle")
        return 4 * G_SMALL.bytes_per_block()

    assert not pool.make_room(4 * G_SMALL.bytes_per_block(), reclaim=False)
    pool.add_reclaimer(reclaim)
    assert pool.make_room(4 * G_SMALL.bytes_per_block())
    assert calls == [2 * G_SMALL.bytes_per_block()] and pool.available_blocks() == 6
    pool.remove_reclaimer(reclaim)
    pool.check_invariants()


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
    long = {
        0: [KVBlock(0, 9)],
        1: [KVBlock(1, 1), KVBlock(1, 2)],
        2: [KVBlock(2, 8)],
        3: [KVBlock(3, 3), KVBlock(3, 4)],
    }
    agent = AgentBlocks("a", gemma_spec, long, 400, list(range(400)))
    assert agent.first_block(0) == 1 and agent.first_block(1) == 0
