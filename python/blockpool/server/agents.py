"""Which agent a request belongs to.

A request names its agent with the ``X-Agent-Id`` header, else the body's
``user`` field (``metadata.user_id`` for ``/v1/messages``). Named agents
live until deleted: in the pool while there is room, on disk after.

A request that names none is anonymous. The server still reuses what it
can, in two ways: the store shares other agents' blocks that hold the same
prefix (a common system prompt), and the most recent anonymous
conversations are kept as agents of their own (``anonymous-...``) so that a
client that resends a conversation with one more turn resumes it, from the
longest common token prefix, as ``mlx_lm.server``'s prompt cache does.
Anonymous agents are written behind like any agent; the oldest is dropped
past a limit, and the runner deletes their files then, at shutdown and at
startup.
"""

from __future__ import annotations

import uuid
from collections import OrderedDict

from blockpool.server.api_errors import bad_request
from blockpool.store.resume import common_prefix

#: Prefix of the ids the server gives anonymous conversations; refused as a client-chosen id.
ANONYMOUS_PREFIX = "anonymous-"
MAX_AGENT_ID_CHARS = 256


def agent_identity(header: str | None, user: str | None, user_field: str = "user") -> str | None:
    """The agent a request names (header first, then ``user``), or None when anonymous.

    ``user_field`` is the body field ``user`` came from, for error messages
    (``metadata.user_id`` on the Messages API).

    Raises:
        ApiError: An empty, over-long or control-character id, or one that
            takes the anonymous prefix.
    """
    value, where = (header, "X-Agent-Id") if header is not None else (user, user_field)
    if value is None:
        return None
    if not value.strip():
        raise bad_request(f"{where} must not be empty", where)
    if len(value) > MAX_AGENT_ID_CHARS:
        raise bad_request(f"{where} is longer than {MAX_AGENT_ID_CHARS} characters", where)
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise bad_request(f"{where} must not contain control characters", where)
    if value.startswith(ANONYMOUS_PREFIX):
        raise bad_request(f"agent ids starting with {ANONYMOUS_PREFIX!r} are reserved for anonymous requests", where)
    return value


def is_anonymous(agent_id: str) -> bool:
    """Whether the server made this id for an anonymous request."""
    return agent_id.startswith(ANONYMOUS_PREFIX)


class AnonymousAgents:
    """The most recent anonymous conversations, each an agent, least recently used first.

    Args:
        limit: How many to keep; 0 keeps none (each anonymous request is a
            fresh agent, dropped when it ends).
    """

    def __init__(self, limit: int):
        self.limit = limit
        self._histories: OrderedDict[str, list[int]] = OrderedDict()
        self._claimed: dict[str, list[int] | None] = {}  # running: the history each had when claimed

    def claim(self, tokens: list[int]) -> str:
        """The agent to run an anonymous prompt as: a kept conversation it continues, or a new id.

        A kept conversation is taken when the prompt shares at least half of
        its tokens (from the start); it leaves the kept set while it runs.
        Taking one that shares less would cut another conversation's cache
        short for little gain; the store's shared-prefix index still serves
        full shared blocks to a new agent.
        """
        best, best_len = None, 0
        for agent_id, history in self._histories.items():
            common = common_prefix(history, tokens)
            if common > best_len and 2 * common >= len(history):
                best, best_len = agent_id, common
        if best is not None:
            self._claimed[best] = self._histories.pop(best)
            return best
        agent_id = ANONYMOUS_PREFIX + uuid.uuid4().hex[:16]
        self._claimed[agent_id] = None
        return agent_id

    def unclaim(self, agent_id: str) -> list[str]:
        """A claimed agent's request was refused before it ran: a kept conversation is kept
        again as it was (its cache is untouched); returns the agents to drop now (a new id)."""
        if agent_id not in self._claimed:
            return []
        history = self._claimed.pop(agent_id)
        return [agent_id] if history is None else self.keep(agent_id, history)

    def keep(self, agent_id: str, history: list[int]) -> list[str]:
        """Remember a finished anonymous conversation; returns the agents to drop now."""
        self._claimed.pop(agent_id, None)
        self._histories[agent_id] = history
        self._histories.move_to_end(agent_id)
        dropped = []
        while len(self._histories) > self.limit:
            oldest, _ = self._histories.popitem(last=False)
            dropped.append(oldest)
        return dropped

    def discard(self, agent_id: str) -> None:
        """Forget a kept conversation (its agent was deleted, or its request failed)."""
        self._histories.pop(agent_id, None)
        self._claimed.pop(agent_id, None)

    def __contains__(self, agent_id: str) -> bool:
        return agent_id in self._histories

    def __len__(self) -> int:
        return len(self._histories)
