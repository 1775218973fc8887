"""A request's history: what it resumes from, checked at submit, brought into the pool at admission.

A request resumes from one of:

- an :class:`~blockpool.block.AgentBlocks` handle (the agent's blocks in
  this pool; consumed by the submit);
- an :class:`~blockpool.persistence.AgentFile` (an agent loaded from disk:
  its arrays go straight into the request's caches, and its blocks are
  written at the end of the request with its new tokens);
- a :class:`HistorySource` (the store's queued agent): fetched only when
  the request is admitted, so that its owner may move it (spill it to
  disk) while the request waits;
- nothing (a cold request).

If a history can serve only a shorter prefix than the request resumes from
(it was dropped while the request waited, a sliding layer lost the window, a
recurrent layer has no snapshot there), the request resumes from the
longest prefix it can serve and prefills the rest: slower, never wrong. On a failure or a
cancel, the caller gets back the history as it was before the request.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from blockpool.block import AgentBlocks
from blockpool.cache_conversion import entry_caches, file_to_mlx_caches, resume_point, truncate
from blockpool.errors import GenerationError, IncompatibleCacheError, InvalidRequestError
from blockpool.persistence import AgentFile, import_agent
from blockpool.spec import ModelCacheSpec


@runtime_checkable
class HistorySource(Protocol):
    """A history the engine fetches only when its request is admitted.

    ``token_ids`` are the history tokens the request resumes from.
    ``fetch()`` is called once, on the engine's thread, at admission, and
    returns what holds them: a handle, an ``AgentFile``, or None if they
    were dropped meanwhile (they are then prefilled again). ``prefetch()``
    is called while the request is next in line, so that a disk read can
    start before it is needed. ``bytes()`` is what admitting it adds to the
    budget now: 0 once its data is in the pool or already charged, else
    the bytes a read will bring in. Optional: ``in_pool()``, whether
    ``fetch()`` will return a handle (else the engine counts the blocks a
    file becomes); ``settled()``, called once what ``fetch()`` returned is
    copied where the request reads it (the source may then drop its copy).
    """

    agent_id: str
    spec: ModelCacheSpec
    token_ids: list[int]

    def fetch(self) -> AgentBlocks | AgentFile | None: ...

    def prefetch(self) -> None: ...

    def bytes(self) -> int: ...


Source = AgentBlocks | AgentFile | HistorySource


def _deferred(source: Any) -> bool:
    """Whether ``source`` is a :class:`HistorySource` (the concrete kinds first: a protocol check is slow)."""
    return source is not None and not isinstance(source, (AgentBlocks, AgentFile)) and isinstance(source, HistorySource)


@dataclass(eq=False)
class History:
    """Where one request's history is, from submit until its caches are built."""

    source: Source | None  # what the request resumes from, as submitted
    tokens: list[int]  # the history's token ids the request resumes from
    base: AgentBlocks | None = None  # the history in the pool, from admission on
    file: AgentFile | None = None  # a history read from disk, until its caches are built
    # recurrent snapshots taken while the request prefills, per state layer: (position, block), until written back
    pending: dict[int, list[tuple[int, Any]]] = field(default_factory=dict)

    @property
    def keep(self) -> int:
        """History tokens resumed rather than prefilled."""
        return len(self.tokens)


def check_source(spec: ModelCacheSpec, pool: Any, agent_id: str, cache: Any, keep_tokens: int | None) -> list[int]:
    """Validate what a request resumes from; returns the history's token ids it keeps.

    Raises:
        InvalidRequestError: A stale, consumed or foreign handle, another
            agent's cache, or a bad ``keep_tokens``.
        IncompatibleCacheError: The cache was made for another model, layout or quantization.
    """
    if cache is None:
        if keep_tokens not in (None, 0):
            raise InvalidRequestError("keep_tokens needs a cache to keep tokens of")
        return []
    if isinstance(cache, AgentBlocks):
        if cache.spec != spec:
            raise IncompatibleCacheError("the cache was made for another model's cache layout")
        if cache.pool_id is not None and cache.pool_id != pool.id:
            raise InvalidRequestError("the cache handle belongs to another pool")
        if cache.consumed or not pool.is_current(cache):
            raise InvalidRequestError(
                "this cache handle is stale (already submitted, or a newer one was issued): pass the newest one"
            )
        if not pool.holds(cache.agent_id, cache.all_blocks()):
            raise InvalidRequestError("the cache's blocks are no longer held by the agent (freed or stale)")
    elif isinstance(cache, AgentFile):
        if cache.spec != spec:
            raise IncompatibleCacheError("the agent file was written for another model's cache layout")
        if (cache.kv_bits, cache.kv_group_size if cache.kv_bits else None) != (
            pool.kv_bits,
            pool.kv_group_size if pool.kv_bits else None,
        ):
            raise IncompatibleCacheError(
                f"the agent file was stored with kv_bits={cache.kv_bits}, the pool uses {pool.kv_bits}"
            )
    elif _deferred(cache):
        if cache.spec != spec:
            raise IncompatibleCacheError("the cache was made for another model's cache layout")
        if keep_tokens not in (None, len(cache.token_ids)):
            raise InvalidRequestError("a deferred history keeps exactly its token_ids")
        keep_tokens = None
    else:
        raise InvalidRequestError(f"cache must be AgentBlocks, got {type(cache).__name__}")
    if cache.agent_id != agent_id:
        raise InvalidRequestError(f"the cache belongs to agent {cache.agent_id!r}, not {agent_id!r}")
    total = len(cache.token_ids)
    keep = total if keep_tokens is None else keep_tokens
    if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= total:
        raise InvalidRequestError(f"keep_tokens must be an integer in [0, {total}], got {keep_tokens!r}")
    return list(cache.token_ids[:keep])


