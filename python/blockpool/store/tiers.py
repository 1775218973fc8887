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


@dataclass(frozen=True)
class AgentInfo:
    """One agent the store knows.

    Attributes:
        agent_id: The agent.
        where: ``"running"`` (a request in flight), ``"pool"`` (idle, in
            blocks or in memory awaiting its write) or ``"disk"``.
        tokens: Tokens of its history (for a running agent: so far).
        bytes: Bytes its history takes where it is (pool blocks, or the file).
        durable: Whether its latest history is on disk.
    """

    agent_id: str
    where: str
    tokens: int
    bytes: int
    durable: bool


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
    read_bytes: int = 0  # what reading it back brings into memory (charged before a prefetch starts)


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

    def infos(self, request_tokens: Any) -> list[AgentInfo]:
        """The agents in memory (running, hot, unwritten); ``request_tokens(uid)`` says how far a running one is."""
        usage = self.pool.stats().agents
        seen: dict[str, AgentInfo] = {}
        for uid, agent_id in self.busy.items():
            nbytes = usage[agent_id].bytes if agent_id in usage else 0
            seen[agent_id] = AgentInfo(agent_id, "running", request_tokens(uid), nbytes, False)
        for agent_id, blocks in self.hot.items():
            nbytes = usage[agent_id].bytes if agent_id in usage else 0
            seen[agent_id] = AgentInfo(agent_id, "pool", blocks.total_tokens, nbytes, self.is_durable(agent_id, blocks))
        for agent_id, (file, _) in self.unwritten.items():
            seen[agent_id] = AgentInfo(agent_id, "pool", len(file.token_ids), file.nbytes, False)
        return list(seen.values())

    def checkpoint_bytes(self) -> int:
        """Bytes of the recurrent snapshots hot agents hold besides each one's last (shared ones counted once)."""
        seen: dict[Any, int] = {}
        for blocks in self.hot.values():
            for layer_id in blocks.spec.state_layers:
                for block in blocks.blocks[layer_id][:-1]:
                    seen[block] = self.pool.bytes_per_block(layer_id)
        return sum(seen.values())

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

    def forget(self, agent_id: str) -> None:
        """Drop every trace of an idle agent in memory (its file is the caller's to remove)."""
        self.drop_hot(agent_id)
        self.drop_unwritten(agent_id)
        self.durable.pop(agent_id, None)
        self.disk_ahead.discard(agent_id)

    def complete(self, completion: Any) -> tuple[str | None, bool]:
        """Record a request's end: its agent is no longer busy, and what it held goes back or becomes hot.

        Returns:
            Where the cache came from (``"cold"`` if what it resumed from
            could not serve the prefix after all), and whether the agent's
            blocks are now hot.
        """
        agent_id, uid = completion.agent_id, completion.uid
        self.busy.pop(uid, None)
        source = self.sources.pop(uid, None)
        queued = self.queued.get(agent_id)
        if queued is not None and queued.uid == uid:  # ended before admission: nothing was fetched
            self.queued.pop(agent_id)
            self.restore(queued)
        fetched = self.fetched.pop(uid, None)
        blocks = completion.blocks
        kept = blocks is not None and blocks.total_tokens > 0
        if kept:
            if fetched is not None and fetched.charge is not None:
                self.pool.charge(fetched.charge, 0)  # the file's copy lives in the blocks now
            self.keep_hot(agent_id, blocks)
        elif fetched is not None:
            self.restore(fetched)  # the request ended before its history reached the blocks
        return ("cold" if completion.cached_tokens == 0 else source), kept

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
