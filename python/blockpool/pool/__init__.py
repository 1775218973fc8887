"""The block pool (:class:`BlockPool`) and the values it hands out; see :mod:`.block_pool` for its parts."""

from blockpool.pool.block_pool import DEFAULT_MEMORY_BYTES, BlockPool
from blockpool.pool.budget import Reclaimer
from blockpool.pool.types import AgentUsage, BlockWrite, PoolStats

__all__ = ["DEFAULT_MEMORY_BYTES", "AgentUsage", "BlockPool", "BlockWrite", "PoolStats", "Reclaimer"]
