"""The block pool: every byte of KV the engine holds, under one budget.

Storage is elastic. Each block is its own small MLX array per plane,
``[H, B, d]``, made when the block is first written and dropped when its
last holder frees it, so the memory the pool really uses is the memory it
accounts. The budget (``memory_bytes``) bounds the sum of

- **blocks**: every allocated block, whether held by agents or freed but
  kept findable for its prefix (the *cached-free* queue, least recently
  freed first, as vLLM's free queue);
- **working**: bytes the engine's running batch holds outside blocks (its
  contiguous caches), charged per owner;
- **transient**: bytes of a copy in progress, charged around it.

When an allocation or a charge does not fit, cached-free blocks are dropped
(oldest first), then the registered reclaimers are asked (``AgentMemory``
spills idle agents), and only then is the request refused. Bookkeeping is
under one lock, so submit and step may run on different threads. Blocks
are immutable arrays: a write makes new arrays and swaps them in, so a
reader never sees a half-written block and no write depends on buffer
donation.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx

from blockpool import ops
from blockpool.block import AgentBlocks, KVBlock
from blockpool.errors import (
    BlockOperationError,
    InvalidRequestError,
    PoolExhaustedError,
)
from blockpool.spec import Geometry, ModelCacheSpec

#: The budget of a pool given neither a block count nor a byte count.
DEFAULT_MEMORY_BYTES = 1 << 30

Reclaimer = Callable[[int], int]
"""Called with the bytes the pool lacks; frees what it can (now or soon) and returns the bytes it freed now."""


@dataclass(frozen=True)
class AgentUsage:
    """Blocks and bytes one agent holds (a shared block counts for each holder)."""

    blocks: int
    bytes: int


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool's accounting. Physical totals count a shared block once.

    ``used_bytes`` is everything charged to the budget: ``block_bytes``
    (held and cached-free blocks) plus ``working_bytes`` plus
    ``transient_bytes``. ``used_blocks``/``free_blocks`` express the same
    in blocks of the pool's unit (``total_bytes / total_blocks``).
    """

    total_blocks: int
    free_blocks: int
    used_blocks: int
    shared_blocks: int
    total_bytes: int
    used_bytes: int
    agents: dict[str, AgentUsage]
    block_bytes: int = 0
    working_bytes: int = 0
    transient_bytes: int = 0
    cached_free_blocks: int = 0


@dataclass
class BlockWrite:
    """Tokens to write into one layer's blocks.

    ``keys``/``values`` are ``[1, H, T, D]``; their token 0 lands at position
    ``offset`` of ``blocks[0]``, and later tokens run on through the blocks.
    """

    layer_id: int
    blocks: Sequence[KVBlock]
    keys: mx.array
    values: mx.array
    offset: int = 0


