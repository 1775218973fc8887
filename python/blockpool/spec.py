"""What a model's KV cache looks like, read off the model itself."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.cache import make_prompt_cache

from blockpool.kinds import CacheKind, kind_for, kind_of_cache

#: Tokens per block; matches mlx-lm's ``KVCache.step``.
BLOCK_TOKENS = 256


@dataclass(frozen=True)
class Geometry:
    """The shape of one layer's K and V: layers with equal geometry share a pool."""

    kv_heads: int
    k_head_dim: int
    v_head_dim: int
    dtype: str  # an mlx dtype name, e.g. "bfloat16"

    @property
    def mx_dtype(self) -> mx.Dtype:
        return getattr(mx, self.dtype)

    def planes(self, kv_bits: int | None = None, group_size: int = 64) -> dict[str, tuple[int, str]]:
        """The arrays one block of this geometry is stored in: name -> (last dim, dtype).

        Unquantized: ``k`` and ``v``. Quantized (``mx.quantize`` layout along
        the head dim): packed ``k``/``v`` in uint32, and ``k_scales``,
        ``k_biases``, ``v_scales``, ``v_biases`` in the model's dtype.
        """
        if kv_bits is None:
            return {"k": (self.k_head_dim, self.dtype), "v": (self.v_head_dim, self.dtype)}
        planes = {}
        for name, dim in (("k", self.k_head_dim), ("v", self.v_head_dim)):
            planes[name] = (dim * kv_bits // 32, "uint32")
            planes[f"{name}_scales"] = (dim // group_size, self.dtype)
            planes[f"{name}_biases"] = (dim // group_size, self.dtype)
        return planes

    def bytes_per_block(
        self, block_tokens: int = BLOCK_TOKENS, kv_bits: int | None = None, group_size: int = 64
    ) -> int:
        """Bytes of one block: K and V of one layer for ``block_tokens`` tokens, as stored."""
        return sum(
            self.kv_heads * block_tokens * dim * getattr(mx, dtype).size
            for dim, dtype in self.planes(kv_bits, group_size).values()
        )


@dataclass(frozen=True)
class LayerSpec:
    """One layer's cache: its geometry, and its window if it is a sliding-window layer."""

    geometry: Geometry
    window: int | None = None

    @property
    def kind(self) -> CacheKind:
        """The layer's cache kind: what it keeps and how its cache moves between the pool and mlx-lm."""
        return kind_for(self.window)

    @property
    def rules(self) -> CacheKind:
        """The layer's cache kind (its earlier name)."""
        return self.kind

    @property
    def attention(self) -> str:
        """The kind's name: ``"full"`` or ``"sliding"``."""
        return self.kind.name

    @property
    def kv_heads(self) -> int:
        return self.geometry.kv_heads

    @property
    def k_head_dim(self) -> int:
        return self.geometry.k_head_dim

    @property
    def v_head_dim(self) -> int:
        return self.geometry.v_head_dim

    @property
    def dtype(self) -> str:
        return self.geometry.dtype


@dataclass(frozen=True)
class ModelCacheSpec:
    """The KV cache layout of a model: one :class:`LayerSpec` per layer."""

    layers: tuple[LayerSpec, ...]
    block_tokens: int = BLOCK_TOKENS
    geometries: tuple[Geometry, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        distinct: list[Geometry] = []
        for layer in self.layers:
            if layer.geometry not in distinct:
                distinct.append(layer.geometry)
        object.__setattr__(self, "geometries", tuple(distinct))

    @classmethod
    def from_model(cls, model: nn.Module) -> ModelCacheSpec:
        """Read the spec off an mlx-lm model.

        The layer kinds come from the model's own ``make_cache()`` (or mlx-lm's
        default), and the head counts, head dims and dtype from the cache
        shapes after a one-token probe forward pass, so no per-architecture
        table is needed.

        Raises:
            UnsupportedModelError: A layer's cache is of a kind no handler
                stores (:func:`blockpool.kinds.kind_of_cache`).
        """
        caches = make_prompt_cache(model)
        kinds = [kind_of_cache(i, c) for i, c in enumerate(caches)]
        model(mx.array([[0]]), cache=caches)
        layers = []
        for cache, kind in zip(caches, kinds):
            keys, values = cache.keys, cache.values
            geometry = Geometry(
                kv_heads=keys.shape[1],
                k_head_dim=keys.shape[3],
                v_head_dim=values.shape[3],
                dtype=str(keys.dtype).removeprefix("mlx.core."),
            )
            layers.append(LayerSpec(geometry, kind.window))
        return cls(tuple(layers))

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
        """Bytes of one block of a layer (K and V for ``block_tokens`` tokens), as stored."""
        return self.layers[layer_id].geometry.bytes_per_block(self.block_tokens, kv_bits, group_size)

    def kind(self, layer_id: int) -> CacheKind:
        """The cache kind of a layer."""
        return self.layers[layer_id].kind

    def rules(self, layer_id: int) -> CacheKind:
        """The cache kind of a layer (its earlier name)."""
        return self.layers[layer_id].kind

    def max_blocks(self, layer_id: int) -> int | None:
        """Most blocks a layer ever holds: ``ceil(window / B) + 1`` if sliding, else None."""
        return self.rules(layer_id).max_blocks(self.block_tokens)

    def blocks_held(self, layer_id: int, tokens: int) -> int:
        """Blocks a layer holds for an agent of ``tokens`` tokens."""
        lo, hi = self.block_range(layer_id, tokens)
        return hi - lo

    def block_range(self, layer_id: int, tokens: int) -> tuple[int, int]:
        """Logical block indices ``[lo, hi)`` a layer keeps for ``tokens`` tokens.

        A full layer keeps every block; a sliding layer only those covering
        its last ``window`` tokens.
        """
        return self.rules(layer_id).block_range(tokens, self.block_tokens)

    def bytes_for_tokens(self, tokens: int, kv_bits: int | None = None, group_size: int = 64) -> int:
        """Pool bytes one agent of ``tokens`` tokens holds."""
        return sum(
            self.blocks_held(i, tokens) * self.bytes_per_block(i, kv_bits, group_size) for i in range(self.num_layers)
        )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready description, for persistence and compatibility checks."""
        return {
            "block_tokens": self.block_tokens,
            "layers": [
                {
                    "kv_heads": layer.kv_heads,
                    "k_head_dim": layer.k_head_dim,
                    "v_head_dim": layer.v_head_dim,
                    "dtype": layer.dtype,
                    **layer.kind.describe(),
                }
                for layer in self.layers
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelCacheSpec:
        layers = tuple(
            LayerSpec(Geometry(d["kv_heads"], d["k_head_dim"], d["v_head_dim"], d["dtype"]), d["window"])
            for d in data["layers"]
        )
        return cls(layers, block_tokens=data["block_tokens"])
