"""The block pool: every byte of KV the engine holds, under one budget.

A facade over three parts, each with one job:

- :mod:`.books`: block ids, layers, refcounts, holders and generations
  (including the *cached-free* queue of blocks no one holds that stay
  findable for their prefix, least recently freed first);
- :mod:`.budget`: the byte ceiling over blocks, working caches and copies
  in flight; when something does not fit it evicts cached-free blocks,
  then asks the registered reclaimers (``AgentMemory`` spills idle agents),
  and only then is the request refused;
- :mod:`.storage`: the block arrays, one small immutable array per block
  and plane, read and written through the native ops.

Every operation is all or nothing and validates before it changes
anything. Bookkeeping is under one lock, so submit and step may run on
different threads; array work (gathers, splits) runs outside it.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable, Mapping, Sequence

import mlx.core as mx

from blockpool import ops
from blockpool.block import AgentBlocks, KVBlock
from blockpool.errors import InvalidRequestError, PoolExhaustedError
from blockpool.pool.books import BlockBooks
from blockpool.pool.budget import Budget, BudgetMethods
from blockpool.pool.states import State, StateSlots
from blockpool.pool.storage import BlockStorage
from blockpool.pool.types import BlockWrite, PoolStats
from blockpool.spec import ModelCacheSpec

#: The budget of a pool given neither a block count nor a byte count.
DEFAULT_MEMORY_BYTES = 1 << 30


class BlockPool(BudgetMethods):
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
        _check_arguments(spec, num_blocks, memory_bytes, kv_bits, kv_group_size)
        if num_blocks is None and memory_bytes is None:
            memory_bytes = DEFAULT_MEMORY_BYTES
        self.spec, self.id = spec, uuid.uuid4().hex
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.block_tokens = spec.block_tokens
        geometry_bytes = [g.bytes_per_block(self.block_tokens, kv_bits, kv_group_size) for g in spec.geometries]
        self._layer_bytes = [geometry_bytes[spec.geometry_index(i)] for i in range(spec.num_layers)]
        self._geometry_bytes = geometry_bytes
        self.total_bytes, self.total_blocks = _size(spec, geometry_bytes, num_blocks, memory_bytes)
        self._lock = threading.RLock()
        self._books = BlockBooks()
        self._storage = BlockStorage(spec, kv_bits, kv_group_size, self._books, self._lock)
        self._states = StateSlots(self._storage, self._books, self._lock)
        self._budget = Budget(self.total_bytes, self.total_blocks, self._lock, self._evict_oldest_cached)
        ops.ensure_cache_limit(min(self.total_bytes, 1 << 30))

    # ------------------------------------------------------------ accounting

    def bytes_per_block(self, layer_id: int) -> int:
        """Bytes one block of a layer takes, as stored."""
        self._check_layer(layer_id)
        return self._layer_bytes[layer_id]

    @property
    def plane_names(self) -> list[str]:
        """The arrays each block is stored in (the same for every geometry)."""
        return self._storage.plane_names

    @property
    def used_bytes(self) -> int:
        """Everything charged to the budget: blocks, working and transient bytes."""
        return self._budget.used

    @property
    def free_bytes(self) -> int:
        """Bytes that could be charged now, counting cached-free blocks as reclaimable."""
        with self._lock:
            return self.total_bytes - self._budget.used + self._cached_bytes()

    def available_blocks(self, geometry: int | None = None) -> int:
        """Blocks that could be allocated now: of one geometry, or in the pool's unit."""
        free = self.free_bytes
        return free // self._geometry_bytes[geometry] if geometry is not None else self._budget.blocks_in(free)

    def used_blocks(self, agent_id: str | None = None) -> int:
        """Budget in use in blocks (the pool's unit), or the blocks one agent holds."""
        with self._lock:
            if agent_id is None:
                return self.total_blocks - self.available_blocks()
            return len(self._books.held.get(agent_id, ()))

    def refcount(self, block: KVBlock) -> int:
        """How many agents hold a block (0 when free or cached-free)."""
        with self._lock:
            return self._books.refs.get(self._books.key(block), 0)

    def generation(self, block: KVBlock) -> int:
        """A counter bumped whenever a block is allocated or written: an index
        entry that remembers it can tell that the block's tokens changed."""
        with self._lock:
            return self._books.generation.get(self._books.key(block), -1)

    def is_live(self, block: KVBlock, generation: int) -> bool:
        """Whether a block still holds the tokens it held at ``generation`` (held, or freed but still cached)."""
        with self._lock:
            return self._books.is_live(block, generation)

    def holds(self, agent_id: str, blocks: Iterable[KVBlock]) -> bool:
        """Whether the agent holds every one of ``blocks``."""
        with self._lock:
            return self._books.holds(agent_id, blocks)

    def stats(self) -> PoolStats:
        """A consistent snapshot of blocks and bytes in use, per agent and in total."""
        with self._lock:
            free = self.available_blocks()
            return PoolStats(
                total_blocks=self.total_blocks,
                free_blocks=free,
                used_blocks=self.total_blocks - free,
                shared_blocks=self._books.shared(),
                total_bytes=self.total_bytes,
                used_bytes=self._budget.used,
                agents=self._books.usage(self._layer_bytes),
                block_bytes=self._budget.block_bytes,
                working_bytes=self._budget.working(),
                transient_bytes=self._budget.transient_bytes,
                cached_free_blocks=len(self._books.cached),
            )

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
            if not self._budget.fits(need) and not force:
                if len(counts) == 1:
                    raise PoolExhaustedError(
                        sum(counts.values()), self.available_blocks(self.spec.geometry_index(next(iter(counts))))
                    )
                raise PoolExhaustedError(self._budget.blocks_in(need), self.available_blocks())
            self._budget.block_bytes += need
            return self._books.allocate(counts, agent_id)

    def share(self, blocks: Iterable[KVBlock], agent_id: str) -> None:
        """Give an agent a reference to blocks others hold, or that are cached-free (copy-on-write sharing).

        Raises:
            BlockOperationError: A block is free (and not cached), or the agent holds it already.
        """
        _check_agent(agent_id)
        with self._lock:
            self._books.share(self._books.validated(blocks, self._check_layer), agent_id)

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
            for key in self._books.free(self._books.validated(blocks, self._check_layer), agent_id):
                self._drop(key)

    def release(self, agent_blocks: AgentBlocks) -> None:
        """Free every block of an agent's cache handle."""
        self.free(agent_blocks.all_blocks(), agent_blocks.agent_id)

    def mark_cacheable(self, blocks: Iterable[KVBlock]) -> None:
        """Keep these (full, indexed) blocks findable after their last holder frees them,
        until their memory is needed."""
        with self._lock:
            for block in blocks:
                if self._books.layer.get(block.block_id) == block.layer_id:
                    self._books.cacheable.add(block.block_id)

    def drop_cached(self) -> int:
        """Drop every cached-free block now (their index is gone). Returns how many."""
        with self._lock:
            keys = list(self._books.cached)
            for key in keys:
                self._drop(key)
            self._books.cacheable.clear()
            return len(keys)

    def new_handle_generation(self, agent_id: str | None = None) -> int:
        """A fresh, increasing generation number for a handle the pool's users issue.

        With ``agent_id``, it becomes that agent's current generation: an
        older handle of the agent is stale from now on (:meth:`is_current`).
        """
        with self._lock:
            return self._books.new_handle_generation(agent_id)

    def is_current(self, handle: AgentBlocks) -> bool:
        """Whether ``handle`` is its agent's newest issued handle (a handle built by hand always is)."""
        with self._lock:
            return self._books.is_current(handle.agent_id, handle.generation)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the books don't balance. Used by tests."""
        with self._lock:
            self._books.check()
            assert set(self._storage.data) <= set(self._books.refs), "data kept for a dropped block"
            assert self._budget.block_bytes == sum(self._layer_bytes[layer] for layer in self._books.layer.values()), (
                "block bytes leaked"
            )
            self._budget.check(self._cached_bytes())

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
        return self._storage.read(layer_blocks, spare_blocks)

    def read_planes(self, layer_blocks: Mapping[int, Sequence[KVBlock]]) -> dict[int, dict[str, mx.array]]:
        """Gather blocks as stored (packed and scales too, when quantized), all in one call."""
        return self._storage.read_planes(layer_blocks)

    def block_arrays(self, layer_blocks: Mapping[int, Sequence[KVBlock]]) -> dict[int, list[dict[str, mx.array]]]:
        """The arrays behind blocks, as stored, without a copy: per layer, per block, ``{plane: [H, B, d]}``.

        Blocks are immutable (a write makes new arrays), so holding these is
        safe; it keeps their memory alive even after the blocks are freed.
        """
        return self._storage.block_arrays(layer_blocks)

    def take_data(self, block: KVBlock, agent_id: str) -> dict[str, mx.array]:
        """Take a block's arrays out of the pool, so that the agent, its only holder, writes new tokens
        into them in place (a running request's last block); :meth:`put_data` stores them again.

        Meanwhile the block holds no readable data and no prefix-index entry of it is live.

        Raises:
            BlockOperationError: Another agent holds it too (copy it instead), or it holds no data.
        """
        return self._storage.take(block.layer_id, block, agent_id)

    def put_data(self, block: KVBlock, planes: Mapping[str, mx.array]) -> None:
        """Store arrays ``[H, B, d]``, as the pool stores them (quantized planes in a quantized pool),
        as a held block's data: a block taken with :meth:`take_data`, or one allocated and written in place.

        Raises:
            BlockOperationError: The block is not held.
            ValueError: The planes do not match the pool's.
        """
        self._storage.put(block.layer_id, block, planes)

    def read_states(self, layer_blocks: Mapping[int, Sequence[KVBlock]]) -> dict[int, list[State]]:
        """The recurrent-state snapshots in blocks of state layers, as stored (no copy): per layer, per block."""
        return self._states.read(layer_blocks)

    def write_states(self, writes: Sequence[tuple[int, Sequence[KVBlock], Sequence[State]]]) -> None:
        """Store recurrent-state snapshots (copies, evaluated) into blocks: ``(layer, blocks, states)`` each."""
        self._states.write(writes)

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
        self._storage.write(writes)

    def write_planes(self, writes: Sequence[tuple[int, Sequence[KVBlock], Mapping[str, mx.array], int]]) -> None:
        """Write arrays as stored, ``(layer, blocks, {plane: [1, H, T, d]}, offset)`` each; see :meth:`write`."""
        self._storage.write_planes(writes)

    # ------------------------------------------------------------ helpers (lock held)

    def _drop(self, key: int) -> None:
        """A block with no holders leaves the pool: its record, its data and its bytes."""
        self._storage.data.pop(key, None)
        self._budget.block_bytes -= self._layer_bytes[self._books.drop(key)]

    def _evict_oldest_cached(self) -> bool:
        """The budget's evictor: drop the least recently freed cached-free block, if any."""
        if not self._books.cached:
            return False
        self._drop(next(iter(self._books.cached)))
        return True

    def _cached_bytes(self) -> int:
        return sum(self._layer_bytes[self._books.layer[i]] for i in self._books.cached)

    def _check_layer(self, layer_id: int) -> None:
        if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not 0 <= layer_id < self.spec.num_layers:
            raise InvalidRequestError(f"layer {layer_id!r} is not a layer of this model")


