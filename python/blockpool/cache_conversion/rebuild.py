"""Reconstruction: an agent's history, from its blocks or its file, as the mlx-lm caches the model writes into.

Every layer is gathered in one native call (dequantized in the same pass
when the pool is quantized), straight into the array the cache keeps, with
the spare room its kind asks for (:meth:`CacheKind.room`): one copy.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx

from blockpool.block import AgentBlocks
from blockpool.kinds import blocks_for


def to_mlx_caches(pool: Any, agent: AgentBlocks, spare_tokens: int = 0) -> list[Any]:
    """Rebuild the mlx-lm caches an agent's blocks hold.

    Full-attention layers become a ``KVCache`` of ``offset = total_tokens``
    with room for ``spare_tokens`` more tokens; sliding-window layers a
    ``RotatingKVCache`` holding the last ``window`` tokens, in the physical
    order the original cache had, so that decoding continues exactly as if
    the cache had never left.
    """
    spec, total, b = agent.spec, agent.total_tokens, agent.spec.block_tokens
    spare: dict[int, int] = {}
    for layer_id in range(spec.num_layers):
        room = spec.kind(layer_id).room(total, spare_tokens, b)
        if room:
            spare[layer_id] = blocks_for(total + room, b) - blocks_for(total, b)
    wanted = {layer: blocks for layer, blocks in agent.blocks.items() if blocks or spare.get(layer)}
    data = pool.read(wanted, spare) if total or spare_tokens else {}
    caches: list[Any] = []
    for layer_id in range(spec.num_layers):
        kind = spec.kind(layer_id)
        if layer_id not in data:
            caches.append(kind.new_cache())
            continue
        keys, values = data[layer_id]
        start = agent.first_block(layer_id) * b
        caches.append(kind.rebuild(keys, values, total, start, agent.ring_index.get(layer_id)))
    return caches


def file_to_mlx_caches(file: Any, keep: int, spare_tokens: int = 0) -> list[Any]:
    """The mlx-lm caches of the first ``keep`` tokens of an agent file (``blockpool.persistence.AgentFile``).

    The file's arrays go straight into the caches (dequantized if the file
    is quantized): one copy, the same as a resume from the pool. Layers get
    the room their kind asks for ``spare_tokens`` more tokens. The caller
    checks :func:`~blockpool.cache_conversion.can_resume` first.
    """
    spec = file.spec
    caches: list[Any] = []
    for layer_id in range(spec.num_layers):
        kind = spec.kind(layer_id)
        if keep == 0:
            caches.append(kind.new_cache())
            continue
        planes = {
            name: plane.array() if hasattr(plane, "array") else plane for name, plane in file.planes[layer_id].items()
        }
        first = file.first_token[layer_id]
        if file.kv_bits:
            keys, values = (
                mx.dequantize(
                    planes[n],
                    planes[f"{n}_scales"],
                    planes[f"{n}_biases"],
                    group_size=file.kv_group_size,
                    bits=file.kv_bits,
                )
                for n in ("k", "v")
            )
        else:
            keys, values = planes["k"], planes["v"]
        keys, values = keys[..., : keep - first, :], values[..., : keep - first, :]
        room = kind.room(keep, spare_tokens, spec.block_tokens)
        if room:
            heads = keys.shape[1]
            keys = mx.concatenate([keys, mx.zeros((1, heads, room, keys.shape[3]), keys.dtype)], axis=2)
            values = mx.concatenate([values, mx.zeros((1, heads, room, values.shape[3]), values.dtype)], axis=2)
        ring = file.ring_index.get(layer_id) if keep == len(file.token_ids) else None
        caches.append(kind.rebuild(keys, values, keep, first, ring))
    mx.eval([c.state[:2] for c in caches if c.keys is not None])
    return caches