def in_transit_bytes(history: History) -> int:
    """Memory a waiting request's history adds at admission: a file it brings, a deferred history still to read."""
    if history.base is not None:
        return 0
    if isinstance(history.source, AgentFile):
        return history.source.nbytes
    if _deferred(history.source):
        return history.source.bytes()
    return 0


def prefetch(history: History) -> None:
    """Start reading a waiting request's deferred history back (it was found room for)."""
    if history.base is None and _deferred(history.source):
        history.source.prefetch()


def arrives_as_file(history: History) -> bool:
    """Whether a waiting request's history reaches the engine as a file (a copy into blocks or caches)."""
    if history.base is not None or not history.keep:
        return False
    source = history.source
    if isinstance(source, AgentFile):
        return True
    return _deferred(source) and not getattr(source, "in_pool", lambda: False)()


def settle(history: History) -> None:
    """Tell a deferred history's source that its data is where the request reads it now."""
    settled = getattr(history.source, "settled", None) if _deferred(history.source) else None
    if settled is not None:
        settled()


def materialize(request: Any, spec: ModelCacheSpec, pool: Any) -> None:
    """Bring the request's history into the pool at admission: fetch a deferred one, cut a handle to what it keeps.

    A file is kept aside to go straight into the caches (one copy). A
    history that cannot serve the kept prefix is dropped, and its tokens
    join the prompt.
    """
    history = request.history
    source = history.source
    if _deferred(source):
        source = source.fetch()
        if source is not None:
            check_source(spec, pool, request.agent_id, source, history.keep)
            if list(source.token_ids[: history.keep]) != history.tokens:
                raise GenerationError("the deferred history does not hold the tokens it promised")
    if isinstance(source, (AgentFile, AgentBlocks)):
        # Resume from the longest prefix every layer can serve exactly (a recurrent layer: its last
        # checkpoint at or before the kept tokens); the rest joins the prompt.
        resume_from(request, resume_point(source, history.keep))
    if isinstance(source, AgentFile) and history.keep:
        history.file, history.base = source, AgentBlocks.empty(request.agent_id, spec)
        return
    if isinstance(source, AgentBlocks):
        history.base = source if history.keep == source.total_tokens else truncate(pool, source, history.keep)
        return
    resume_from(request, 0)
    history.base = AgentBlocks.empty(request.agent_id, spec)


def resume_from(request: Any, point: int) -> None:
    """Keep only the first ``point`` history tokens: the rest is prefilled with the prompt."""
    history = request.history
    if point < history.keep:
        request.prompt = history.tokens[point:] + request.prompt
        history.tokens = history.tokens[:point]


def rebuild_caches(request: Any, spec: ModelCacheSpec, pool: Any, spare: int, paged: Collection[int] = ()) -> list[Any]:
    """The request's caches, rebuilt from its history (one copy), with room for ``spare`` more tokens.

    Layers in ``paged`` read their blocks in place (:mod:`blockpool.paged`):
    their entries are None, and a history from a file is written to blocks
    first (one copy, as the gather path's rebuild)."""
    history = request.history
    if history.base is None:
        materialize(request, spec, pool)
    if paged and history.file is not None:
        _import_file(request, pool)
    if history.file is not None:
        caches = file_to_mlx_caches(history.file, history.keep, spare_tokens=spare)
        history.file = None
        return caches
    if history.base.total_tokens:
        return entry_caches(pool, history.base, spare_tokens=spare, skip=paged)
    return [None if i in paged else spec.kind(i).new_cache() for i in range(spec.num_layers)]


def _import_file(request: Any, pool: Any) -> None:
    """Write the kept part of a history read from disk into the pool: the request's base from now on."""
    history = request.history
    # This request's own view of the file, given up layer by layer as its blocks are written: the
    # arrays go as they are copied unless the source still holds them (a file being written).
    own = dataclasses.replace(history.file, planes=list(history.file.planes))
    history.file = None
    # Room was made at admission; forced all the same: the source's copy is dropped right after (settle).
    handle = import_agent(pool, own, force=True, consume=True)  # the file's agent is the request's
    cut = truncate(pool, handle, history.keep) if history.keep < handle.total_tokens else handle
    if cut is None:  # no layer can be cut back there (checked before: not expected); prefill it all
        pool.release(handle)
        resume_from(request, 0)
        cut = AgentBlocks.empty(request.agent_id, own.spec)
    history.base = cut


def hand_back(pool: Any, history: History, agent_id: str) -> AgentBlocks | None:
    """The handle a request that ends without output gives back: its history as it was before the request.

    Snapshots it took and never wrote back are freed."""
    pending = [block for pairs in history.pending.values() for _, block in pairs]
    if pending:
        pool.free(pending, agent_id)
        history.pending = {}
    if history.base is not None:
        blocks = reissue(pool, history.base)
        if blocks.total_tokens > history.keep:  # preempted: give back the history before the request
            blocks = truncate(pool, blocks, history.keep) or blocks
        return blocks
    if isinstance(history.source, AgentBlocks):  # never admitted: the handle comes back whole
        return reissue(pool, history.source)
    return None


def reissue(pool: Any, handle: AgentBlocks) -> AgentBlocks:
    """A fresh handle to the same blocks (the submitted one was consumed)."""
    fresh = copy.copy(handle)
    fresh.consumed = False
    fresh.pool_id = pool.id
    fresh.generation = pool.new_handle_generation(handle.agent_id)
    return fresh
