"""The block pool: all KV memory of all agents, under one fixed budget.

Storage is preallocated: per geometry (distinct kv heads, head dims and
dtype) one K and one V array ``[num_blocks, H, B, D]``, or, with
``kv_bits``, the packed K and V, their scales and their biases in
``mx.quantize``'s layout (see ``Geometry.planes``). Block ids come from
one id space per geometry. Allocation and free are O(1) per block (a free
stack, a refcount list, and a set of held blocks per agent), all under one
lock, so submit and step may run on different threads.

The donation rule: ``scatter_blocks`` writes a pool array in place only if
nothing but the scatter references it when the graph is evaluated. The pool
keeps that true by never handing out its arrays, rebinding each plane to the
scatter's result before evaluating it, and evaluating every read before it
returns (evaluation detaches a result from the pool it was read from). Code
that reaches into the planes and keeps a reference, or leaves a read of them
unevaluated, makes the next write copy the whole plane.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import mlx.core as mx

from blockpool import ops
from blockpool.block import AgentBlocks, KVBlock
from blockpool.errors import BlockOperationError, InvalidRequestError, PoolExhaustedError
from blockpool.spec import ModelCacheSpec

_FREE = -1  # layer assignment of a free block


@dataclass(frozen=True)
class AgentUsage:
    """Blocks and bytes one agent holds (a shared block counts for each holder)."""

    blocks: int
    bytes: int


@dataclass(frozen=True)
class PoolStats:
    """A snapshot of the pool's accounting. Physical totals count a shared block once."""

    total_blocks: int
    free_blocks: int
    used_blocks: int
    shared_blocks: int
    total_bytes: int
    used_bytes: int
    agents: dict[str, AgentUsage]


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
    """Owns the KV memory of every agent, in fixed-size blocks.

    Args:
        spec: The model cache layout, from :meth:`ModelCacheSpec.from_model`.
        num_blocks: Total blocks, split between geometries by layer count.
        memory_bytes: A budget in bytes instead of a block count: the pool
            holds as many whole "one block per layer" rows as fit.
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
        if (num_blocks is None) == (memory_bytes is None):
            raise InvalidRequestError("give exactly one of num_blocks and memory_bytes")
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
        self.spec = spec
        self.kv_bits, self.kv_group_size = kv_bits, kv_group_size
        self.block_tokens = spec.block_tokens
        self._lock = threading.RLock()
        layer_counts = [len(spec.layers_of(g)) for g in range(len(spec.geometries))]
        if memory_bytes is not None:
            row_bytes = sum(n * self._block_bytes(g) for n, g in zip(layer_counts, spec.geometries))
            rows = int(memory_bytes) // row_bytes
            if rows < 1:
                raise InvalidRequestError(f"memory_bytes={memory_bytes} is less than one block per layer ({row_bytes} bytes)")
            sizes = [rows * n for n in layer_counts]
        else:
            sizes = _split(int(num_blocks), layer_counts)
        self._sizes = sizes
        self._bytes_per_block = [self._block_bytes(g) for g in spec.geometries]
        self._planes: list[dict[str, mx.array]] = [
            {
                name: mx.zeros((n, g.kv_heads, self.block_tokens, dim), dtype=getattr(mx, dtype))
                for name, (dim, dtype) in g.planes(kv_bits, kv_group_size).items()
            }
            for g, n in zip(spec.geometries, sizes)
        ]
        mx.eval([p for planes in self._planes for p in planes.values()])  # commit the memory now
        # Popping from the end hands out low ids first.
        self._free: list[list[int]] = [list(range(n - 1, -1, -1)) for n in sizes]
        self._refs: list[list[int]] = [[0] * n for n in sizes]
        self._layer: list[list[int]] = [[_FREE] * n for n in sizes]
        self._generation: list[list[int]] = [[0] * n for n in sizes]  # bumped when contents change
        self._held: dict[str, set[tuple[int, int]]] = {}
        ops.ensure_cache_limit(self.total_bytes)

    # ------------------------------------------------------------ accounting

    def _block_bytes(self, geometry) -> int:
        return geometry.bytes_per_block(self.block_tokens, self.kv_bits, self.kv_group_size)

    @property
    def plane_names(self) -> list[str]:
        """The arrays each block is stored in (the same for every geometry)."""
        return list(self._planes[0])

    @property
    def total_blocks(self) -> int:
        return sum(self._sizes)

    @property
    def total_bytes(self) -> int:
        return sum(n * b for n, b in zip(self._sizes, self._bytes_per_block))

    def available_blocks(self, geometry: int | None = None) -> int:
        """Free blocks, in total or for one geometry."""
        with self._lock:
            if geometry is not None:
                return len(self._free[geometry])
            return sum(len(f) for f in self._free)

    def used_blocks(self, agent_id: str | None = None) -> int:
        """Blocks in use: physical blocks in total, or the blocks one agent holds."""
        with self._lock:
            if agent_id is None:
                return self.total_blocks - sum(len(f) for f in self._free)
            return len(self._held.get(agent_id, ()))

    def refcount(self, block: KVBlock) -> int:
        """How many agents hold a block (0 when free)."""
        g = self.spec.geometry_index(block.layer_id)
        with self._lock:
            return self._refs[g][block.block_id]

    def generation(self, block: KVBlock) -> int:
        """A counter bumped whenever a block is allocated or written: an index
        entry that remembers it can tell that the block's tokens changed."""
        g = self.spec.geometry_index(block.layer_id)
        with self._lock:
            return self._generation[g][block.block_id]

    def holds(self, agent_id: str, blocks: Iterable[KVBlock]) -> bool:
        """Whether the agent holds every one of ``blocks``."""
        with self._lock:
            held = self._held.get(agent_id, set())
            for block in blocks:
                if not 0 <= block.layer_id < self.spec.num_layers:
                    return False
                if (self.spec.geometry_index(block.layer_id), block.block_id) not in held:
                    return False
            return True

    def stats(self) -> PoolStats:
        """A consistent snapshot of blocks and bytes in use, per agent and in total."""
        with self._lock:
            agents = {
                agent: AgentUsage(len(held), sum(self._bytes_per_block[g] for g, _ in held))
                for agent, held in self._held.items()
            }
            used_bytes = sum(
                self._bytes_per_block[g] * (n - len(free)) for g, (n, free) in enumerate(zip(self._sizes, self._free))
            )
            shared = sum(1 for refs in self._refs for r in refs if r > 1)
            used = self.total_blocks - sum(len(f) for f in self._free)
            return PoolStats(self.total_blocks, self.total_blocks - used, used, shared, self.total_bytes, used_bytes, agents)

    # ------------------------------------------------------------ allocation

    def allocate(self, n: int, layer_id: int, agent_id: str) -> list[KVBlock]:
        """Allocate ``n`` blocks of one layer to an agent, all or nothing.

        Raises:
            PoolExhaustedError: Fewer than ``n`` blocks are free; nothing was allocated.
        """
        return self.reserve({layer_id: n}, agent_id)[layer_id]

    def reserve(self, counts: Mapping[int, int], agent_id: str) -> dict[int, list[KVBlock]]:
        """Allocate blocks for several layers in one all-or-nothing step.

        Args:
            counts: Blocks wanted per layer id.
            agent_id: The agent that will hold them.

        Raises:
            PoolExhaustedError: Some geometry has too few free blocks; nothing was allocated.
        """
        _check_agent(agent_id)
        per_geometry = [0] * len(self._sizes)
        for layer_id, n in counts.items():
            self._check_layer(layer_id)
            if n < 0:
                raise InvalidRequestError(f"cannot allocate {n} blocks")
            per_geometry[self.spec.geometry_index(layer_id)] += n
        with self._lock:
            for g, need in enumerate(per_geometry):
                if need > len(self._free[g]):
                    detail = "" if len(self._sizes) == 1 else f"of geometry {g}"
                    raise PoolExhaustedError(need, len(self._free[g]), detail)
            held = self._held.setdefault(agent_id, set())
            out: dict[int, list[KVBlock]] = {}
            for layer_id, n in counts.items():
                g = self.spec.geometry_index(layer_id)
                free, refs, layer = self._free[g], self._refs[g], self._layer[g]
                blocks = []
                for _ in range(n):
                    block_id = free.pop()
                    refs[block_id] = 1
                    layer[block_id] = layer_id
                    self._generation[g][block_id] += 1
                    held.add((g, block_id))
                    blocks.append(KVBlock(layer_id, block_id))
                out[layer_id] = blocks
            return out

    def share(self, blocks: Iterable[KVBlock], agent_id: str) -> None:
        """Give an agent a reference to blocks others already hold (copy-on-write sharing).

        Raises:
            BlockOperationError: A block is free, or the agent holds it already.
        """
        _check_agent(agent_id)
        with self._lock:
            keys = self._validated(blocks)
            held = self._held.get(agent_id, set())
            for (g, block_id), block in keys.items():
                if self._refs[g][block_id] == 0:
                    raise BlockOperationError(f"cannot share {block}: it is free")
                if (g, block_id) in held:
                    raise BlockOperationError(f"agent {agent_id!r} already holds {block}")
            held = self._held.setdefault(agent_id, set())
            for g, block_id in keys:
                self._refs[g][block_id] += 1
                held.add((g, block_id))

    def free(self, blocks: Iterable[KVBlock], agent_id: str) -> None:
        """Drop an agent's reference to blocks; a block nobody holds goes back to the pool.

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
                    g, block_id = key
                    state = "free" if self._refs[g][block_id] == 0 else "held by other agents only"
                    raise BlockOperationError(f"agent {agent_id!r} does not hold {block} (it is {state})")
            for g, block_id in keys:
                held.discard((g, block_id))
                self._refs[g][block_id] -= 1
                if self._refs[g][block_id] == 0:
                    self._layer[g][block_id] = _FREE
                    self._free[g].append(block_id)
            if not held:
                self._held.pop(agent_id, None)

    def release(self, agent_blocks: AgentBlocks) -> None:
        """Free every block of an agent's cache handle."""
        self.free(agent_blocks.all_blocks(), agent_blocks.agent_id)

    def check_invariants(self) -> None:
        """Raise ``AssertionError`` if the books don't balance. Used by tests."""
        with self._lock:
            holders: list[list[int]] = [[0] * n for n in self._sizes]
            for held in self._held.values():
                for g, block_id in held:
                    holders[g][block_id] += 1
            for g, n in enumerate(self._sizes):
                free = self._free[g]
                assert len(set(free)) == len(free), "a block is on the free list twice"
                assert all(self._refs[g][i] == 0 for i in free), "a held block is on the free list"
                in_use = sum(1 for r in self._refs[g] if r > 0)
                assert in_use + len(free) == n, "blocks leaked"
                assert holders[g] == self._refs[g], "refcounts disagree with holders"
                assert all((self._layer[g][i] == _FREE) == (self._refs[g][i] == 0) for i in range(n))

    # ------------------------------------------------------------ data

    def read(self, layer_blocks: Mapping[int, Sequence[KVBlock]]) -> dict[int, tuple[mx.array, mx.array]]:
        """Gather blocks into contiguous ``[1, H, n*B, D]`` K and V in the model's dtype.

        Every layer and plane goes through one native call; quantized blocks
        are dequantized in the same pass. The results are evaluated before
        they are returned, so they hold no reference to the pool.
        """
        with self._lock:
            ids, layers = [], []
            suffixes = ("", "_scales", "_biases") if self.kv_bits else ("",)
            stacks: dict[str, list[mx.array]] = {suffix: [] for suffix in suffixes}
            for layer_id, blocks in layer_blocks.items():
                g = self.spec.geometry_index(layer_id)
                block_ids = self._owned_ids(layer_id, blocks)
                for plane in ("k", "v"):
                    for suffix in suffixes:
                        stacks[suffix].append(self._planes[g][plane + suffix])
                    ids.append(block_ids)
                layers.append(layer_id)
            if self.kv_bits is None:
                out = ops.gather_blocks(stacks[""], ids)
            else:
                out = ops.gather_dequantize_blocks(
                    stacks[""], stacks["_scales"], stacks["_biases"], ids, group_size=self.kv_group_size, bits=self.kv_bits
                )
            del stacks  # no reference to a plane may outlive the read
            mx.eval(out)
            return {layer_id: (out[2 * i], out[2 * i + 1]) for i, layer_id in enumerate(layers)}

    def read_planes(self, layer_blocks: Mapping[int, Sequence[KVBlock]]) -> dict[int, dict[str, mx.array]]:
        """Gather blocks as stored (packed and scales too, when quantized), all in one call."""
        with self._lock:
            pools, ids, keys = [], [], []
            for layer_id, blocks in layer_blocks.items():
                g = self.spec.geometry_index(layer_id)
                block_ids = self._owned_ids(layer_id, blocks)
                for name, plane in self._planes[g].items():
                    pools.append(plane)
                    ids.append(block_ids)
                    keys.append((layer_id, name))
            out = ops.gather_blocks(pools, ids)
            del pools
            mx.eval(out)
            result: dict[int, dict[str, mx.array]] = {}
            for (layer_id, name), array in zip(keys, out):
                result.setdefault(layer_id, {})[name] = array
            return result

    def write(self, writes: Sequence[BlockWrite]) -> None:
        """Write tokens into blocks, quantizing them if the pool is quantized.

        Every layer and plane goes through one native scatter, in place.

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
                    q, scales, biases = mx.quantize(x, group_size=self.kv_group_size, bits=self.kv_bits)
                    sources.update({name: q, f"{name}_scales": scales, f"{name}_biases": biases})
            planes.append((w.layer_id, w.blocks, sources, w.offset))
        self.write_planes(planes)

    def write_planes(self, writes: Sequence[tuple[int, Sequence[KVBlock], Mapping[str, mx.array], int]]) -> None:
        """Write arrays as stored, ``(layer, blocks, {plane: [1, H, T, d]}, offset)`` each; see ``write``."""
        with self._lock:
            pools, ids, sources, offsets, targets = [], [], [], [], []
            for layer_id, blocks, arrays, offset in writes:
                g = self.spec.geometry_index(layer_id)
                block_ids = self._owned_ids(layer_id, blocks)
                for block_id in block_ids:
                    if self._refs[g][block_id] > 1:
                        raise BlockOperationError(f"block {block_id} of layer {layer_id} is shared: copy it before writing")
                if set(arrays) != set(self._planes[g]):
                    raise ValueError(f"expected planes {sorted(self._planes[g])}, got {sorted(arrays)}")
                for plane, source in arrays.items():
                    pools.append(self._planes[g][plane])
                    ids.append(block_ids)
                    sources.append(source)
                    offsets.append(offset)
                    targets.append((g, plane))
            if not pools:
                return
            out = ops.scatter_blocks(pools, ids, sources, offsets)
            del pools  # the old planes must be referenced by the graph alone
            for (g, plane), updated in zip(targets, out):
                self._planes[g][plane] = updated
            del out, updated
            mx.eval([p for planes in self._planes for p in planes.values()])
            for layer_id, blocks, _, _ in writes:
                g = self.spec.geometry_index(layer_id)
                for block in blocks:
                    self._generation[g][block.block_id] += 1

    # ------------------------------------------------------------ helpers

    def _check_layer(self, layer_id: int) -> None:
        if not isinstance(layer_id, int) or not 0 <= layer_id < self.spec.num_layers:
            raise InvalidRequestError(f"layer {layer_id!r} is not a layer of this model")

    def _validated(self, blocks: Iterable[KVBlock]) -> dict[tuple[int, int], KVBlock]:
        keys: dict[tuple[int, int], KVBlock] = {}
        for block in blocks:
            if not isinstance(block, KVBlock):
                raise BlockOperationError(f"expected KVBlock, got {type(block).__name__}")
            self._check_layer(block.layer_id)
            g = self.spec.geometry_index(block.layer_id)
            if not 0 <= block.block_id < self._sizes[g]:
                raise BlockOperationError(f"{block} is not a block of this pool")
            if (g, block.block_id) in keys:
                raise BlockOperationError(f"{block} is named twice")
            layer = self._layer[g][block.block_id]
            if layer not in (_FREE, block.layer_id):
                raise BlockOperationError(f"{block} belongs to layer {layer}")
            keys[(g, block.block_id)] = block
        return keys

    def _owned_ids(self, layer_id: int, blocks: Sequence[KVBlock]) -> list[int]:
        self._check_layer(layer_id)
        g = self.spec.geometry_index(layer_id)
        ids = []
        for block in blocks:
            if block.layer_id != layer_id or not 0 <= block.block_id < self._sizes[g]:
                raise BlockOperationError(f"{block} is not a block of layer {layer_id}")
            if self._refs[g][block.block_id] == 0:
                raise BlockOperationError(f"{block} is free; allocate it before using it")
            ids.append(block.block_id)
        return ids


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
