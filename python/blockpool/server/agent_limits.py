"""``--max-agents`` and ``--max-disk-mb``: the least recently used idle agents go first.

Every named agent lives until deleted, so a server open to many clients
would keep every one of them, in the pool and on disk, for ever. With a
limit set, after each request ends the planner asks which agents to delete:
idle ones (never one with a request running or waiting), least recently
used first (agents found on disk at startup and not used since count as
older than any used), until both limits hold again. Each deletion is logged.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

log = logging.getLogger("blockpool.server")


class AgentLimits:
    """Which agents to delete to stay within a count and a disk size.

    Args:
        max_agents: Most agents kept (None: no limit).
        max_disk_bytes: Most bytes of agent files (None: no limit).
    """

    def __init__(self, max_agents: int | None = None, max_disk_bytes: int | None = None):
        self.max_agents, self.max_disk_bytes = max_agents, max_disk_bytes
        self._recent: OrderedDict[str, None] = OrderedDict()  # least recently used first

    @property
    def active(self) -> bool:
        return self.max_agents is not None or self.max_disk_bytes is not None

    def used(self, agent_id: str) -> None:
        """An agent's request ended: it is now the most recently used."""
        self._recent[agent_id] = None
        self._recent.move_to_end(agent_id)

    def forgotten(self, agent_id: str) -> None:
        self._recent.pop(agent_id, None)

    def over(self, memory: Any, busy: set[str]) -> list[str]:
        """The agents to delete now (least recently used first), none of them in ``busy``."""
        if not self.active:
            return []
        agents = {info.agent_id: info for info in memory.agents()}
        files = memory.file_bytes()
        count, disk = len(agents), sum(files.values())
        unused = sorted(a for a in agents if a not in self._recent)
        victims = []
        for agent_id in [*unused, *(a for a in self._recent if a in agents)]:
            if not self._exceeded(count, disk):
                break
            if agent_id in busy or agents[agent_id].where == "running":
                continue
            victims.append(agent_id)
            count -= 1
            disk -= files.get(agent_id, 0)
            log.info(
                "deleting idle agent %r, the least recently used (%s)",
                agent_id,
                self._describe(count + 1, disk + files.get(agent_id, 0)),
            )
        for agent_id in victims:
            self.forgotten(agent_id)
        return victims

    def _exceeded(self, count: int, disk: int) -> bool:
        return (self.max_agents is not None and count > self.max_agents) or (
            self.max_disk_bytes is not None and disk > self.max_disk_bytes
        )

    def _describe(self, count: int, disk: int) -> str:
        parts = []
        if self.max_agents is not None:
            parts.append(f"{count} agents, --max-agents {self.max_agents}")
        if self.max_disk_bytes is not None:
            parts.append(f"{disk / (1 << 20):.1f} MiB of files, --max-disk-mb {self.max_disk_bytes >> 20}")
        return "; ".join(parts)