def _check_arguments(
    spec: object, num_blocks: object, memory_bytes: object, kv_bits: object, kv_group_size: object
) -> None:
    if not isinstance(spec, ModelCacheSpec):
        raise InvalidRequestError(f"spec must be a ModelCacheSpec, got {type(spec).__name__}")
    if num_blocks is not None and memory_bytes is not None:
        raise InvalidRequestError("give one of num_blocks and memory_bytes, not both")
    if kv_bits not in (None, 4, 8):
        raise InvalidRequestError(f"kv_bits must be None, 8 or 4, got {kv_bits!r}")
    if kv_group_size not in (32, 64, 128):
        raise InvalidRequestError(f"kv_group_size must be 32, 64 or 128, got {kv_group_size!r}")
    if kv_bits is not None:
        for g in spec.geometries:
            if hasattr(g, "shapes"):
                continue  # recurrent state is never quantized
            if g.k_head_dim % kv_group_size or g.v_head_dim % kv_group_size:
                raise InvalidRequestError(
                    f"head dims {g.k_head_dim}/{g.v_head_dim} are not multiples of kv_group_size={kv_group_size}"
                )
    for value, name in ((num_blocks, "num_blocks"), (memory_bytes, "memory_bytes")):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise InvalidRequestError(f"{name} must be a positive integer, got {value!r}")


def _size(
    spec: ModelCacheSpec, geometry_bytes: list[int], num_blocks: int | None, memory_bytes: int | None
) -> tuple[int, int]:
    """The budget in bytes and in blocks (of the pool's unit), from one of the two."""
    layer_counts = [len(spec.layers_of(g)) for g in range(len(spec.geometries))]
    if memory_bytes is not None:
        row_bytes = sum(n * b for n, b in zip(layer_counts, geometry_bytes))
        rows = memory_bytes // row_bytes
        if rows < 1:
            raise InvalidRequestError(
                f"memory_bytes={memory_bytes} is less than one block per layer ({row_bytes} bytes)"
            )
        return int(memory_bytes), rows * spec.num_layers
    shares = _split(num_blocks, layer_counts)
    return sum(n * b for n, b in zip(shares, geometry_bytes)), int(num_blocks)


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
