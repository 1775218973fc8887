"""What a model's cache looks like, read off the model itself.

A :class:`ModelCacheSpec` lists the model's cache *entries* (``layers``):
one per model layer, or one per part of a composite layer (mlx-lm's
``CacheList``, e.g. DeepSeek V3.2's MLA latent cache and indexer keys, or
Falcon-H1's SSM state and attention KV), each with its own geometry and
cache kind. ``groups`` says how the entries make up the model's layers;
:meth:`ModelCacheSpec.assemble` and :meth:`~ModelCacheSpec.disassemble`
turn a list of entry caches into the list the model takes, and back.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import CacheList, make_prompt_cache

from blockpool.kinds import (
    BLOCK_TOKENS,
    CacheKind,
    Geometry,
    StateGeometry,
    UnusedCache,
    kind_for,
    kind_from_dict,
    kind_of_cache,
)

__all__ = ["BLOCK_TOKENS", "Geometry", "LayerSpec", "ModelCacheSpec", "StateGeometry"]


@dataclass(frozen=True)
class LayerSpec:
    """One cache entry: its geometry, and its kind (for attention, from its window: None is full attention).

    ``LayerSpec(geometry, window)`` describes an attention layer;
    ``LayerSpec(geometry, kind=...)`` any kind (the window then follows
    from the kind).
    """

    geometry: Geometry | StateGeometry
    window: int | None = None
    kind: CacheKind = None  # type: ignore[assignment]  # set from ``window`` when not given

    def __post_init__(self) -> None:
        if self.kind is None:
            object.__setattr__(self, "kind", kind_for(self.window))
        elif self.window is None:
            object.__setattr__(self, "window", self.kind.window)

    @property
    def rules(self) -> CacheKind:
        """The layer's cache kind (its earlier name)."""
        return self.kind

    @property
    def attention(self) -> str:
        """The kind's name: ``"full"``, ``"sliding"``, ``"chunked"`` or ``"recurrent"``."""
        return self.kind.name

    @property
    def kv_heads(self) -> int:
        return getattr(self.geometry, "kv_heads", 0)

    @property
    def k_head_dim(self) -> int:
        return getattr(self.geometry, "k_head_dim", 0)

    @property
    def v_head_dim(self) -> int:
        return getattr(self.geometry, "v_head_dim", 0)

    @property
    def dtype(self) -> str:
        return self.geometry.dtype


