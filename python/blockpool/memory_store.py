"""``AgentMemory`` under its earlier module name: see :mod:`blockpool.store`."""

from blockpool.store import GENERATION_ARGS, AgentInfo, AgentMemory, MemoryStats

__all__ = ["GENERATION_ARGS", "AgentInfo", "AgentMemory", "MemoryStats"]
