"""Agents between the pool and their files: export (no copy) and import (all or nothing).

:func:`export_agent` describes an agent's valid tokens as stored, backed by
its blocks' own arrays (:class:`BlockRows`), so that writing it needs no
second copy in memory; :func:`import_agent` allocates blocks for a loaded
file and writes its tokens into them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from blockpool.block import AgentBlocks
from blockpool.errors import IncompatibleCacheError
from blockpool.persistence.format import AgentFile


class BlockRows:
    """One plane of one layer of an agent's history, as the pool holds it: block arrays, not a copy.

    It has the shape of the file's tensor, ``[1, H, tokens, d]``: token ``t``
    is row ``first + t`` of the blocks laid end to end. Written to a file
    piece by piece (:meth:`pieces`, numpy views of the blocks, in the file's
    order), so saving an agent needs no second copy of it in memory.
    """

    def __init__(self, blocks: Sequence[mx.array], first: int, tokens: int):
        self.blocks, self.first, self.tokens = list(blocks), first, tokens
        heads, block_tokens, dim = self.blocks[0].shape
        self.block_tokens = block_tokens
        self.shape = (1, heads, tokens, dim)
        self.dtype = self.blocks[0].dtype
        self.nbytes = heads * tokens * dim * self.dtype.size
        # numpy views, made on this (the engine's) thread: a writer thread only reads memory
        viewable = [b.view(mx.uint16) if self.dtype == mx.bfloat16 else b for b in self.blocks]
        mx.eval(viewable)
        self._views = [np.asarray(v) for v in viewable]

    def pieces(self) -> Iterator[np.ndarray]:
        """Contiguous byte runs in the file's order: head by head, token by token."""
        b = self.block_tokens
        for h in range(self.shape[1]):
            t = 0
            while t < self.tokens:
                row = self.first + t
                j, r = divmod(row, b)
                n = min(b - r, self.tokens - t)
                yield self._views[j][h, r : r + n, :]
                t += n

    def array(self) -> mx.array:
        """The plane as one ``[1, H, tokens, d]`` array (a copy)."""
        if not self.tokens:
            return mx.zeros(self.shape, dtype=self.dtype)
        joined = mx.concatenate(self.blocks, axis=1)[None]
        return joined[..., self.first : self.first + self.tokens, :]


def as_array(plane: mx.array | BlockRows) -> mx.array:
    """A file plane as an array (block-backed planes are copied)."""
    return plane.array() if isinstance(plane, BlockRows) else plane


def export_agent(pool: Any, agent: AgentBlocks, fingerprint: str) -> AgentFile:
    """An agent's valid tokens as stored, for writing: planes backed by its blocks' own arrays (no copy).

    The returned file keeps those arrays alive, even once the blocks are
    freed, until it is dropped.
    """
    spec, b, total = agent.spec, agent.spec.block_tokens, agent.total_tokens
    data = pool.block_arrays({layer: blocks for layer, blocks in agent.blocks.items() if blocks}) if total else {}
    first, planes = [], []
    for layer_id, layer in enumerate(spec.layers):
        if layer.kind.storage == "state":  # its snapshots, as stored (small: no copy either)
            first.append(0)
            planes.append({f"{j}.{n}": a for j, blk in enumerate(data.get(layer_id, [])) for n, a in blk.items()})
            continue
        start = agent.valid_start(layer_id)
        if total:
            offset = agent.first_block(layer_id) * b
            blocks = data[layer_id]
            stored = {
                name: BlockRows([blk[name] for blk in blocks], start - offset, total - start) for name in blocks[0]
            }
        else:
            g = layer.geometry
            stored = {
                name: mx.zeros((1, g.kv_heads, 0, dim), dtype=getattr(mx, dtype))
                for name, (dim, dtype) in g.planes(pool.kv_bits, pool.kv_group_size).items()
            }
        first.append(start)
        planes.append(stored)
    return AgentFile(
        agent.agent_id,
        fingerprint,
        spec,
        list(agent.token_ids),
        first,
        planes,
        dict(agent.ring_index),
        pool.kv_bits,
        pool.kv_group_size,
        {i: list(agent.positions.get(i, [])) for i in spec.state_layers},
    )


def import_agent(pool: Any, file: AgentFile, *, force: bool = False, consume: bool = False) -> AgentBlocks:
    """Allocate blocks for a loaded agent and write its tokens into them, all or nothing.

    ``force``: allocate past the budget (a copy whose source the caller
    frees right after). ``consume``: the caller gives ``file`` up: each
    layer's arrays are dropped from it once its blocks are written, so that
    where nothing else holds them (a file read back from disk) the import
    needs its blocks and one layer of the file at most, not the whole file
    twice.

    Raises:
        IncompatibleCacheError: The file's cache layout or quantization is not the pool's.
        PoolExhaustedError: Its blocks do not fit; nothing was allocated.
    """
    if file.spec != pool.spec:
        raise IncompatibleCacheError(f"agent {file.agent_id!r} was stored for another cache layout")
    if (file.kv_bits, file.kv_group_size if file.kv_bits else None) != (
        pool.kv_bits,
        pool.kv_group_size if pool.kv_bits else None,
    ):
        raise IncompatibleCacheError(
            f"agent {file.agent_id!r} was stored with kv_bits={file.kv_bits}, the pool uses kv_bits={pool.kv_bits}"
        )
    spec, b, total = file.spec, file.spec.block_tokens, len(file.token_ids)
    counts, starts = {}, {}
    for layer_id in range(spec.num_layers):
        lo = file.first_token[layer_id] // b
        hi = -(-total // b)
        counts[layer_id], starts[layer_id] = hi - lo, lo * b
    for layer_id in spec.state_layers:
        counts[layer_id] = len(file.positions[layer_id])
    reserved = pool.reserve(counts, file.agent_id, force=force)
    state_layers = set(spec.state_layers)
    try:
        pool.write_states(
            [(i, reserved[i], [file.state_at(i, p) for p in file.positions[i]]) for i in spec.state_layers if total]
        )
        for layer_id in range(spec.num_layers):
            if total > file.first_token[layer_id] and layer_id not in state_layers:
                arrays = {n: as_array(p) for n, p in file.planes[layer_id].items()}
                offset = file.first_token[layer_id] - starts[layer_id]
                pool.write_planes([(layer_id, reserved[layer_id], arrays, offset)])
                del arrays
            if consume and layer_id not in state_layers:
                file.planes[layer_id] = {}
        valid_from = {i: file.first_token[i] for i in range(spec.num_layers) if i not in state_layers}
        return AgentBlocks(
            file.agent_id,
            spec,
            reserved,
            total,
            list(file.token_ids),
            dict(file.ring_index),
            valid_from,
            pool_id=pool.id,
            generation=pool.new_handle_generation(),
            positions={i: list(file.positions[i]) for i in spec.state_layers},
        )
    except Exception:
        pool.free([blk for blocks in reserved.values() for blk in blocks], file.agent_id)
        raise
