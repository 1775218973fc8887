"""mlx-blockpool: a persistent, block-pooled KV cache for multi-agent MLX inference."""

from blockpool import ops, reference
from blockpool.block import AgentBlocks, KVBlock
from blockpool.cache_conversion import (
    extend_blocks,
    from_mlx_caches,
    plan_extension,
    to_mlx_caches,
    truncate,
)
from blockpool.engine import BlockPoolBatchEngine, CompletedGeneration, GenerationEvent
from blockpool.errors import (
    BlockOperationError,
    BlockPoolError,
    CacheCorruptionError,
    EngineBusyError,
    GenerationError,
    IncompatibleCacheError,
    InvalidRequestError,
    PersistenceError,
    PoolExhaustedError,
    UnsupportedModelError,
)
from blockpool.generate import (
    AgentGenerationResponse,
    batch_generate,
    generate,
    stream_generate,
)
from blockpool.ops import gather_blocks, scatter_blocks
from blockpool.pool import AgentUsage, BlockPool, BlockWrite, PoolStats
from blockpool.spec import BLOCK_TOKENS, Geometry, LayerSpec, ModelCacheSpec, StateGeometry
from blockpool.store import AgentMemory, MemoryStats

__version__ = "0.1.0"

__all__ = [
    "BLOCK_TOKENS",
    "AgentBlocks",
    "AgentGenerationResponse",
    "AgentMemory",
    "AgentUsage",
    "BlockOperationError",
    "BlockPool",
    "BlockPoolBatchEngine",
    "BlockPoolError",
    "BlockWrite",
    "CacheCorruptionError",
    "CompletedGeneration",
    "EngineBusyError",
    "GenerationError",
    "GenerationEvent",
    "Geometry",
    "IncompatibleCacheError",
    "InvalidRequestError",
    "KVBlock",
    "LayerSpec",
    "MemoryStats",
    "ModelCacheSpec",
    "PersistenceError",
    "PoolExhaustedError",
    "PoolStats",
    "StateGeometry",
    "UnsupportedModelError",
    "batch_generate",
    "extend_blocks",
    "from_mlx_caches",
    "gather_blocks",
    "generate",
    "ops",
    "plan_extension",
    "reference",
    "scatter_blocks",
    "stream_generate",
    "to_mlx_caches",
    "truncate",
]