@dataclass(frozen=True)
class ModelCacheSpec:
    """The cache layout of a model: one :class:`LayerSpec` per cache entry, and how entries make up layers.

    ``groups[i]`` lists the entries of model layer ``i``: one for a plain
    layer, several for a composite (``CacheList``) one. By default every
    entry is a model layer of its own.
    """

    layers: tuple[LayerSpec, ...]
    block_tokens: int = BLOCK_TOKENS
    groups: tuple[tuple[int, ...], ...] = None  # type: ignore[assignment]  # default: one entry per layer
    cache_lists: tuple[int, ...] = ()  # model layers whose cache is a CacheList (of one or more parts)
    geometries: tuple[Geometry | StateGeometry, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.groups is None:
            object.__setattr__(self, "groups", tuple((i,) for i in range(len(self.layers))))
        if sorted(e for g in self.groups for e in g) != list(range(len(self.layers))):
            raise ValueError("groups must name every entry exactly once")
        distinct: list[Geometry | StateGeometry] = []
        for layer in self.layers:
            if layer.geometry not in distinct:
                distinct.append(layer.geometry)
        object.__setattr__(self, "geometries", tuple(distinct))

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelCacheSpec:
        """Read the spec off an mlx-lm model.

        The kinds come from the model's own ``make_cache()`` (or mlx-lm's
        default), through each cache's own class (:mod:`blockpool.kinds`), and
        the geometries (head counts and dims, state shapes, dtype) from the
        caches after a one-token probe forward pass, so no per-architecture
        table is needed. A ``CacheList`` layer is one entry per sub-cache.

        Raises:
            UnsupportedModelError: A cache is of a kind no handler stores
                (:func:`blockpool.kinds.kind_of_cache` names its class).
        """
        caches = make_prompt_cache(model)
        entries, groups, lists = [], [], []
        for layer_id, cache in enumerate(caches):
            parts = list(cache.caches) if type(cache) is CacheList else [cache]
            if type(cache) is CacheList:
                lists.append(layer_id)
            groups.append(tuple(range(len(entries), len(entries) + len(parts))))
            entries += [(part, kind_of_cache(layer_id, part)) for part in parts]
        # A few tokens, so that every state slot reaches its full size (an n-gram slot grows to n - 1).
        model(mx.array([[0]]), cache=caches)
        model(mx.array([[0] * 8]), cache=caches)
        layers = []
        for part, kind in entries:
            if kind.storage == "tokens" and getattr(part, "keys", None) is None:
                kind = UnusedCache()  # the model never fills it
            layers.append(LayerSpec(kind.geometry_of(part), kind=kind))
        return cls(tuple(layers), groups=tuple(groups), cache_lists=tuple(lists))

    @property
    def model_layers(self) -> int:
        """Layers of the model (entries grouped as the model takes its caches)."""
        return len(self.groups)

    @property
    def batchable(self) -> bool:
        """Whether several sequences decode in one batch (every kind can be merged)."""
        return all(layer.kind.batchable for layer in self.layers)

    @property
    def state_layers(self) -> list[int]:
        """The entries that store recurrent state snapshots."""
        return [i for i, layer in enumerate(self.layers) if layer.kind.storage == "state"]

    def assemble(self, entries: list[Any]) -> list[Any]:
        """The model's cache list from one cache per entry (a ``CacheList`` for a composite layer)."""
        lists = set(self.cache_lists)
        return [CacheList(*(entries[e] for e in g)) if i in lists else entries[g[0]] for i, g in enumerate(self.groups)]

    def disassemble(self, caches: list[Any]) -> list[Any]:
        """One cache per entry from the model's cache list (the inverse of :meth:`assemble`)."""
        if len(caches) != self.model_layers:
            raise ValueError(f"{len(caches)} caches for a model of {self.model_layers} layers")
        out: list[Any] = [None] * self.num_layers
        for i, (group, cache) in enumerate(zip(self.groups, caches)):
            parts = list(cache.caches) if i in self.cache_lists else [cache]
            for e, part in zip(group, parts):
                out[e] = part
        return out

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def geometry_index(self, layer_id: int) -> int:
        """Which geometry (and so which pool id space) a layer uses."""
        return self.geometries.index(self.layers[layer_id].geometry)

    def layers_of(self, geometry: int) -> list[int]:
        """The layers that use a geometry."""
        g = self.geometries[geometry]
        return [i for i, layer in enumerate(self.layers) if layer.geometry == g]

    def bytes_per_block(self, layer_id: int, kv_bits: int | None = None, group_size: int = 64) -> int:
        """Bytes of one block of a layer (K and V for ``block_tokens`` tokens, or one state snapshot), as stored."""
        return self.layers[layer_id].geometry.bytes_per_block(self.block_tokens, kv_bits, group_size)

    def kind(self, layer_id: int) -> CacheKind:
        """The cache kind of a layer."""
        return self.layers[layer_id].kind

    def rules(self, layer_id: int) -> CacheKind:
        """The cache kind of a layer (its earlier name)."""
        return self.layers[layer_id].kind

    def max_blocks(self, layer_id: int) -> int | None:
        """Most blocks a layer ever holds: ``ceil(window / B) + 1`` if sliding, else None."""
        return self.kind(layer_id).max_blocks(self.block_tokens)

    def blocks_held(self, layer_id: int, tokens: int) -> int:
        """Blocks a layer holds for an agent of ``tokens`` tokens (a recurrent layer: its tail snapshot;
        checkpoints come on top)."""
        return self.kind(layer_id).blocks_held(tokens, self.block_tokens)

    def block_range(self, layer_id: int, tokens: int) -> tuple[int, int]:
        """Logical block indices ``[lo, hi)`` a token layer keeps for ``tokens`` tokens.

        A full layer keeps every block; a sliding layer only those covering
        its last ``window`` tokens; a chunked layer those of the current chunk.
        """
        return self.kind(layer_id).block_range(tokens, self.block_tokens)

    def bytes_for_tokens(self, tokens: int, kv_bits: int | None = None, group_size: int = 64) -> int:
        """Pool bytes one agent of ``tokens`` tokens holds (without recurrent checkpoints)."""
        return sum(
            self.blocks_held(i, tokens) * self.bytes_per_block(i, kv_bits, group_size) for i in range(self.num_layers)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, for persistence and compatibility checks.

        A model of attention layers only is described as before recurrent
        kinds existed, so files of such models still compare equal.
        """
        data: dict[str, Any] = {"block_tokens": self.block_tokens, "layers": [_layer_dict(x) for x in self.layers]}
        if self.cache_lists:
            data["groups"] = [list(g) for g in self.groups]
            data["cache_lists"] = list(self.cache_lists)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCacheSpec:
        """The spec :meth:`to_dict` described (``ValueError``/``KeyError``/``TypeError`` if it is malformed)."""
        layers = []
        for d in data["layers"]:
            kind = kind_from_dict(d)
            if kind.storage == "state":
                shapes = tuple(None if s is None else tuple(int(n) for n in s) for s in d["shapes"])
                geometry: Geometry | StateGeometry = StateGeometry(shapes, tuple(d["dtypes"]))
            else:
                geometry = Geometry(d["kv_heads"], d["k_head_dim"], d["v_head_dim"], d["dtype"])
            layers.append(LayerSpec(geometry, kind=kind))
        groups = data.get("groups")
        groups = tuple(tuple(int(e) for e in g) for g in groups) if groups is not None else None
        lists = tuple(int(i) for i in data.get("cache_lists", ()))
        return cls(tuple(layers), block_tokens=data["block_tokens"], groups=groups, cache_lists=lists)


def _layer_dict(layer: LayerSpec) -> dict[str, Any]:
    g = layer.geometry
    if isinstance(g, StateGeometry):
        return {"shapes": [list(s) if s else None for s in g.shapes], "dtypes": list(g.dtypes), **layer.kind.describe()}
    return {
        "kv_heads": g.kv_heads,
        "k_head_dim": g.k_head_dim,
        "v_head_dim": g.v_head_dim,
        "dtype": g.dtype,
        **layer.kind.describe(),
    }
