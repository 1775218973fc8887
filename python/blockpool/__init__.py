"""mlx-blockpool: a persistent, block-pooled KV cache for multi-agent MLX inference."""

from blockpool import ops, reference
from blockpool.ops import gather_blocks, scatter_blocks

__version__ = "0.1.0"

__all__ = ["gather_blocks", "ops", "reference", "scatter_blocks"]
