"""Every public function and method, called with only its required arguments, gives a real result.

``CALLS`` is the table: one entry per public callable, named as users reach
it (``"BlockPool.reserve"``, ``"prompt.to_token_ids"``), each a check (one
``@row`` below) that makes the call with nothing but the required
arguments, on the tiny real model, and checks what came back; a check that
needs several related calls (allocate, then free) covers all of them. ``test_the_table_covers_the_api``
walks ``blockpool.__all__`` (every function, class, and method a class
defines) plus the submodule functions the docs name (``DOCUMENTED``), and
fails on any callable without an entry, or any entry for a name that no
longer exists: when the API changes, that test says which rows to update.

Result records (``PoolStats``, ``CompletedGeneration``, ...) are not built
by users: their rows obtain them from the call that returns them.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm.models.cache import make_prompt_cache

import blockpool
from blockpool import (
    AgentBlocks,
    AgentMemory,
    BlockOperationError,
    BlockPool,
    BlockPoolBatchEngine,
    BlockPoolError,
    BlockWrite,
    Geometry,
    KVBlock,
    LayerSpec,
    ModelCacheSpec,
    StateGeometry,
    ops,
    persistence,
    prompt,
    reference,
)

# blockpool.generate is the function; the module of the same name is reached through sys.modules.
generate_module = importlib.import_module("blockpool.generate")

pytestmark = pytest.mark.integration

#: Submodule functions the docs name (docs/api.md, docs/agent_memory.md, docs/quickstart.md).
DOCUMENTED = {
    "ops": [n for n in ops.__all__ if callable(getattr(ops, n)) and not isinstance(getattr(ops, n), (bool, dict))],
    "reference": [
        "gather_blocks",
        "scatter_blocks",
        "gather_dequantize_blocks",
        "concat_blocks",
        "concat_dequantize_blocks",
        "split_blocks",
        "paged_attention",
        "write_tokens",
    ],
    "prompt": [n for n in prompt.__all__ if inspect.isfunction(getattr(prompt, n))],
    "persistence": [
        "agent_file_name",
        "model_fingerprint",
        "export_agent",
        "import_agent",
        "save_agent_file",
        "read_header",
        "load_agent_file",
        "load_agent_header",
        "open_agent_file",
        "quarantine",
        "remove_stale_temp_files",
        "describe_cache_dir",
    ],
    "generate": ["default_memory"],
}
MODULES = {
    "ops": ops,
    "reference": reference,
    "prompt": prompt,
    "persistence": persistence,
    "generate": generate_module,
}


@dataclass
class World:
    model: object
    tokenizer: object
    spec: ModelCacheSpec
    pool: BlockPool
    engine: BlockPoolBatchEngine
    memory: AgentMemory  # with a cache_dir
    tmp: Path

    def completion(self, agent: str = "a", n: int = 40, max_tokens: int = 4):
        """One engine request run to its end; the caller owns ``.blocks``."""
        self.engine.submit(agent, mx.random.randint(3, 500, (n,), key=mx.random.key(n)).tolist(), max_tokens=max_tokens)
        (done,) = list(self.engine.step())
        return done

    @staticmethod
    def tick_until_done(driver) -> list:
        """``driver.tick()`` until a completion comes; every event."""
        events = []
        while not any(e.completion for e in events):
            events += driver.tick()
        return events

    def hot_agent(self, agent: str = "a") -> None:
        self.memory.submit(agent, [5, 6, 7, 8, 9], max_tokens=3)
        list(self.memory.step())

    def kv_pools(self):
        """A pool array per entry, as the native ops take them: ``[num_blocks, H, B, D]``."""
        return [
            mx.random.normal((6, 2, 256, 16), key=mx.random.key(1)),
            mx.random.normal((6, 2, 256, 8), key=mx.random.key(2)),
        ]


@pytest.fixture
def w(load_tiny, tmp_path) -> World:
    model, tokenizer = load_tiny("llama")
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, num_blocks=64)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    return World(model, tokenizer, spec, pool, engine, AgentMemory(engine, cache_dir=tmp_path / "agents"), tmp_path)


CALLS: dict[str, Callable[[World], None]] = {}
#: Rows whose call with only the required arguments does not give a result yet, and why (strict xfail).
WAITING: dict[str, str] = {}


ROWS: list[tuple[tuple[str, ...], Callable[[World], None]]] = []


def row(*names: str):
    """Register one call check for ``names`` (a check that makes several related calls covers them all)."""

    def register(fn):
        for name in names:
            assert name not in CALLS, name
            CALLS[name] = fn
        ROWS.append((names, fn))
        return fn

    return register


# ------------------------------------------------------------------ mlx-lm drop-ins


@row("generate")
def _(w):
    assert blockpool.generate(w.model, w.tokenizer, "Hello") == mlx_lm.generate(w.model, w.tokenizer, "Hello")


@row("stream_generate", "AgentGenerationResponse")
def _(w):
    responses = list(blockpool.stream_generate(w.model, w.tokenizer, "Hello"))
    assert isinstance(responses[-1], blockpool.AgentGenerationResponse) and responses[-1].finish_reason in (
        "stop",
        "length",
    )
    assert [r.token for r in responses] == [r.token for r in mlx_lm.stream_generate(w.model, w.tokenizer, "Hello")]


@row("batch_generate")
def _(w):
    prompts = [w.tokenizer.encode("Hello"), w.tokenizer.encode("the agent")]
    assert (
        blockpool.batch_generate(w.model, w.tokenizer, prompts).texts
        == mlx_lm.batch_generate(w.model, w.tokenizer, prompts).texts
    )


@row("generate.default_memory")
def _(w):
    memory = generate_module.default_memory(w.model, w.tokenizer)
    assert isinstance(memory, AgentMemory) and memory is generate_module.default_memory(w.model, w.tokenizer)


# ------------------------------------------------------------------ engine


@row("BlockPoolBatchEngine")
def _(w):
    engine = BlockPoolBatchEngine(w.model, w.tokenizer, w.pool)
    assert engine.in_flight == 0 and engine.pool is w.pool


@row("BlockPoolBatchEngine.submit", "BlockPoolBatchEngine.step", "CompletedGeneration")
def _(w):
    uid = w.engine.submit("a", "Hello")  # max_tokens defaults to 256
    (done,) = list(w.engine.step())
    assert (
        isinstance(done, blockpool.CompletedGeneration) and done.uid == uid and done.finish_reason in ("stop", "length")
    )
    w.pool.release(done.blocks)


@row("BlockPoolBatchEngine.stream", "GenerationEvent")
def _(w):
    w.engine.submit("a", [5, 6, 7], max_tokens=3)
    events = list(w.engine.stream())
    assert all(isinstance(e, blockpool.GenerationEvent) for e in events) and events[-1].completion is not None
    w.pool.release(events[-1].completion.blocks)


@row("BlockPoolBatchEngine.tick")
def _(w):
    w.engine.submit("a", [5, 6, 7], max_tokens=2)
    events = w.tick_until_done(w.engine)
    assert [e.token for e in events if e.token is not None]
    w.pool.release(events[-1].completion.blocks)


@row("BlockPoolBatchEngine.cancel")
def _(w):
    uid = w.engine.submit("a", [5, 6, 7], max_tokens=50)
    assert w.engine.cancel(uid) is True
    (done,) = list(w.engine.step())
    assert done.finish_reason == "cancelled"


@row("BlockPoolBatchEngine.check_request")
def _(w):
    assert w.engine.check_request("a") == []


@row("BlockPoolBatchEngine.waiting_uids", "BlockPoolBatchEngine.request_tokens", "BlockPoolBatchEngine.request_state")
def _(w):
    uid = w.engine.submit("a", [5, 6, 7], max_tokens=5)
    assert w.engine.waiting_uids() == [uid]
    assert w.engine.request_tokens(uid) == 3
    assert w.engine.request_state(uid).state == "waiting"
    list(w.engine.step())
    assert w.engine.request_state(uid) is None  # ended


@row("BlockPoolBatchEngine.stats")
def _(w):
    with w.engine.stats() as stats:
        w.engine.submit("a", [5, 6, 7], max_tokens=3)
        (done,) = list(w.engine.step())
    assert stats.generation_tokens == 3 and stats.prompt_tokens == 2  # as mlx-lm counts: not the last prompt token
    w.pool.release(done.blocks)


@row("BlockPoolBatchEngine.settle")
def _(w):
    w.engine.submit("a", [5, 6, 7], max_tokens=3)
    assert len(w.engine.tick()) == 0  # admitted and prefilling
    w.engine.settle()  # another thread could drive from here on
    done = list(w.engine.step())
    assert [c.finish_reason for c in done] in (["length"], ["stop"])
    w.pool.release(done[0].blocks)


@row("BlockPoolBatchEngine.close")
def _(w):
    w.engine.submit("a", [5, 6, 7], max_tokens=50)
    w.engine.close()
    assert w.engine.in_flight == 0 and w.pool.used_blocks() == 0


@row("BlockPoolBatchEngine.tokenize")
def _(w):
    assert w.engine.tokenize("Hello") == w.tokenizer.encode("Hello")


@row("BlockPoolBatchEngine.request_bytes", "BlockPoolBatchEngine.fits_ever")
def _(w):
    small, huge = w.engine.request_bytes(0, 10, 10), w.engine.request_bytes(0, 10, 10**6)
    assert 0 < small < huge
    assert w.engine.fits_ever(0, 10, 10) is True and w.engine.fits_ever(0, 10, 10**6) is False


# ------------------------------------------------------------------ store


@row("AgentMemory")
def _(w):
    memory = AgentMemory(w.engine)
    assert memory.cache_dir is None and memory.where("x") == "none"


@row("AgentMemory.submit", "AgentMemory.step")
def _(w):
    uid = w.memory.submit("a", "Hello")
    (done,) = list(w.memory.step())
    assert done.uid == uid and done.cache_source == "cold" and done.generation_tokens > 0


@row("AgentMemory.stream")
def _(w):
    w.memory.submit("a", [5, 6, 7], max_tokens=3)
    assert [e.token for e in w.memory.stream() if e.token is not None]


@row("AgentMemory.tick")
def _(w):
    w.memory.submit("a", [5, 6, 7], max_tokens=2)
    events = w.tick_until_done(w.memory)
    assert events[-1].completion.cache_source == "cold"


@row("AgentMemory.cancel")
def _(w):
    uid = w.memory.submit("a", [5, 6, 7], max_tokens=50)
    assert w.memory.cancel(uid) is True
    assert [d.finish_reason for d in w.memory.step()] == ["cancelled"]


@row("AgentMemory.where", "AgentMemory.agents")
def _(w):
    w.hot_agent()
    assert w.memory.where("a") == "pool"
    (info,) = w.memory.agents()
    assert (info.agent_id, info.where, info.tokens) == ("a", "pool", 8)


@row("AgentMemory.shared_tokens")
def _(w):
    prompt = list(range(5, 45))
    assert w.memory.shared_tokens(prompt) == 0  # nothing held yet
    w.memory.submit("a", prompt, max_tokens=2)
    list(w.memory.step())
    # Another agent's prompt that starts with the same 30 tokens takes them (a part of a block).
    assert w.memory.shared_tokens(prompt[:30] + [3, 3, 3]) == 30


@row("AgentMemory.spill", "AgentMemory.forget", "AgentMemory.file_bytes")
def _(w):
    w.hot_agent()
    assert w.memory.spill("a") is True and w.memory.where("a") == "disk"
    (size,) = w.memory.file_bytes().values()
    assert size == next(p for p in w.memory.cache_dir.glob("*.safetensors")).stat().st_size
    w.memory.forget("a")
    assert w.memory.where("a") == "none"


@row("AgentMemory.flush", "AgentMemory.wait_durable")
def _(w):
    w.hot_agent()
    assert w.memory.flush() == 1 and w.memory.wait_durable() is True
    assert len(list(w.memory.cache_dir.glob("*.safetensors"))) == 1


@row("AgentMemory.close")
def _(w):
    w.hot_agent()
    w.memory.close()
    assert w.pool.used_blocks() == 0 and len(list(w.memory.cache_dir.glob("*.safetensors"))) == 1


@row("AgentMemory.stats", "MemoryStats")
def _(w):
    w.hot_agent()
    stats = w.memory.stats()
    assert isinstance(stats, blockpool.MemoryStats) and stats.hot_agents == 1 and stats.used_blocks > 0


@row("AgentMemory.tokenize")
def _(w):
    assert w.memory.tokenize([{"role": "user", "content": "hi"}]) == w.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )


# ------------------------------------------------------------------ pool


@row("BlockPool")
def _(w):
    pool = BlockPool(w.spec)
    assert pool.total_bytes > 0


@row("BlockPool.bytes_per_block")
def _(w):
    assert w.pool.bytes_per_block(0) == w.spec.bytes_per_block(0) > 0


@row("BlockPool.available_blocks", "BlockPool.used_blocks", "BlockPool.allocate", "BlockPool.free")
def _(w):
    free = w.pool.available_blocks()
    blocks = w.pool.allocate(2, 0, "a")
    assert (
        [b.layer_id for b in blocks] == [0, 0] and w.pool.used_blocks() == 2 and w.pool.available_blocks() == free - 2
    )
    w.pool.free(blocks, "a")
    assert w.pool.used_blocks() == 0


@row("BlockPool.refcount", "BlockPool.share", "BlockPool.holds")
def _(w):
    (block,) = w.pool.allocate(1, 1, "a")
    assert w.pool.refcount(block) == 1 and w.pool.holds("a", [block]) and not w.pool.holds("b", [block])
    w.pool.share([block], "b")
    assert w.pool.refcount(block) == 2 and w.pool.holds("b", [block])


@row("BlockPool.generation", "BlockPool.is_live")
def _(w):
    handle = w.completion().blocks
    block = handle.blocks[0][0]
    generation = w.pool.generation(block)
    assert generation >= 0 and w.pool.is_live(block, generation) and not w.pool.is_live(block, generation + 1)
    w.pool.release(handle)
    assert not w.pool.is_live(block, generation)  # freed, and not kept as cacheable


@row("BlockPool.reserve", "BlockPool.release")
def _(w):
    blocks = w.pool.reserve({0: 1, 1: 2}, "a")
    assert {k: len(v) for k, v in blocks.items()} == {0: 1, 1: 2}
    w.pool.release(w.completion().blocks)
    w.pool.free([b for bs in blocks.values() for b in bs], "a")
    assert w.pool.used_blocks() == 0


@row("BlockPool.stats", "PoolStats", "AgentUsage")
def _(w):
    done = w.completion()
    stats = w.pool.stats()
    assert isinstance(stats, blockpool.PoolStats) and isinstance(stats.agents["a"], blockpool.AgentUsage)
    assert stats.agents["a"].blocks == done.blocks.num_blocks > 0


@row("BlockPool.add_reclaimer", "BlockPool.remove_reclaimer", "BlockPool.make_room")
def _(w):
    asked = []
    reclaimer = lambda missing: asked.append(missing) or 0  # noqa: E731 - frees nothing, records the request
    w.pool.add_reclaimer(reclaimer)
    assert w.pool.make_room(1) is True and asked == []  # room already
    assert w.pool.make_room(w.pool.total_bytes + 1) is False and asked == [1]
    w.pool.remove_reclaimer(reclaimer)
    w.pool.make_room(w.pool.total_bytes + 1)
    assert asked == [1]


@row("BlockPool.charge", "BlockPool.working_bytes")
def _(w):
    owner = object()
    assert w.pool.charge(owner, 4096) is True and w.pool.working_bytes() == 4096
    assert w.pool.charge(owner, 0) is True and w.pool.working_bytes() == 0


@row("BlockPool.transient")
def _(w):
    with w.pool.transient(4096):
        assert w.pool.stats().transient_bytes == 4096
    assert w.pool.stats().transient_bytes == 0


@row("BlockPool.begin_release", "BlockPool.end_release", "BlockPool.wait_for_release")
def _(w):
    w.pool.begin_release(100)
    assert w.pool.releasing_bytes == 100
    w.pool.end_release(100)
    w.pool.wait_for_release(0.01)
    assert w.pool.releasing_bytes == 0


@row("BlockPool.mark_cacheable", "BlockPool.drop_cached")
def _(w):
    handle = w.completion().blocks
    block = handle.blocks[0][0]
    w.pool.mark_cacheable([block])
    w.pool.release(handle)
    assert w.pool.stats().cached_free_blocks == 1 and w.pool.is_live(block, w.pool.generation(block))
    assert w.pool.drop_cached() == 1 and w.pool.stats().cached_free_blocks == 0


@row("BlockPool.block_arrays")
def _(w):
    handle = w.completion().blocks
    (arrays,) = w.pool.block_arrays({0: handle.blocks[0][:1]})[0]
    keys, _ = w.pool.read({0: handle.blocks[0][:1]})[0]
    assert mx.array_equal(arrays["k"], keys[0]).item()  # the block's own array: what read copies
    w.pool.release(handle)


@row("BlockPool.take_data", "BlockPool.put_data")
def _(w):
    handle = w.completion().blocks
    block = handle.blocks[0][-1]
    planes = w.pool.take_data(block, "a")  # written in place by its only holder; unreadable meanwhile
    with pytest.raises(BlockOperationError):
        w.pool.block_arrays({0: [block]})
    w.pool.put_data(block, planes)
    (stored,) = w.pool.block_arrays({0: [block]})[0]
    assert stored["k"] is planes["k"]
    w.pool.release(handle)


@row("BlockPool.is_current")
def _(w):
    first = w.completion(max_tokens=2).blocks
    assert w.pool.is_current(first)
    w.engine.submit("a", [5, 6], cache=first, max_tokens=2)
    (done,) = list(w.engine.step())
    assert w.pool.is_current(done.blocks) and not w.pool.is_current(first)  # the older handle is stale


@row("BlockPool.new_handle_generation")
def _(w):
    first = w.pool.new_handle_generation()
    assert w.pool.new_handle_generation() > first


@row("BlockPool.check_invariants")
def _(w):
    w.completion()
    assert w.pool.check_invariants() is None


@row("BlockPool.read", "BlockPool.read_planes", "BlockPool.write", "BlockPool.write_planes", "BlockWrite")
def _(w):
    g = w.spec.layers[0].geometry
    (block,) = w.pool.allocate(1, 0, "a")
    keys = mx.random.normal((1, g.kv_heads, 10, g.k_head_dim)).astype(g.mx_dtype)
    values = mx.random.normal((1, g.kv_heads, 10, g.v_head_dim)).astype(g.mx_dtype)
    w.pool.write([BlockWrite(0, [block], keys, values)])
    k, v = w.pool.read({0: [block]})[0]
    assert mx.array_equal(k[..., :10, :], keys).item() and mx.array_equal(v[..., :10, :], values).item()
    planes = w.pool.read_planes({0: [block]})[0]
    w.pool.write_planes([(0, [block], {"k": planes["k"][..., :10, :] * 2, "v": planes["v"][..., :10, :]}, 0)])
    assert mx.array_equal(w.pool.read({0: [block]})[0][0][..., :10, :], keys * 2).item()


# ------------------------------------------------------------------ blocks and layout


@row("KVBlock")
def _(w):
    assert KVBlock(1, 7) == KVBlock(layer_id=1, block_id=7)


@row("AgentBlocks", "AgentBlocks.empty")
def _(w):
    handle = AgentBlocks("a", w.spec, {i: [] for i in range(w.spec.num_layers)}, 0, [])
    assert handle.num_blocks == 0 and AgentBlocks.empty("a", w.spec) == handle


@row("AgentBlocks.check", "AgentBlocks.first_block", "AgentBlocks.valid_start", "AgentBlocks.all_blocks")
def _(w):
    handle = w.completion(n=300).blocks
    assert handle.check() is None
    assert handle.first_block(0) == 0 and handle.valid_start(0) == 0
    assert len(list(handle.all_blocks())) == handle.num_blocks == 2 * w.spec.num_layers


@row("Geometry", "Geometry.planes", "Geometry.bytes_per_block")
def _(w):
    g = Geometry(2, 16, 8, "float16")
    assert g.planes() == {"k": (16, "float16"), "v": (8, "float16")}
    assert g.bytes_per_block() == 2 * 256 * (16 + 8) * 2


@row("LayerSpec", "Geometry.token_bytes")
def _(w):
    layer = LayerSpec(Geometry(2, 16, 16, "float32"))
    assert layer.attention == "full" and layer.window is None
    assert layer.geometry.token_bytes() == 2 * (16 + 16) * 4


@row(
    "StateGeometry",
    "StateGeometry.planes",
    "StateGeometry.bytes_per_block",
    "StateGeometry.token_bytes",
    "BlockPool.write_states",
    "BlockPool.read_states",
)
def _(w):
    from blockpool.kinds import RecurrentState

    geometry = StateGeometry(((3, 8), None), ("float32", None))
    assert geometry.planes() == {"s0": ((3, 8), "float32")} and geometry.bytes_per_block() == 96
    assert geometry.token_bytes() == 0
    pool = BlockPool(ModelCacheSpec((LayerSpec(geometry, kind=RecurrentState(2)),)), num_blocks=4)
    (block,) = pool.allocate(1, 0, "s")
    state = [mx.ones((3, 8)), None]
    pool.write_states([(0, [block], [state])])
    (got,) = pool.read_states({0: [block]})[0]
    assert mx.array_equal(got[0], state[0]).item() and got[1] is None
    pool.free([block], "s")


@row("ModelCacheSpec.assemble", "ModelCacheSpec.disassemble")
def _(w):
    caches = w.spec.assemble([w.spec.kind(i).new_cache() for i in range(w.spec.num_layers)])
    assert len(caches) == w.spec.model_layers and w.spec.disassemble(caches) == caches


@row("ModelCacheSpec", "ModelCacheSpec.to_dict", "ModelCacheSpec.from_dict")
def _(w):
    spec = ModelCacheSpec(
        (LayerSpec(Geometry(2, 16, 16, "float32")), LayerSpec(Geometry(2, 16, 16, "float32"), window=32))
    )
    assert spec.num_layers == 2 and ModelCacheSpec.from_dict(spec.to_dict()) == spec


@row(
    "ModelCacheSpec.from_model",
    "ModelCacheSpec.geometry_index",
    "ModelCacheSpec.layers_of",
    "ModelCacheSpec.rules",
    "ModelCacheSpec.kind",
)
def _(w):
    spec = ModelCacheSpec.from_model(w.model)
    assert spec == w.spec and spec.geometry_index(1) == 0 and spec.layers_of(0) == [0, 1]
    assert spec.rules(0).name == "full" and spec.kind(0) is spec.rules(0)


@row(
    "ModelCacheSpec.bytes_per_block",
    "ModelCacheSpec.max_blocks",
    "ModelCacheSpec.blocks_held",
    "ModelCacheSpec.block_range",
    "ModelCacheSpec.bytes_for_tokens",
)
def _(w):
    spec = w.spec
    assert spec.bytes_per_block(0) > 0 and spec.max_blocks(0) is None
    assert spec.blocks_held(0, 300) == 2 and spec.block_range(0, 300) == (0, 2)
    assert spec.bytes_for_tokens(300) == 2 * 2 * spec.bytes_per_block(0)


# ------------------------------------------------------------------ conversion


def _mlx_lm_caches(w, tokens):
    caches = make_prompt_cache(w.model)
    w.model(mx.array([tokens]), cache=caches)
    mx.eval([c.state for c in caches])
    return caches


@row("to_mlx_caches")
def _(w):
    handle = w.completion(n=30, max_tokens=2).blocks
    caches = blockpool.to_mlx_caches(w.pool, handle)
    assert len(caches) == w.spec.num_layers and all(c.offset == handle.total_tokens for c in caches)


@row("from_mlx_caches")
def _(w):
    tokens = list(range(3, 40))
    caches = _mlx_lm_caches(w, tokens)
    handle = blockpool.from_mlx_caches(w.pool, caches, tokens, AgentBlocks.empty("a", w.spec))
    back = blockpool.to_mlx_caches(w.pool, handle)
    assert handle.total_tokens == len(tokens)
    assert all(
        mx.array_equal(a.state[0][..., : len(tokens), :], b.state[0][..., : len(tokens), :]).item()
        for a, b in zip(caches, back)
    )


@row("plan_extension", "extend_blocks")
def _(w):
    tokens = list(range(3, 40))
    caches = _mlx_lm_caches(w, tokens)
    base = AgentBlocks.empty("a", w.spec)
    plans = blockpool.plan_extension(w.pool, base, len(tokens))
    assert [p.fresh for p in plans] == [1] * w.spec.num_layers
    sources = {i: (c.keys[..., : len(tokens), :], c.values[..., : len(tokens), :], 0) for i, c in enumerate(caches)}
    handle = blockpool.extend_blocks(w.pool, base, plans, sources, tokens)
    assert handle.total_tokens == len(tokens) and handle.num_blocks == w.spec.num_layers


@row("truncate")
def _(w):
    handle = w.completion(n=300, max_tokens=2).blocks
    cut = blockpool.truncate(w.pool, handle, 100)
    assert cut.total_tokens == 100 and cut.num_blocks == w.spec.num_layers  # the second block of each layer freed


# ------------------------------------------------------------------ native ops against the reference


@row("gather_blocks", "ops.gather_blocks", "reference.gather_blocks")
def _(w):
    pools, ids = w.kv_pools(), [[4, 1], [0]]
    for got, want in zip(blockpool.gather_blocks(pools, ids), reference.gather_blocks(pools, ids)):
        assert mx.array_equal(got, want).item() and got.shape[2] in (512, 256)
    assert all(
        mx.array_equal(a, b).item() for a, b in zip(ops.gather_blocks(pools, ids), reference.gather_blocks(pools, ids))
    )


@row("scatter_blocks", "ops.scatter_blocks", "reference.scatter_blocks")
def _(w):
    pools, ids = w.kv_pools(), [[2], [5, 3]]
    sources = [mx.ones((1, 2, 256, 16)), mx.full((1, 2, 512, 8), 3.0)]
    want = reference.scatter_blocks(pools, ids, sources)
    for fn in (blockpool.scatter_blocks, ops.scatter_blocks):
        got = fn(w.kv_pools(), ids, sources)
        assert all(mx.array_equal(a, b).item() for a, b in zip(got, want))
    assert mx.array_equal(want[1][3], mx.full((2, 256, 8), 3.0)).item()


def _quantized(shape_blocks, bits=4, group=64):
    x = mx.random.normal(shape_blocks, key=mx.random.key(3))
    return mx.quantize(x, group_size=group, bits=bits)


@row("ops.gather_dequantize_blocks", "reference.gather_dequantize_blocks")
def _(w):
    packed, scales, biases = _quantized((4, 2, 256, 64))
    args = ([packed], [scales], [biases], [[3, 0]])
    got, want = ops.gather_dequantize_blocks(*args), reference.gather_dequantize_blocks(*args)
    assert mx.array_equal(got[0], want[0]).item() and got[0].shape == (1, 2, 512, 64)


@row("ops.concat_blocks", "reference.concat_blocks")
def _(w):
    blocks = [[mx.ones((2, 256, 16)), mx.zeros((2, 256, 16))]]
    got, want = ops.concat_blocks(blocks), reference.concat_blocks(blocks)
    assert mx.array_equal(got[0], want[0]).item() and got[0].shape == (1, 2, 512, 16)


@row("ops.concat_dequantize_blocks", "reference.concat_dequantize_blocks")
def _(w):
    packed, scales, biases = _quantized((2, 2, 256, 64))
    args = ([[packed[0], packed[1]]], [[scales[0], scales[1]]], [[biases[0], biases[1]]])
    got, want = ops.concat_dequantize_blocks(*args), reference.concat_dequantize_blocks(*args)
    assert mx.array_equal(got[0], want[0]).item() and got[0].shape == (1, 2, 512, 64)


@row("ops.split_blocks", "reference.split_blocks")
def _(w):
    sources, offsets, heads = [mx.arange(2 * 300 * 4, dtype=mx.float32).reshape(1, 2, 300, 4)], [0], [None]
    got, want = ops.split_blocks(sources, offsets, heads), reference.split_blocks(sources, offsets, heads)
    assert len(got[0]) == len(want[0]) == 2 and all(mx.array_equal(a, b).item() for a, b in zip(got[0], want[0]))


@row("ops.paged_attention", "reference.paged_attention")
def _(w):
    blocks = [mx.random.normal((2, 256, 16), key=mx.random.key(i)) for i in range(2)]
    queries = mx.random.normal((1, 4, 1, 16), key=mx.random.key(9))
    args = (queries, blocks, blocks, [[0, 1]], [300])
    got = ops.paged_attention(*args, scale=0.25)
    want = reference.paged_attention(*args, [299], 0.25)
    assert got.shape == (1, 4, 1, 16) and mx.array_equal(got, want).item()


@row("ops.write_tokens", "reference.write_tokens")
def _(w):
    source = mx.random.normal((1, 2, 3, 16), key=mx.random.key(4))
    writes = [(0, None, 0, 0, 3, 5)]
    (got,), (want,) = ops.write_tokens([source], writes), reference.write_tokens([source], writes)
    assert got.shape == (2, 256, 16) and mx.array_equal(got, want).item()


@row("ops.ensure_cache_limit")
def _(w):
    assert ops.ensure_cache_limit(1 << 20) >= 1 << 20


@row("ops.backend")
def _(w):
    assert ops.backend() is not None


@row("ops.verify")
def _(w):
    assert ops.verify() == dict.fromkeys(ops.OPS, "ok")


# ------------------------------------------------------------------ prompts


@row("prompt.to_token_ids", "prompt.encode_text", "prompt.as_id_list", "prompt.vocab_size_of")
def _(w):
    assert (
        prompt.to_token_ids(w.tokenizer, "Hello")
        == prompt.encode_text(w.tokenizer, "Hello")
        == w.tokenizer.encode("Hello")
    )
    assert prompt.as_id_list(mx.array([3, 4])) == [3, 4] and prompt.vocab_size_of(w.model) == 512


@row("prompt.is_chat", "prompt.chat_messages", "prompt.render_chat")
def _(w):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hi"}]}]
    assert prompt.is_chat(messages) and not prompt.is_chat("hi")
    assert prompt.chat_messages(messages) == [{"role": "user", "content": "hi"}]
    assert prompt.render_chat(w.tokenizer, messages) == w.tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], add_generation_prompt=True
    )


# ------------------------------------------------------------------ agent files


@row(
    "persistence.agent_file_name",
    "persistence.model_fingerprint",
    "persistence.export_agent",
    "persistence.save_agent_file",
    "persistence.load_agent_file",
    "persistence.load_agent_header",
    "persistence.import_agent",
    "persistence.read_header",
    "persistence.open_agent_file",
)
def _(w):
    handle = w.completion(n=60).blocks
    path = w.tmp / persistence.agent_file_name("a")
    fingerprint = persistence.model_fingerprint(w.model, w.spec)
    assert (
        persistence.save_agent_file(path, persistence.export_agent(w.pool, handle, fingerprint)) == path.stat().st_size
    )
    file = persistence.load_agent_file(path)
    assert file.token_ids == handle.token_ids and file.fingerprint == fingerprint
    header = persistence.load_agent_header(path)  # verified, its data left on disk
    assert header.token_ids == handle.token_ids and not header.has_data and header.nbytes == 0
    w.pool.release(handle)
    back = persistence.import_agent(w.pool, file)
    assert back.total_tokens == handle.total_tokens
    _, metadata, _ = persistence.read_header(path)
    f, size = persistence.open_agent_file(path)
    with f:
        assert size == path.stat().st_size and metadata["format"] == "blockpool-agent"


@row("persistence.quarantine", "persistence.remove_stale_temp_files", "persistence.describe_cache_dir")
def _(w):
    w.tmp.joinpath("x.safetensors").write_bytes(b"junk")
    (report,) = persistence.describe_cache_dir(w.tmp)
    assert report.kind == "corrupt"
    moved = persistence.quarantine(w.tmp / "x.safetensors")
    assert moved.read_bytes() == b"junk"
    stale = w.tmp / ".x.safetensors.999999999.1.tmp"
    stale.write_bytes(b"")
    os.utime(stale, (0, 0))
    assert persistence.remove_stale_temp_files(w.tmp) == [stale.name]


# ------------------------------------------------------------------ errors


ERRORS = [
    n
    for n in blockpool.__all__
    if inspect.isclass(getattr(blockpool, n)) and issubclass(getattr(blockpool, n), BaseException)
]


@row(*ERRORS)
def _(w):
    for name in ERRORS:
        cls = getattr(blockpool, name)
        try:
            parameters = inspect.signature(cls).parameters.values()
        except ValueError:  # Exception's own __init__: no signature, nothing required
            parameters = []
        required = [p for p in parameters if p.default is p.empty and p.kind is p.POSITIONAL_OR_KEYWORD]
        error = cls(*[3] * len(required)) if required else cls("what went wrong")
        assert isinstance(error, BlockPoolError) and str(error), name


# ------------------------------------------------------------------ the tests


def public_callables() -> set[str]:
    names = set()
    for name in blockpool.__all__:
        obj = getattr(blockpool, name)
        if inspect.ismodule(obj) or not callable(obj):
            continue
        names.add(name)
        if inspect.isclass(obj) and not issubclass(obj, BaseException):
            # Methods a blockpool class defines or takes from a blockpool base (BlockPool's budget methods).
            members = {}
            for klass in reversed(inspect.getmro(obj)):
                if klass.__module__.startswith("blockpool"):
                    members.update(vars(klass))
            for attr, value in members.items():
                if not attr.startswith("_") and (
                    inspect.isfunction(value) or isinstance(value, (classmethod, staticmethod))
                ):
                    names.add(f"{name}.{attr}")
    for module, functions in DOCUMENTED.items():
        names |= {f"{module}.{f}" for f in functions}
    return names


def test_the_table_covers_the_api():
    api = public_callables()
    assert not sorted(api - set(CALLS)), f"public callables without a row in CALLS: {sorted(api - set(CALLS))}"
    gone = sorted(set(CALLS) - api)
    assert not gone, f"rows for names that are no longer public: {gone}"
    for module, functions in DOCUMENTED.items():
        assert all(callable(getattr(MODULES[module], f)) for f in functions), module


@pytest.mark.parametrize(
    "names, check",
    ROWS,
    ids=[" ".join(names) if len(names) < 3 else f"{names[0]} +{len(names) - 1}" for names, _ in ROWS],
)
def test_called_with_only_required_arguments(names, check, w, request):
    waiting = [WAITING[n] for n in names if n in WAITING]
    if waiting:
        request.applymarker(pytest.mark.xfail(strict=True, reason="; ".join(waiting)))
    check(w)
