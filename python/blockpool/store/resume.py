"""Where a submitted prompt resumes from: the agent's own cache, another agent's shared prefix, or nothing.

:func:`choose_resume` decides, from what the store has for the agent (hot
blocks, an in-memory copy, a file read from disk) and what the prefix index
holds: the longest common token prefix of the agent's cache and the prompt
(cut back to where every layer can resume exactly: for a recurrent layer,
its last checkpoint at or before the divergence), unless other agents'
blocks hold a longer one (a shared system prompt, even
blocks freed but still cached), at least one token always left to prefill.
A queued agent's own cache reaches the engine as a :class:`QueuedHistory`,
which the engine fetches only at admission.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from blockpool.block import AgentBlocks
from blockpool.cache_conversion import resume_point
from blockpool.store.tiers import Queued


@dataclass(eq=False)
class QueuedHistory:
    """A queued agent's own history, as the engine sees it (a :class:`~blockpool.engine.HistorySource`)."""

    agent_id: str
    spec: Any
    token_ids: list[int]
    queued: Queued
    read_bytes: int  # what reading it back from disk brings into memory
    fetch: Callable[[], Any]
    prefetch: Callable[[], None]
    settled: Callable[[], None]

    def bytes(self) -> int:
        """What admitting it adds to the budget now: nothing while its data is in the pool or charged."""
        q = self.queued
        return 0 if q.handle is not None or q.charge is not None else self.read_bytes

    def in_pool(self) -> bool:
        """Whether :meth:`fetch` will hand over blocks (else a file, to be copied)."""
        return self.queued.handle is not None


@dataclass
class Resume:
    """A submit's choice: ``kind`` (``"pool"``, ``"disk"``, ``"shared"`` or ``"cold"``) and the tokens kept."""

    kind: str
    keep: int
    shared: dict[int, list] | None = None  # for "shared": the blocks per layer


def queue_own(
    pool: Any, spiller: Any, agent_id: str, kept: list[int], hot: Any, file: Any, unwritten: Any
) -> tuple[Queued, QueuedHistory]:
    """Keep the agent's own cache for its queued request: its hot handle, or its file in memory if the
    budget has room for it (else it is read back when the request is next in line). Store's lock held."""
    in_memory = file if hot is None and file is not None and file.has_data else None  # else its data is on disk
    queued = Queued(agent_id, handle=hot, file=in_memory, on_disk=hot is None and unwritten is None)
    if unwritten is not None:
        queued.charge = unwritten[1]
    elif queued.file is not None:
        queued.charge = object()
        if not pool.charge(queued.charge, queued.file.nbytes):
            queued.file, queued.charge = None, None
    read_bytes = pool.spec.bytes_for_tokens(len(kept), pool.kv_bits, pool.kv_group_size)
    queued.read_bytes = read_bytes
    source = QueuedHistory(
        agent_id,
        pool.spec,
        kept,
        queued,
        read_bytes,
        fetch=functools.partial(spiller.fetch, agent_id),
        prefetch=functools.partial(spiller.prefetch, agent_id),
        settled=functools.partial(spiller.settled, agent_id, queued),
    )
    return queued, source


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """The length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    a, b = list(a[:n]), list(b[:n])
    if a == b:  # a returning agent's usual case, compared at C speed
        return n
    step = 256
    start = next(i for i in range(0, n, step) if a[i : i + step] != b[i : i + step])  # slices compare in C
    return next(i for i in range(start, min(start + step, n)) if a[i] != b[i])


def choose_resume(tokens: Sequence[int], hot: AgentBlocks | None, file: Any, index: Any) -> Resume:
    """Pick what a prompt resumes from (pure: nothing is shared or moved here).

    Args:
        tokens: The whole prompt.
        hot: The agent's blocks in the pool, if any.
        file: The agent's copy in memory or read from disk (used when not hot).
        index: The prefix index.
    """
    limit = len(tokens) - 1  # at least one token is prefilled
    own_cache = hot if hot is not None else file
    own = 0
    if own_cache is not None:
        # The longest common prefix, cut back to where every layer can resume from (a recurrent layer:
        # its last checkpoint at or before the divergence); the rest is recomputed.
        own = resume_point(own_cache, min(common_prefix(own_cache.token_ids, tokens), limit))
    length, shared = index.lookup(tokens, limit) if own < limit else (0, {})
    if length > own:
        return Resume("shared", length, shared)
    if own > 0:
        return Resume("pool" if hot is not None else "disk", own)
    return Resume("cold", 0)
