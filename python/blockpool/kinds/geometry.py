"""What one block of a layer stores: K and V planes of tokens, or the arrays of a recurrent state.

Layers with equal geometry share a pool id space; a block's bytes follow
from its geometry (and, for K and V, the pool's quantization).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import mlx.core as mx

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

    def token_bytes(self) -> int:
        """Bytes of one token's K and V in a working cache (the model's dtype)."""
        return self.kv_heads * (self.k_head_dim + self.v_head_dim) * self.mx_dtype.size


@dataclass(frozen=True)
class StateGeometry:
    """The arrays of one recurrent layer's state for one sequence (conv state, SSM state, ...).

    ``shapes[i]`` and ``dtypes[i]`` describe slot ``i`` of mlx-lm's
    ``ArraysCache`` without its batch axis; a slot the model never fills is
    ``None``. A block of this geometry is one snapshot of the state: stored in
    the model's dtype whatever the pool's quantization (only K and V are
    quantized).
    """

    shapes: tuple[tuple[int, ...] | None, ...]
    dtypes: tuple[str | None, ...]

    def planes(self, kv_bits: int | None = None, group_size: int = 64) -> dict[str, tuple[tuple[int, ...], str]]:
        """The arrays one snapshot is stored in: ``s<slot>`` -> (shape, dtype), for the slots in use."""
        return {f"s{i}": (shape, dtype) for i, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes)) if shape}

    def bytes_per_block(
        self, block_tokens: int = BLOCK_TOKENS, kv_bits: int | None = None, group_size: int = 64
    ) -> int:
        """Bytes of one snapshot."""
        return sum(math.prod(shape) * getattr(mx, dtype).size for shape, dtype in self.planes().values())

    def token_bytes(self) -> int:
        """A state does not grow with tokens."""
        return 0

    @property
    def dtype(self) -> str:
        """The dtype of its first slot in use (for reports)."""
        return next((d for d in self.dtypes if d), "float32")
