"""Where each agent's cache is: the store's tier state, in one place.

An agent the store knows is in one of these places:

- **hot**: idle, in its blocks in the pool (least recently used first);
- **queued**: a request of it waits for admission; the store keeps its
  cache (a handle, or a file in memory or on disk) until the engine
  fetches it (:class:`Queued`);
- **busy**: a request of it is in the engine, from submit to completion;
- **unwritten**: out of the pool, its file being written (or its write
  failed): the copy stays in memory, charged to the pool, until it is on disk;
- **on disk**: its file is current (``durable`` remembers which handle
  generation was written) or holds a longer history than its hot prefix
  (``disk_ahead``).

Every method expects the store's lock to be held.
"""

from __future__ import annotations

from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from blockpool.block import AgentBlocks
from blockpool.persistence import AgentFile


@dataclass(eq=False)
class Queued:
    """A queued request's cache, kept by the store until the engine fetches it."""

    agent_id: str
    uid: int | None = None
    handle: AgentBlocks | None = None  # in the pool
    file: AgentFile | None = None  # in memory
    charge: object | None = None  # the pool charge that accounts ``file``
    on_disk: bool = False  # the agent's file holds this history too
    loading: Future | None = None  # a read from disk in flight


class Tiers:
    """The tier maps of one store, and the moves between them that are pure bookkeeping."""

    def __init__(self, pool: Any):
        self.pool = pool
        self.hot: OrderedDict[str, AgentBlocks] = OrderedDict()
        self.queued: dict[str, Queued] = {}
        self.busy: dict[int, str] = {}  # uid -> agent, from submit to completion
        self.sources: dict[int, str] = {}  # uid -> "pool", "disk", "shared" or "cold"
        self.fetched: dict[int, Queued] = {}  # uid -> what the engine took, until the request ends
        self.unwritten: dict[str, tuple[AgentFile, object]] = {}  # left the pool; file being written (or failed)
        self.durable: dict[str, int | None] = {}  # agent -> generation of the handle last written
        self.disk_ahead: set[str] = set()  # agents whose file holds a longer history than their hot prefix

    def is_busy(self, agent_id: str) -> bool:
        return agent_id in self.busy.values()

    def in_memory(self, agent_id: str) -> bool:
        """Whether the agent's best copy is in memory (hot and not behind its file, or unwritten)."""
        return (agent_id in self.hot and agent_id not in self.disk_ahead) or agent_id in self.unwritten

    def in_pool(self, agent_id: str) -> bool:
        """Whether the agent counts as in the pool: hot, busy, or its copy awaiting its write."""
        return agent_id in self.hot or self.is_busy(agent_id) or agent_id in self.unwritten

    def is_durable(self, agent_id: str, blocks: AgentBlocks) -> bool:
        """Whether the agent's file holds ``blocks`` (or a longer history)."""
        return self.durable.get(agent_id) == blocks.generation or agent_id in self.disk_ahead

    def idle(self) -> list[str]:
        """Hot agents with no request in flight, least recently used first."""
        busy = set(self.busy.values())
        return [a for a in self.hot if a not in busy]

    def keep_hot(self, agent_id: str, blocks: AgentBlocks) -> None:
        self.hot[agent_id] = blocks
        self.hot.move_to_end(agent_id)

    def drop_hot(self, agent_id: str) -> None:
        """Free an idle agent's blocks (its cache is gone from the pool)."""
        blocks = self.hot.pop(agent_id, None)
        if blocks is not None:
            self.pool.release(blocks)

    def drop_unwritten(self, agent_id: str) -> None:
        """Forget an agent's in-memory copy and give its memory back."""
        unwritten = self.unwritten.pop(agent_id, None)
        if unwritten is not None:
            self.pool.charge(unwritten[1], 0)

    def restore(self, queued: Queued) -> None:
        """Give back a queued cache the engine did not keep."""
        if queued.handle is not None:
            self.hot[queued.agent_id] = queued.handle
        elif queued.file is not None and not queued.on_disk:
            self.unwritten[queued.agent_id] = (queued.file, queued.charge)
        elif queued.charge is not None:
            self.pool.charge(queued.charge, 0)

    def release_all(self) -> None:
        """Give every byte the tiers hold back to the pool (closing)."""
        for blocks in self.hot.values():
            self.pool.release(blocks)
        self.hot.clear()
        for _, charge in self.unwritten.values():
            self.pool.charge(charge, 0)
        self.unwritten.clear()
