"""The agent store: :class:`AgentMemory` and its parts (see :mod:`.memory`)."""

from blockpool.store.memory import GENERATION_ARGS, AgentInfo, AgentMemory, MemoryStats

__all__ = ["GENERATION_ARGS", "AgentInfo", "AgentMemory", "MemoryStats"]
