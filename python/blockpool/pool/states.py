"""Recurrent-state snapshots in the pool: one block per snapshot, one array per slot of the state.

A state layer's block holds the arrays of one sequence's state (planes
``s0``, ``s1``, ... as its :class:`~blockpool.kinds.StateGeometry` names
them), in the model's dtype. Writes store new array objects, evaluated, so
a snapshot never aliases the live cache it was taken from; reads hand out
the stored arrays (immutable values) without a copy.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping, Sequence

import mlx.core as mx

from blockpool.block import KVBlock
from blockpool.errors import BlockOperationError
from blockpool.pool.books import BlockBooks
from blockpool.pool.storage import BlockStorage

State = list[mx.array | None]


class StateSlots:
    """Reads and writes state snapshots through the pool's storage and books (under the pool's lock)."""

    def __init__(self, storage: BlockStorage, books: BlockBooks, lock: threading.RLock):
        self._storage, self._books, self._lock = storage, books, lock

    def read(self, layer_blocks: Mapping[int, Sequence[KVBlock]]) -> dict[int, list[State]]:
        """Per layer, per block, its state (slot by slot; None for a slot the model never fills)."""
        out: dict[int, list[State]] = {}
        with self._lock:
            for layer_id, blocks in layer_blocks.items():
                geometry = self._storage.spec.layers[layer_id].geometry
                states = []
                for block in blocks:
                    data = self._stored(layer_id, block)
                    states.append([data.get(f"s{i}") if shape else None for i, shape in enumerate(geometry.shapes)])
                out[layer_id] = states
        return out

    def write(self, writes: Sequence[tuple[int, Sequence[KVBlock], Sequence[State]]]) -> None:
        """Store states into held, unshared blocks of state layers: ``(layer, blocks, states)`` each.

        All or nothing: shapes and ownership are checked first.

        Raises:
            ValueError: A state does not match the layer's geometry.
            BlockOperationError: A block is free, another layer's, or shared.
        """
        jobs = []
        with self._lock:
            for layer_id, blocks, states in writes:
                geometry = self._storage.spec.layers[layer_id].geometry
                if not hasattr(geometry, "shapes"):
                    raise ValueError(f"layer {layer_id} stores tokens, not state")
                if len(blocks) != len(states):
                    raise ValueError(f"{len(states)} states for {len(blocks)} blocks")
                keys = self._books.owned(layer_id, blocks)
                for key, state in zip(keys, states):
                    if self._books.refs[key] > 1:
                        raise BlockOperationError(f"block {key} of layer {layer_id} is shared: it is read-only")
                    jobs.append((key, _planes(layer_id, geometry, state)))
        copies = [{name: mx.array(a) for name, a in planes.items()} for _, planes in jobs]
        mx.eval(copies)
        with self._lock:
            for key, _ in jobs:
                if self._books.refs.get(key) != 1:
                    raise BlockOperationError(f"block {key} was freed or shared while it was written")
            for (key, _), planes in zip(jobs, copies):
                self._storage.data[key] = planes
            self._books.mark_written({key for key, _ in jobs})

    def _stored(self, layer_id: int, block: KVBlock) -> dict[str, mx.array]:
        (key,) = self._books.owned(layer_id, [block])
        data = self._storage.complete(key)
        if data is None:
            raise BlockOperationError(f"{block} was never written")
        return data


def _planes(layer_id: int, geometry: object, state: State) -> dict[str, mx.array]:
    planes = {}
    for i, (shape, dtype) in enumerate(zip(geometry.shapes, geometry.dtypes)):
        array = state[i] if i < len(state) else None
        if shape is None:
            continue
        # A slot may be smaller than its full size early on (an n-gram slot grows to n - 1 tokens).
        fits = array is not None and array.ndim == len(shape) and all(a <= b for a, b in zip(array.shape, shape))
        if not fits or str(array.dtype).removeprefix("mlx.core.") != dtype:
            got = None if array is None else f"{array.dtype} {tuple(array.shape)}"
            raise ValueError(f"state slot {i} of layer {layer_id} must be {dtype}, at most {tuple(shape)}, got {got}")
        planes[f"s{i}"] = array
    if len(state) != len(geometry.shapes):
        raise ValueError(f"layer {layer_id} state has {len(state)} slots, expected {len(geometry.shapes)}")
    return planes
