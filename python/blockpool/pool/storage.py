"""Block tensors: each block is its own small MLX array per plane, ``[H, B, d]``.

A block's arrays are made when it is first written and dropped when it
leaves the pool, so the memory really used is the memory accounted. Arrays
are immutable: a write makes new arrays (through the native
``split_blocks``) and swaps them in only when all are computed, so a reader
never sees a half-written block and no write depends on buffer donation.
Reads join a layer's blocks into contiguous K and V in one native call
(``concat_blocks``), dequantizing quantized blocks in the same pass.

Storage knows shapes, dtypes and quantization; which blocks exist and who
may read or write them it asks the books (:mod:`blockpool.pool.books`). It
takes the pool's lock around every look at the records; array work (the
native gathers and splits) runs outside it.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx

from blockpool import ops
from blockpool.block import KVBlock
from blockpool.errors import BlockOperationError, InvalidRequestError
from blockpool.pool.books import BlockBooks
from blockpool.pool.types import BlockWrite
from blockpool.spec import ModelCacheSpec

Planes = dict[str, mx.array]


class BlockStorage:
    """The arrays behind blocks, by block id.

    Args:
        spec: The model cache layout.
        kv_bits: 8 or 4 to store blocks quantized (``mx.quantize``, affine), None for the model's dtype.
        kv_group_size: Quantization group along the head dim.
        books: The pool's block records (who may read or write a block).
        lock: The pool's lock.
    """

    def __init__(
        self, spec: ModelCacheSpec, kv_bits: int | None, kv_group_size: int, books: BlockBooks, lock: threading.RLock
    ):
        self.spec, self.kv_bits, self.kv_group_size = spec, kv_bits, kv_group_size
        self._books, self._lock = books, lock
        self.block_tokens = spec.block_tokens
        self.data: dict[int, Planes] = {}
        self._zero_blocks: dict[int, Planes] = {}

    def expected_planes(self, layer_id: int) -> dict[str, tuple[Any, str]]:
        """A layer's planes as stored: name -> (last dim, or a state slot's shape; dtype)."""
        return self.spec.layers[layer_id].geometry.planes(self.kv_bits, self.kv_group_size)

    @property
    def plane_names(self) -> list[str]:
        """The planes of a token layer's block (the same for every token geometry)."""
        for g in self.spec.geometries:
            if not hasattr(g, "shapes"):
                return list(g.planes(self.kv_bits, self.kv_group_size))
        return []

    def complete(self, key: int) -> Planes | None:
        """A block's arrays if every plane was written, else None."""
        data = self.data.get(key)
        layer = self._books.layer.get(key)
        if data is None or layer is None:
            return None
        return data if len(data) == len(self.expected_planes(layer)) else None

    def zero_block(self, layer_id: int) -> Planes:
        """A block of zeros of a layer's geometry (spare room after a rebuilt history)."""
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

    # ------------------------------------------------------------ reading

    def join_kv(self, layers: Sequence[Sequence[Planes]]) -> list[tuple[mx.array, mx.array]]:
        """Each layer's blocks joined into ``[1, H, n*B, D]`` K and V in the model's dtype, in one native call."""
        entries = []
        for stored in layers:
            for plane in ("k", "v"):
                if self.kv_bits is None:
                    entries.append([s[plane] for s in stored])
                else:
                    entries.append([(s[plane], s[f"{plane}_scales"], s[f"{plane}_biases"]) for s in stored])
        if self.kv_bits is None:
            out = ops.concat_blocks(entries)
        else:
            packed, scales, biases = ([[blk[i] for blk in entry] for entry in entries] for i in range(3))
            out = ops.concat_dequantize_blocks(packed, scales, biases, group_size=self.kv_group_size, bits=self.kv_bits)
        return [(out[2 * i], out[2 * i + 1]) for i in range(len(layers))]

    def join_planes(self, layers: Sequence[Sequence[Planes]]) -> list[Planes]:
        """Each layer's blocks joined plane by plane, as stored, in one native call (evaluated)."""
        names = self.plane_names
        out = ops.concat_blocks([[s[name] for s in stored] for stored in layers for name in names])
        mx.eval(out)
        return [dict(zip(names, out[i * len(names) : (i + 1) * len(names)])) for i in range(len(layers))]

    # ------------------------------------------------------------ writing

    def quantized(self, write: BlockWrite) -> Planes:
        """A write's K and V as the planes the pool stores (quantized when the pool is)."""
        if self.kv_bits is None:
            return {"k": write.keys, "v": write.values}
        sources: Planes = {}
        expected = self.expected_planes(write.layer_id)
        for name, x in (("k", write.keys), ("v", write.values)):
            if x.shape[2] == 0:
                for plane in (name, f"{name}_scales", f"{name}_biases"):
                    dim, dtype = expected[plane]
                    sources[plane] = mx.zeros((1, x.shape[1], 0, dim), dtype=getattr(mx, dtype))
                continue
            q, scales, biases = mx.quantize(x, group_size=self.kv_group_size, bits=self.kv_bits)
            sources.update({name: q, f"{name}_scales": scales, f"{name}_biases": biases})
        return sources

    def check_write(self, layer_id: int, arrays: Mapping[str, mx.array], offset: int) -> int:
        """Validate one layer's write (planes, shapes, dtypes, offset); returns its token count.

        Raises:
            ValueError: Anything does not match the pool.
        """
        g = self.spec.layers[layer_id].geometry
        expected = self.expected_planes(layer_id)
        if set(arrays) != set(expected):
            raise ValueError(f"expected planes {sorted(expected)}, got {sorted(arrays)}")
        tokens = {a.shape[2] if a.ndim == 4 else -1 for a in arrays.values()}
        if len(tokens) != 1 or -1 in tokens:
            raise ValueError("every plane of a write must be [1, H, T, d] with the same T")
        for name, a in arrays.items():
            dim, dtype = expected[name]
            if a.shape[0] != 1 or a.shape[1] != g.kv_heads or a.shape[3] != dim or a.dtype != getattr(mx, dtype):
                raise ValueError(
                    f"plane {name} of layer {layer_id} must be [1, "
                    f"{g.kv_heads}, T, {dim}] {dtype}, got {a.dtype} {a.shape}"
                )
        if not (isinstance(offset, int) and 0 <= offset < self.block_tokens):
            raise ValueError(f"offset must be in [0, {self.block_tokens}), got {offset!r}")
        return tokens.pop()

    def split(self, jobs: Sequence[tuple[mx.array, int, mx.array | None]]) -> list[list[mx.array]]:
        """New block arrays for ``(source, offset, head)`` jobs, computed (native ``split_blocks``)."""
        made = ops.split_blocks(
            [j[0] for j in jobs], [j[1] for j in jobs], [j[2] for j in jobs], block_tokens=self.block_tokens
        )
        mx.eval(made)
        return made

    # ------------------------------------------------------------ reading and writing held blocks

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
            layers = list(layer_blocks)
            stored = [
                self._held_data(layer_id, layer_blocks[layer_id])
                + [self.zero_block(layer_id)] * spare_blocks.get(layer_id, 0)
                for layer_id in layers
            ]
        return dict(zip(layers, self.join_kv(stored)))

    def read_planes(self, layer_blocks: Mapping[int, Sequence[KVBlock]]) -> dict[int, dict[str, mx.array]]:
        """Gather blocks as stored (packed and scales too, when quantized), all in one call."""
        with self._lock:
            layers = list(layer_blocks)
            stored = [[self._stored(layer_id, b) for b in layer_blocks[layer_id]] for layer_id in layers]
        return dict(zip(layers, self.join_planes(stored)))

    def block_arrays(self, layer_blocks: Mapping[int, Sequence[KVBlock]]) -> dict[int, list[dict[str, mx.array]]]:
        """The arrays behind blocks, as stored, without a copy: per layer, per block, ``{plane: [H, B, d]}``.

        Blocks are immutable (a write makes new arrays), so holding these is
        safe; it keeps their memory alive even after the blocks are freed.
        """
        with self._lock:
            return {
                layer_id: [dict(data) for data in self._held_data(layer_id, blocks)]
                for layer_id, blocks in layer_blocks.items()
            }

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
        self.write_planes([(w.layer_id, w.blocks, self.quantized(w), w.offset) for w in writes])

    def write_planes(self, writes: Sequence[tuple[int, Sequence[KVBlock], Mapping[str, mx.array], int]]) -> None:
        """Write arrays as stored, ``(layer, blocks, {plane: [1, H, T, d]}, offset)`` each; see :meth:`write`."""
        b = self.block_tokens
        with self._lock:
            jobs = []  # (block ids written, plane, source, offset, head)
            for layer_id, blocks, arrays, offset in writes:
                self._check_layer(layer_id)
                t = self.check_write(layer_id, arrays, offset)
                if t == 0:
                    continue
                n = -(-(offset + t) // b)
                if len(blocks) < n:
                    raise ValueError(f"{t} tokens at offset {offset} need {n} blocks, got {len(blocks)}")
                keys = self._books.owned(layer_id, blocks[:n])
                for key in keys:
                    if self._books.refs[key] > 1:
                        raise BlockOperationError(f"block {key} of layer {layer_id} is shared: copy it before writing")
                for name, a in arrays.items():
                    # Positions before the offset keep the block's earlier tokens
                    # (zeros in a block never written: they are not valid tokens).
                    first = self.data.get(keys[0])
                    head = first[name] if offset and first is not None else None
                    jobs.append((keys, name, a, offset, head))
        if not jobs:
            return
        made = self.split([(a, offset, head) for _, _, a, offset, head in jobs])
        with self._lock:
            for keys, *_ in jobs:
                for key in keys:
                    if self._books.refs.get(key) != 1:
                        raise BlockOperationError(f"block {key} was freed or shared while it was written")
            for (keys, name, *_), arrays in zip(jobs, made):
                for key, array in zip(keys, arrays):
                    self.data.setdefault(key, {})[name] = array
            self._books.mark_written({k for job in jobs for k in job[0]})

    # ------------------------------------------------------------ blocks written in place (paged attention)

    def take(self, layer_id: int, block: KVBlock, agent_id: str) -> Planes:
        """Take a block's arrays out of the pool, so that their one holder writes them in place.

        Until :meth:`put` the block holds no data: a read of it fails, and
        no prefix-index entry of it is live (its generation moves on).

        Raises:
            BlockOperationError: The agent is not the block's only holder, or it holds no data.
        """
        with self._lock:
            (key,) = self._books.owned(layer_id, [block])
            if self._books.refs[key] != 1 or key not in self._books.held.get(agent_id, ()):
                raise BlockOperationError(f"{block} is not held by agent {agent_id!r} alone: it cannot be written")
            data = self.complete(key)
            if data is None:
                raise BlockOperationError(f"{block} holds no data to take")
            del self.data[key]
            self._books.written.discard(key)
            self._books.generation[key] += 1
            return data

    def put(self, layer_id: int, block: KVBlock, planes: Mapping[str, mx.array]) -> None:
        """Store arrays ``[H, B, d]`` (as the pool stores them) as a held block's data.

        Raises:
            BlockOperationError: The block is free or of another layer.
            ValueError: The planes do not match the pool's.
        """
        expected = self.expected_planes(layer_id)
        if set(planes) != set(expected):
            raise ValueError(f"expected planes {sorted(expected)}, got {sorted(planes)}")
        g = self.spec.layers[layer_id].geometry
        for name, a in planes.items():
            dim, dtype = expected[name]
            if a.shape != (g.kv_heads, self.block_tokens, dim) or a.dtype != getattr(mx, dtype):
                raise ValueError(f"plane {name} must be [{g.kv_heads}, {self.block_tokens}, {dim}] {dtype}")
        with self._lock:
            (key,) = self._books.owned(layer_id, [block])
            self.data[key] = dict(planes)
            self._books.mark_written([key])

    # ------------------------------------------------------------ helpers (lock held)

    def _held_data(self, layer_id: int, blocks: Sequence[KVBlock]) -> list[Planes]:
        """The arrays of blocks an agent holds (a layer's whole list at once: the read path)."""
        self._check_layer(layer_id)
        books, out = self._books, []
        for block in blocks:
            key = block.block_id if isinstance(block, KVBlock) and block.layer_id == layer_id else -1
            data = self.complete(key)
            if books.layer.get(key) != layer_id or not books.refs.get(key) or data is None:
                data = self._stored(layer_id, block)  # the slow path says exactly what is wrong
            out.append(data)
        return out

    def _stored(self, layer_id: int, block: KVBlock) -> Planes:
        self._check_layer(layer_id)
        (key,) = self._books.owned(layer_id, [block])
        data = self.complete(key)
        if data is None:
            raise BlockOperationError(f"{block} was never written")
        return data

    def _check_layer(self, layer_id: int) -> None:
        if isinstance(layer_id, bool) or not isinstance(layer_id, int) or not 0 <= layer_id < self.spec.num_layers:
            raise InvalidRequestError(f"layer {layer_id!r} is not a layer of this model")