class BlockPool:
    """Owns the KV memory of every agent, in fixed-size blocks, under one byte budget.

    Args:
        spec: The model cache layout, from :meth:`ModelCacheSpec.from_model`.
        num_blocks: The budget as a block count, split between geometries
            by layer count.
        memory_bytes: The budget in bytes: the ceiling of all KV memory the
            pool and the engine on it hold (blocks, working caches, copies).
            Give one of the two; with neither, the budget is
            ``DEFAULT_MEMORY_BYTES`` (1 GiB).
        kv_bits: Store blocks quantized: 8 or 4 bits (``mx.quantize``,
            affine), or None for the model's dtype. Writes quantize the new
            tokens; reads dequantize in the same native pass that gathers.
        kv_group_size: Quantization group along the head dim: 32, 64 or 128.
    """

    def __init__(
        self,
        spec: ModelCacheSpec,
        num_blocks: int | None = None,
        memory_bytes: int | None = None,
        *,
        kv_bits: int | None = None,
        kv_group_size: int = 64,
    ):
        if not isinstance(spec, ModelCacheSpec):
            raise InvalidRequestError(f"spec must be a ModelCacheSpec, got {type(spec).__name__}")
        if num_blocks is not None and memory_bytes is not None:
            raise InvalidRequestError("give one of num_blocks and memory_bytes, not both")
        if num_blocks is None and memory_bytes is None:
            memory_bytes = DEFAULT_MEMORY_BYTES
        if kv_bits not in (None, 4, 8):
            raise InvalidRequestError(f"kv_bits must be None, 8 or 4, got {kv_bits!r}")
        if kv_group_size not in (32, 64, 128):
            raise InvalidRequestError(f"kv_group_size must be 32, 64 or 128, got {kv_group_size!r}")
        if kv_bits is not None:
            for g in spec.geometries:
                if g.k_head_dim % kv_group_size or g.v_head_dim % kv_group_size:
                    raise InvalidRequestError(
                        f"head dims {g.k_head_dim}/{g.v_head_dim} are not multiples of kv_group_size={kv_group_size}"
                    )
        for value, name in ((num_blocks, "num_blocks"), (memory_bytes, "memory_bytes")):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")
        self.spec = spec
        self.id = uuid.uuid4().hex
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.block_tokens = spec.block_tokens
        self._lock = threading.RLock()
        self._geometry_bytes = [self._bytes_of(g) for g in spec.geometries]
        self._layer_bytes = [self._geometry_bytes[spec.geometry_index(i)] for i in range(spec.num_layers)]
        layer_counts = [len(spec.layers_of(g)) for g in range(len(spec.geometries))]
        row_bytes = sum(n * b for n, b in zip(layer_counts, self._geometry_bytes))
        if memory_bytes is not None:
            rows = memory_bytes // row_bytes
            if rows < 1:
                raise InvalidRequestError(f"memory_bytes={memory_bytes} is less than one block per layer ({row_bytes} bytes)")
            self.total_bytes = int(memory_bytes)
            self.total_blocks = rows * spec.num_layers
            self._shares = [rows * n for n in layer_counts]
        else:
            self._shares = _split(num_blocks, layer_counts)
            self.total_blocks = int(num_blocks)
            self.total_bytes = sum(n * b for n, b in zip(self._shares, self._geometry_bytes))

        # Per block id: its layer, refcount (0 = cached-free), generation, data.
        self._layer: dict[int, int] = {}
        self._refs: dict[int, int] = {}
        self._generation: dict[int, int] = {}
        self._data: dict[int, dict[str, mx.array]] = {}
        self._cacheable: set[int] = set()
        self._cached: OrderedDict[int, None] = OrderedDict()  # cached-free, least recently freed first
        self._ids = itertools.count()
        self._free_ids: list[int] = []
        self._held: dict[str, set[int]] = {}
        self._block_bytes = 0
        self._working: dict[object, int] = {}
        self._transient = 0
        self._reclaimers: list[Reclaimer] = []
        self._releasing = 0
        self._released = threading.Condition(self._lock)
        self._handle_generation = itertools.count(1)
        self._current: dict[str, int] = {}  # agent -> generation of its newest handle
        self._zero_blocks: dict[int, dict[str, mx.array]] = {}
        ops.ensure_cache_limit(min(self.total_bytes, 1 << 30))

    # ------------------------------------------------------------ accounting

    def _bytes_of(self, geometry: Geometry) -> int:
        return geometry.bytes_per_block(self.block_tokens, self.kv_bits, self.kv_group_size)

    def bytes_per_block(self, layer_id: int) -> int:
        """Bytes one block of a layer takes, as stored."""
        self._check_layer(layer_id)
        return self._layer_bytes[layer_id]

    @property
    def plane_names(self) -> list[str]:
        """The arrays each block is stored in (the same for every geometry)."""
        return list(self.spec.geometries[0].planes(self.kv_bits, self.kv_group_size))

    @property
    def used_bytes(self) -> int:
        """Everything charged to the budget: blocks, working and transient bytes."""
        with self._lock:
            return self._block_bytes + sum(self._working.values()) + self._transient

    @property
    def free_bytes(self) -> int:
        """Bytes that could be charged now, counting cached-free blocks as reclaimable."""
        with self._lock:
            cached = sum(self._layer_bytes[self._layer[i]] for i in self._cached)
            return self.total_bytes - self.used_bytes + cached

    def _blocks_in(self, nbytes: int) -> int:
        return max(0, nbytes) * self.total_blocks // self.total_bytes

    def available_blocks(self, geometry: int | None = None) -> int:
        """Blocks that could be allocated now: of one geometry, or in the pool's unit."""
        free = self.free_bytes
        if geometry is not None:
            return free // self._geometry_bytes[geometry]
        return self._blocks_in(free)

    def used_blocks(self, agent_id: str | None = None) -> int:
        """Budget in use in blocks (the pool's unit), or the blocks one agent holds."""
        with self._lock:
            if agent_id is None:
                return self.total_blocks - self.available_blocks()
            return len(self._held.get(agent_id, ()))

    def refcount(self, block: KVBlock) -> int:
        """How many agents hold a block (0 when free or cached-free)."""
        with self._lock:
            return self._refs.get(self._key(block), 0)

    def generation(self, block: KVBlock) -> int:
        """A counter bumped whenever a block is allocated or written: an index
        entry that remembers it can tell that the block's tokens changed."""
        with self._lock:
            return self._generation.get(self._key(block), -1)

    def is_live(self, block: KVBlock, generation: int) -> bool:
        """Whether a block still holds the tokens it held at ``generation``
        (held, or freed but still cached)."""
        with self._lock:
            key = block.block_id
            return self._layer.get(key) == block.layer_id and self._generation.get(key) == generation and key in self._data

    def holds(self, agent_id: str, blocks: Iterable[KVBlock]) -> bool:
        """Whether the agent holds every one of ``blocks``."""
        with self._lock:
            held = self._held.get(agent_id, set())
            return all(self._layer.get(b.block_id) == b.layer_id and b.block_id in held for b in blocks)

    def stats(self) -> PoolStats:
        """A consistent snapshot of blocks and bytes in use, per agent and in total."""
        with self._lock:
            agents = {
                agent: AgentUsage(len(held), sum(self._layer_bytes[self._layer[i]] for i in held))
                for agent, held in self._held.items()
            }
            shared = sum(1 for r in self._refs.values() if r > 1)
            used_bytes = self.used_bytes
            free = self.available_blocks()
            return PoolStats(
                total_blocks=self.total_blocks,
                free_blocks=free,
                used_blocks=self.total_blocks - free,
                shared_blocks=shared,
                total_bytes=self.total_bytes,
                used_bytes=used_bytes,
                agents=agents,
                block_bytes=self._block_bytes,
                working_bytes=sum(self._working.values()),
                transient_bytes=self._transient,
                cached_free_blocks=len(self._cached),
            )

    def add_reclaimer(self, reclaimer: Reclaimer) -> None:
        """Register a callable that frees memory when the pool is short (see :data:`Reclaimer`)."""
        with self._lock:
            self._reclaimers.append(reclaimer)

    def remove_reclaimer(self, reclaimer: Reclaimer) -> None:
        """Unregister a reclaimer (no error if it was not registered)."""
        with self._lock:
            if reclaimer in self._reclaimers:
                self._reclaimers.remove(reclaimer)

    def make_room(self, nbytes: int, *, reclaim: bool = True) -> bool:
        """Try to make ``nbytes`` chargeable: drop cached-free blocks, then ask the reclaimers.

        Returns:
            Whether ``nbytes`` fit now. Reclaimers may also have started
            work (a spill being written) that frees memory later.
        """
        with self._lock:
            if self._fits(nbytes):
                return True
            if not reclaim:
                return False
            reclaimers = list(self._reclaimers)
        for reclaimer in reclaimers:
            with self._lock:
                missing = self.total_bytes - self.used_bytes - nbytes
                if missing >= 0:
                    return True
            reclaimer(-missing)
        with self._lock:
            return self._fits(nbytes)

    def _fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` fit, dropping cached-free blocks (oldest first) as needed. Lock held."""
        while self.total_bytes - self.used_bytes < nbytes and self._cached:
            self._drop(next(iter(self._cached)))
        return self.total_bytes - self.used_bytes >= nbytes

    # ------------------------------------------------------------ working and transient memory

    def charge(self, owner: object, nbytes: int, *, force: bool = False) -> bool:
        """Set the working bytes ``owner`` holds outside blocks; False (nothing changed) if they do not fit.

        Growing a charge may drop cached-free blocks; it never asks the
        reclaimers (call :meth:`make_room` first for that). Shrinking always
        succeeds. ``force`` records the charge even past the budget (memory
        that is already held: the pool then fits nothing new until it drops).
        """
        if nbytes < 0:
            raise InvalidRequestError(f"cannot charge {nbytes} bytes")
        with self._lock:
            current = self._working.get(owner, 0)
            if nbytes > current and not self._fits(nbytes - current) and not force:
                return False
            if nbytes:
                self._working[owner] = nbytes
            else:
                self._working.pop(owner, None)
            return True

    def working_bytes(self, owner: object | None = None) -> int:
        """Working bytes charged by one owner, or by all."""
        with self._lock:
            return sum(self._working.values()) if owner is None else self._working.get(owner, 0)

    @contextlib.contextmanager
    def transient(self, nbytes: int, *, force: bool = False) -> Iterator[None]:
        """Charge ``nbytes`` for the duration of a copy.

        Raises:
            PoolExhaustedError: They do not fit (unless ``force``: a copy that
                frees at least as much as it takes, e.g. a write-back, may
                run over for its duration rather than fail).
        """
        with self._lock:
            if not self._fits(nbytes) and not force:
                raise PoolExhaustedError(self._blocks_in(nbytes), self.available_blocks(), "for a copy")
            self._transient += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._transient -= nbytes

    @property
    def releasing_bytes(self) -> int:
        """Bytes reclaimers have promised to free soon (a spill being written)."""
        with self._lock:
            return self._releasing

    def begin_release(self, nbytes: int) -> None:
        """A reclaimer announces memory it will free when background work ends."""
        with self._lock:
            self._releasing += nbytes

    def end_release(self, nbytes: int) -> None:
        """The announced work ended (the memory was freed, or will not be); wakes waiters."""
        with self._released:
            self._releasing -= nbytes
            self._released.notify_all()

    def wait_for_release(self, timeout: float) -> None:
        """Sleep until announced background work ends, or ``timeout`` seconds."""
        with self._released:
            if self._releasing:
                self._released.wait(timeout)

    # ------------------------------------------------------------ allocation

    def allocate(self, n: int, layer_id: int, agent_id: str) -> list[KVBlock]:
        """Allocate ``n`` blocks of one layer to an agent, all or nothing.

        Raises:
            PoolExhaustedError: The budget has no room for them; nothing was allocated.
        """
        return self.reserve({layer_id: n}, agent_id)[layer_id]

    def reserve(self, counts: Mapping[int, int], agent_id: str, *, force: bool = False) -> dict[int, list[KVBlock]]:
        """Allocate blocks for several layers in one all-or-nothing step.

        Args:
            counts: Blocks wanted per layer id.
            agent_id: The agent that will hold them.
            force: Allocate even past the budget (for a copy that frees more
                than it takes; the caller releases the excess at once).

        Raises:
            PoolExhaustedError: They do not fit; nothing was allocated.
        """
        _check_agent(agent_id)
        need = 0
        for layer_id, n in counts.items():
            self._check_layer(layer_id)
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise InvalidRequestError(f"cannot allocate {n!r} blocks")
            need += n * self._layer_bytes[layer_id]
        with self._lock:
            if not self._fits(need) and not force:
                requested = self._blocks_in(need) if len(counts) != 1 else sum(counts.values())
                available = self.available_blocks(self.spec.geometry_index(next(iter(counts)))) if len(counts) == 1 else self.available_blocks()
                raise PoolExhaustedError(requested, available)
            held = self._held.setdefault(agent_id, set())
            out: dict[int, list[KVBlock]] = {}
            for layer_id, n in counts.items():
                blocks = []
                for _ in range(n):
                    key = self._free_ids.pop() if self._free_ids else next(self._ids)
                    self._layer[key] = layer_id
                    self._refs[key] = 1
                    self._generation[key] = self._generation.get(key, 0) + 1
                    held.add(key)
                    blocks.append(KVBlock(layer_id, key))
                out[layer_id] = blocks
            self._block_bytes += need
            if not held:
                self._held.pop(agent_id, None)
            return out

    def share(self, blocks: Iterable[KVBlock], agent_id: str) -> None:
        """Give an agent a reference to blocks others hold, or that are cached-free (copy-on-write sharing).

        Raises:
            BlockOperationError: A block is free (and not cached), or the agent holds it already.
        """
        _check_agent(agent_id)
        with self._lock:
            keys = self._validated(blocks)
            held = self._held.get(agent_id, set())
            for key, block in keys.items():
                if self._refs.get(key, 0) == 0 and key not in self._cached:
                    raise BlockOperationError(f"cannot share {block}: it is free")
                if key in held:
                    raise BlockOperationError(f"agent {agent_id!r} already holds {block}")
            held = self._held.setdefault(agent_id, set())
            for key in keys:
                self._cached.pop(key, None)
                self._refs[key] = self._refs.get(key, 0) + 1
                held.add(key)

    def free(self, blocks: Iterable[KVBlock], agent_id: str) -> None:
        """Drop an agent's reference to blocks; a block nobody holds leaves the pool
        (or waits in the cached-free queue if its prefix is indexed).

        All or nothing: if any block is not held by the agent (never allocated
        to it, already freed, or named twice), nothing is freed.

        Raises:
            BlockOperationError: Ownership is violated.
        """
        _check_agent(agent_id)
        with self._lock:
            keys = self._validated(blocks)
            held = self._held.get(agent_id, set())
            for key, block in keys.items():
                if key not in held:
                    state = "free" if self._refs.get(key, 0) == 0 else "held by other agents only"
                    raise BlockOperationError(f"agent {agent_id!r} does not hold {block} (it is {state})")
            for key in keys:
                held.discard(key)
                self._refs[key] -= 1
                if self._refs[key] == 0:
                    if key in self._cacheable and key in self._data:
                        self._cached[key] = None
                    else:
                        self._drop(key)
            if not held:
                self._held.pop(agent_id, None)

    def release(self, agent_blocks: AgentBlocks) -> None:
        """Free every block of an agent's cache handle."""
        self.free(agent_blocks.all_blocks(), agent_blocks.agent_id)

    def mark_cacheable(self, blocks: Iterable[KVBlock]) -> None:
        """Keep these (full, indexed) blocks findable after their last holder frees them,
        until their memory is needed."""
        with self._lock:
            for block in blocks:
                if self._layer.get(block.block_id) == block.layer_id:
                    self._cacheable.add(block.block_id)

    def drop_cached(self) -> int:
        """Drop every cached-free block now (their index is gone). Returns how many."""
        with self._lock:
            keys = list(self._cached)
            for key in keys:
                self._drop(key)
            self._cacheable.clear()
            return len(keys)

    def _drop(self, key: int) -> None:
        """Return a block with no holders to the budget. Lock held."""
        self._cached.pop(key, None)
        self._data.pop(key, None)
        self._cacheable.discard(key)
        self._block_bytes -= self._layer_bytes[self._layer.pop(key)]
        del self._refs[key]
        self._free_ids.append(key)

    def new_handle_generation(self, agent_id: str | None = None) -> int:
        """A fresh, increasing generation number for a handle the pool's users issue.

        With ``agent_id``, it becomes that agent's current generation: an
        older handle of the agent is stale from now on (:meth:`is_current`).
        """
        with self._lock:
            generation = next(self._handle_generation)
            if agent_id is not None:
                self._current[agent_id] = generation
            return generation

    def is_current(self, handle: AgentBlocks) -> bool:
        """Whether ``handle`` is its agent's newest issued handle (a handle built by hand always is)."""
        with self._lock:
            return handle.generation is None or self._current.get(handle.agent_id, handle.generation) <= handle.generation

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the books don't balance. Used by tests."""
        with self._lock:
            holders: dict[int, int] = {}
            for held in self._held.values():
                for key in held:
                    holders[key] = holders.get(key, 0) + 1
            assert set(self._refs) == set(self._layer), "a block without a layer record"
            for key, refs in self._refs.items():
                assert holders.get(key, 0) == refs, "refcounts disagree with holders"
                assert (refs == 0) == (key in self._cached), "a block with no holder is not cached (or a held one is)"
            assert set(self._refs).isdisjoint(self._free_ids), "a live block id is on the free list"
            assert len(set(self._free_ids)) == len(self._free_ids), "a block id is free twice"
            assert set(self._data) <= set(self._refs), "data kept for a dropped block"
            assert self._block_bytes == sum(self._layer_bytes[self._layer[k]] for k in self._refs), "block bytes leaked"
            assert self._transient >= 0
            assert self.used_bytes - sum(self._layer_bytes[self._layer[k]] for k in self._cached) <= self.total_bytes + self._transient

    # ------------------------------------------------------------ data

    def read(
        self, layer_blocks: Mapping[int, Sequence[KVBlock]], spare_blocks: Mapping[int, int] | None = None
    ) -> dict[int, tuple[mx.array, mx.array]]:
        """Gather blocks into contiguous ``[1, H, n*B, D]`` K and V in the model's dtype.

        Every layer and plane goes through one native call; quantized blocks
        are dequantized in the same pass. ``spare_blocks`` appends that many
        zero blocks to a layer, as room for the tokens that will follow.
        The copy is not evaluated here: it runs with whatever consumes it
        (the model's next step), and it holds the blocks' arrays (immutable)
        until then, so freeing the blocks meanwhile is safe.
        """
        spare_blocks = spare_blocks or {}
        with self._lock:
            entries, layers = [], []
            for layer_id, blocks in layer_blocks.items():
                stored = self._stored_all(layer_id, blocks)
                stored += [self._zero_block(layer_id)] * spare_blocks.get(layer_id, 0)
                for plane in ("k", "v"):
                    entries.append([s[plane] for s in stored] if not self.kv_bits else
                                   [(s[plane], s[f"{plane}_scales"], s[f"{plane}_biases"]) for s in stored])
                layers.append(layer_id)
        if self.kv_bits is None:
            out = ops.concat_blocks(entries)
        else:
            packed, scales, biases = ([[blk[i] for blk in entry] for entry in entries] for i in range(3))
            out = ops.concat_dequantize_blocks(packed, scales, biases, group_size=self.kv_group_size, bits=self.kv_bits)
        return {layer_id: (out[2 * i], out[2 * i + 1]) for i, layer_id in enumerate(layers)}

    def read_planes(self, layer_blocks: Mapping[int, Sequence[KVBlock]]) -> dict[int, dict[str, mx.array]]:
        """Gather blocks as stored (packed and scales too, when quantized), all in one call."""
        with self._lock:
            entries, keys = [], []
            for layer_id, blocks in layer_blocks.items():
                stored = [self._stored(layer_id, b) for b in blocks]
                for name in self.plane_names:
                    entries.append([s[name] for s in stored])
                    keys.append((layer_id, name))
        out = ops.concat_blocks(entries)
        mx.eval(out)
        result: dict[int, dict[str, mx.array]] = {}
        for (layer_id, name), array in zip(keys, out):
            result.setdefault(layer_id, {})[name] = array
        return result

    def block_arrays(self, layer_blocks: Mapping[int, Sequence[KVBlock]]) -> dict[int, list[dict[str, mx.array]]]:
        """The arrays behind blocks, as stored, without a copy: per layer, per block, ``{plane: [H, B, d]}``.

        Blocks are immutable (a write makes new arrays), so holding these is
        safe; it keeps their memory alive even after the blocks are freed.
        """
        with self._lock:
            return {layer_id: [dict(self._stored(layer_id, b)) for b in blocks] for layer_id, blocks in layer_blocks.items()}

    def write(self, writes: Sequence[BlockWrite]) -> None:
        """Write tokens into blocks, quantizing them if the pool is quantized.

        New block arrays are made for every block the tokens reach (the
        first keeps its earlier tokens) and swapped in only when all are
        computed: on any error nothing changes.

        Raises:
            BlockOperationError: A block is free, belongs to another layer,
                or is shared (shared blocks are read-only: copy on write).
            ValueError: Shapes or dtypes do not match the pool; nothing written.
        """
        planes = []
        for w in writes:
            if self.kv_bits is None:
                sources = {"k": w.keys, "v": w.values}
            else:
                sources = {}
                for name, x in (("k", w.keys), ("v", w.values)):
                    if x.shape[2] == 0:
                        g = self.spec.layers[w.layer_id].geometry
                        shapes = g.planes(self.kv_bits, self.kv_group_size)
                        for plane in (name, f"{name}_scales", f"{name}_biases"):
                            dim, dtype = shapes[plane]
                            sources[plane] = mx.zeros((1, x.shape[1], 0, dim), dtype=getattr(mx, dtype))
                        continue
                    q, scales, biases = mx.quantize(x, group_size=self.kv_group_size, bits=self.kv_bits)
                    sources.update({name: q, f"{name}_scales": scales, f"{name}_biases": biases})
            planes.append((w.layer_id, w.blocks, sources, w.offset))
        self.write_planes(planes)

    def write_planes(self, writes: Sequence[tuple[int, Sequence[KVBlock], Mapping[str, mx.array], int]]) -> None:
        """Write arrays as stored, ``(layer, blocks, {plane: [1, H, T, d]}, offset)`` each; see :meth:`write`."""
        b = self.block_tokens
        with self._lock:
            jobs = []  # (block ids written, plane, source, offset, head)
            for layer_id, blocks, arrays, offset in writes:
                self._check_layer(layer_id)
                g = self.spec.layers[layer_id].geometry
                expected = g.planes(self.kv_bits, self.kv_group_size)
                if set(arrays) != set(expected):
                    raise ValueError(f"expected planes {sorted(expected)}, got {sorted(arrays)}")
                tokens = {a.shape[2] if a.ndim == 4 else -1 for a in arrays.values()}
                if len(tokens) != 1 or -1 in tokens:
                    raise ValueError("every plane of a write must be [1, H, T, d] with the same T")
                (t,) = tokens
                for name, a in arrays.items():
                    dim, dtype = expected[name]
                    if a.shape[0] != 1 or a.shape[1] != g.kv_heads or a.shape[3] != dim or a.dtype != getattr(mx, dtype):
                        raise ValueError(f"plane {name} of layer {layer_id} must be [1, {g.kv_heads}, T, {dim}] {dtype}, got {a.dtype} {a.shape}")
                if not (isinstance(offset, int) and 0 <= offset < b):
                    raise ValueError(f"offset must be in [0, {b}), got {offset!r}")
                if t == 0:
                    continue
                n = -(-(offset + t) // b)
                if len(blocks) < n:
                    raise ValueError(f"{t} tokens at offset {offset} need {n} blocks, got {len(blocks)}")
                keys = self._owned(layer_id, blocks[:n])
                for key in keys:
                    if self._refs[key] > 1:
                        raise BlockOperationError(f"block {key} of layer {layer_id} is shared: copy it before writing")
                for name, a in arrays.items():
                    # Positions before the offset keep the block's earlier tokens
                    # (zeros in a block never written: they are not valid tokens).
                    head = self._data[keys[0]][name] if offset and keys[0] in self._data else None
                    jobs.append((keys, name, a, offset, head))
        if not jobs:
            return
        made = ops.split_blocks([j[2] for j in jobs], [j[3] for j in jobs], [j[4] for j in jobs], block_tokens=b)
        mx.eval(made)
        with self._lock:
            for (keys, _, _, _, _), _ in zip(jobs, made):
                for key in keys:
                    if key not in self._refs or self._refs[key] != 1:
                        raise BlockOperationError(f"block {key} was freed or shared while it was written")
            for (keys, name, _, _, _), arrays in zip(jobs, made):
                for key, array in zip(keys, arrays):
                    self._data.setdefault(key, {})[name] = array
            for key in {k for job in jobs for k in job[0]}:
                self._generation[key] += 1

    # ------------------------------------------------------------ helpers

    def _key(self, block: KVBlock) -> int:
        return block.block_id if self._layer.get(block.block_id) == block.layer_id else -1

    def _stored_all(self, layer_id: int, blocks: Sequence[KVBlock]) -> list[dict[str, mx.array]]:
        """The arrays of blocks an agent holds (a layer's whole list at once: the read path). Lock held."""
        self._check_layer(layer_id)
        planes = len(self.plane_names)
        out = []
        for block in blocks:
            key = block.block_id if isinstance(block, KVBlock) and block.layer_id == layer_id else -1
            data = self._data.get(key)
            if self._layer.get(key) != layer_id or not self._refs.get(key) or data is None or len(data) != planes:
                out.append(self._stored(layer_id, block))  # the slow path says exactly what is wrong
            else:
                out.append(data)
        return out

    def _stored(self, layer_id: int, block: KVBlock) -> dict[str, mx.array]:
        (key,) = self._owned(layer_id, [block])
        data = self._data.get(key)
        if data is None or len(data) != len(self.plane_names):
            raise BlockOperationError(f"{block} was never written")
        return data

    def _zero_block(self, layer_id: int) -> dict[str, mx.array]:
        g = self.spec.geometry_index(layer_id)
        if g not in self._zero_blocks:
            geometry = self.spec.geometries[g]
            planes = {
                name: mx.zeros((geometry.kv_heads, self.block_tokens, dim), dtype=getattr(mx, dtype))
                for name, (dim, dtype) in geometry.planes(self.kv_bits, self.kv_group_size).items()
            }
            mx.eval(planes)
            self._zero_blocks[g] = planes
        return self._zero_blocks[g]

    def _check_layer(self, layer_id: int) -> None:
        if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not 0 <= layer_id < self.spec.num_layers:
            raise InvalidRequestError(f"layer {layer_id!r} is not a layer of this model")

    def _validated(self, blocks: Iterable[KVBlock]) -> dict[int, KVBlock]:
        keys: dict[int, KVBlock] = {}
        for block in blocks:
            if not isinstance(block, KVBlock):
                raise BlockOperationError(f"expected KVBlock, got {type(block).__name__}")
            self._check_layer(block.layer_id)
            if not isinstance(block.block_id, int) or block.block_id not in self._layer:
                raise BlockOperationError(f"{block} is free (or not a block of this pool)")
            if self._layer[block.block_id] != block.layer_id:
                raise BlockOperationError(f"{block} belongs to layer {self._layer[block.block_id]}")
            if block.block_id in keys:
                raise BlockOperationError(f"{block} is named twice")
            keys[block.block_id] = block
        return keys

    def _owned(self, layer_id: int, blocks: Sequence[KVBlock]) -> list[int]:
        self._check_layer(layer_id)
        keys = []
        for block in blocks:
            if not isinstance(block, KVBlock) or block.layer_id != layer_id or self._layer.get(block.block_id) != layer_id:
                raise BlockOperationError(f"{block} is not a block of layer {layer_id}")
            if self._refs.get(block.block_id, 0) == 0:
                raise BlockOperationError(f"{block} is free; allocate it before using it")
            keys.append(block.block_id)
        return keys


def _check_agent(agent_id: object) -> None:
    if not isinstance(agent_id, str) or not agent_id:
        raise InvalidRequestError(f"agent_id must be a non-empty string, got {agent_id!r}")


def _split(total: int, weights: Sequence[int]) -> list[int]:
    """Split ``total`` blocks by ``weights``, at least one block each."""
    if total < len(weights):
        raise InvalidRequestError(f"num_blocks={total} is less than one block per geometry")
    whole = sum(weights)
    sizes = [max(1, total * w // whole) for w in weights]
    sizes[sizes.index(max(sizes))] += total - sum(sizes)
    return sizes
