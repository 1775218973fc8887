"""Reconstruction: an agent's history, from its blocks or its file, as the mlx-lm caches the model writes into.

Every token layer is gathered in one native call (dequantized in the same
pass when the pool is quantized), straight into the array the cache keeps,
with the spare room its kind asks for (``room``): one copy. A recurrent
layer's cache gets the snapshot taken at the history's end.
:func:`entry_caches` gives one cache per spec entry (what the engine works
with); :func:`to_mlx_caches` the list the model takes (composite layers as
``CacheList``).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import mlx.core as mx

from blockpool.block import AgentBlocks
from blockpool.kinds import arrays_in, blocks_for


def to_mlx_caches(pool: Any, agent: AgentBlocks, spare_tokens: int = 0) -> list[Any]:
    """Rebuild the mlx-lm caches an agent's blocks hold: one per model layer, as ``make_prompt_cache`` makes them.

    Full-attention layers become a ``KVCache`` of ``offset = total_tokens``
    with room for ``spare_tokens`` more tokens; sliding-window layers a
    ``RotatingKVCache`` holding the last ``window`` tokens, in the physical
    order the original cache had; chunked layers a ``ChunkedKVCache`` of the
    current chunk; recurrent layers an ``ArraysCache`` holding the state at
    the history's end. Decoding continues exactly as if the caches had never left.
    """
    return agent.spec.assemble(entry_caches(pool, agent, spare_tokens))


def entry_caches(pool: Any, agent: AgentBlocks, spare_tokens: int = 0, skip: Collection[int] = ()) -> list[Any]:
    """The caches of an agent's blocks, one per spec entry (see :func:`to_mlx_caches`); None for the
    entries in ``skip`` (layers that read their blocks in place, :mod:`blockpool.paged`)."""
    spec, total, b = agent.spec, agent.total_tokens, agent.spec.block_tokens
    token_layers = [i for i in range(spec.num_layers) if spec.kind(i).storage == "tokens" and i not in skip]
    spare: dict[int, int] = {}
    for layer_id in token_layers:
        room = spec.kind(layer_id).room(total, spare_tokens, b)
        if room:
            spare[layer_id] = blocks_for(total + room, b) - blocks_for(total, b)
    wanted = {i: agent.blocks[i] for i in token_layers if agent.blocks[i] or spare.get(i)}
    data = pool.read(wanted, spare) if wanted and (total or spare_tokens) else {}
    tails = {i: agent.blocks[i][-1:] for i in spec.state_layers if total}
    states = pool.read_states(tails) if tails else {}
    caches: list[Any] = []
    for layer_id in range(spec.num_layers):
        kind = spec.kind(layer_id)
        if layer_id in skip:
            caches.append(None)
        elif layer_id in states:
            caches.append(kind.rebuild(states[layer_id][0]))
        elif layer_id in data:
            keys, values = data[layer_id]
            start = agent.first_block(layer_id) * b
            caches.append(kind.rebuild(keys, values, total, start, agent.ring_index.get(layer_id)))
        elif total:
            caches.append(kind.empty_at(total))  # it holds no tokens at this point (a chunk just began)
        else:
            caches.append(kind.new_cache())
    return caches


def file_to_mlx_caches(file: Any, keep: int, spare_tokens: int = 0) -> list[Any]:
    """The caches of the first ``keep`` tokens of an agent file (``blockpool.persistence.AgentFile``), one per entry.

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
        elif kind.storage == "state":
            caches.append(kind.rebuild(file.state_at(layer_id, keep)))
        else:
            caches.append(_file_token_cache(file, layer_id, keep, spare_tokens))
    mx.eval(arrays_in([c.state for c in caches]))
    return caches


def _file_token_cache(file: Any, layer_id: int, keep: int, spare_tokens: int) -> Any:
    spec, kind = file.spec, file.spec.kind(layer_id)
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
    return kind.rebuild(keys, values, keep, first, ring)
