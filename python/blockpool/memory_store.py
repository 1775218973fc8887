"""AgentMemory: a store over the engine for callers that resend the whole conversation.

Each turn the caller submits an agent's full prompt. The store keeps every
agent's cache itself and, per submit:

1. finds the agent's cache: hot in the pool, else on disk (read and
   verified by the submitting thread, never the engine's), else none;
2. resumes from the longest common token prefix of that cache and the
   prompt or, if other agents' blocks hold a longer prefix (a shared system
   prompt, even blocks freed but still cached), shares those blocks instead;
3. submits only the rest of the prompt to the engine, which queues it until
   there is room.

Everything is validated before anything changes: a refused submit leaves
the agent's cache as it was.

The pool is the memory budget. The store keeps a queued request's cache
until the engine admits it (the engine fetches it then), so that while
requests wait, their caches can move too. When the pool is short it asks
the store for room, which gives it in this order: the in-memory copies of
queued agents that are also on disk, then idle agents (least recently used
first), then queued agents (newest first). An agent leaving the pool is
copied out of its blocks, its blocks are freed, and its file is written in
the background (outside the lock, off the decode path); a failed write
keeps the agent's copy in memory rather than losing it. A queued agent
whose cache is on disk is read back in the background while it is next in
line. With ``durable=True`` every completed turn is also written behind,
and the agent's next submit waits for that write.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import mlx.core as mx

from blockpool.block import AgentBlocks
from blockpool.cache_conversion import can_resume
from blockpool.engine import BlockPoolBatchEngine, CompletedGeneration, DeferredCache, GenerationEvent
from blockpool.errors import CacheCorruptionError, InvalidRequestError
from blockpool.persistence import (
    AgentFile,
    agent_file_name,
    export_agent,
    load_agent_file,
    model_fingerprint,
    quarantine,
    read_header,
    remove_stale_temp_files,
    save_agent_file,
)
from blockpool.prefix_index import PrefixIndex
from blockpool.prompt import Prompt, to_token_ids

log = logging.getLogger("blockpool.memory")

#: Generation arguments the store passes to the engine.
GENERATION_ARGS = ("max_tokens", "sampler", "logits_processors", "stop", "prompt_progress_callback")


@dataclass(frozen=True)
class MemoryStats:
    """Where agents live and what sharing saves."""

    hot_agents: int
    disk_agents: int
    used_blocks: int
    shared_blocks: int
    bytes_in_use: int
    bytes_saved_by_sharing: int  # what the agents' blocks would take unshared, minus what they take


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
class _Queued:
    """A queued request's cache, kept by the store until the engine fetches it."""

    agent_id: str
    uid: int | None = None
    handle: AgentBlocks | None = None  # in the pool
    file: AgentFile | None = None  # in memory
    charge: object | None = None  # the pool charge that accounts ``file``
    on_disk: bool = False  # the agent's file holds this history too
    loading: Future | None = None  # a read from disk in flight


class AgentMemory:
    """Keeps every agent's cache, reusing prefixes, sharing common ones, spilling to disk.

    Args:
        engine: The engine to generate with; its pool is the memory budget.
        cache_dir: Where idle agents are spilled and persisted. Without one,
            an evicted agent's cache is dropped (it will be prefilled again).
        durable: Write every agent's file after each of its completions
            (in the background); its next submit waits for that write.
        deterministic: Do all disk work synchronously, so that what runs
            when depends only on the sequence of calls (for several ranks
            that must stay in lockstep).
    """

    def __init__(
        self,
        engine: BlockPoolBatchEngine,
        cache_dir: str | Path | None = None,
        *,
        durable: bool = False,
        deterministic: bool = False,
    ):
        if not isinstance(engine, BlockPoolBatchEngine):
            raise InvalidRequestError(f"engine must be a BlockPoolBatchEngine, got {type(engine).__name__}")
        if durable and cache_dir is None:
            raise InvalidRequestError("durable=True needs a cache_dir")
        self.engine, self.pool = engine, engine.pool
        self.spec = engine.pool.spec
        self.durable, self.deterministic = durable, deterministic
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            for name in remove_stale_temp_files(self.cache_dir):
                log.info("removed an interrupted save: %s", name)
        self._lock = threading.RLock()
        self._hot: OrderedDict[str, AgentBlocks] = OrderedDict()  # idle, least recently used first
        self._queued: dict[str, _Queued] = {}  # waiting for admission
        self._busy: dict[int, str] = {}  # uid -> agent, from submit to completion
        self._sources: dict[int, str] = {}  # uid -> "pool", "disk", "shared" or "cold"
        self._fetched: dict[int, _Queued] = {}  # uid -> what the engine took, until the request ends
        self._unwritten: dict[str, tuple[AgentFile, object]] = {}  # left the pool; file being written (or failed)
        self._writes: dict[str, Future] = {}  # agent -> its latest durable write
        self._spill_writes: dict[str, Future] = {}  # agent -> its latest spill write
        self._durable: dict[str, int | None] = {}  # agent -> generation of the handle last written
        self._disk_ahead: set[str] = set()  # agents whose file holds a longer history than their hot prefix
        self._index = PrefixIndex(self.pool)
        self._io: ThreadPoolExecutor | None = None
        self.write_errors: list[BaseException] = []  # background write failures, oldest first
        self.pool.add_reclaimer(self._reclaim)
        self._closed = False

    @functools.cached_property
    def fingerprint(self) -> str:
        """The model fingerprint stored in and checked against agent files (computed on first use)."""
        return model_fingerprint(self.engine.model, self.spec)

    # ------------------------------------------------------------ requests

    def submit(
        self,
        agent_id: str,
        prompt: Prompt,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        **generation_args: Any,
    ) -> int:
        """Submit an agent's full prompt; only what its cache lacks is prefilled.

        Args:
            agent_id: The agent.
            prompt: The whole conversation so far: text, token ids, or chat
                messages (``[{"role": ..., "content": ...}]``, content as a
                string or a list of text parts) rendered with the tokenizer's
                chat template.
            tools: Tool definitions for the chat template (chat prompts only).
            chat_template_kwargs: Other chat template arguments (chat prompts only).
            generation_args: ``max_tokens``, ``sampler``, ``logits_processors``,
                ``stop`` and ``prompt_progress_callback``, as for the engine.

        Returns:
            The request's uid.

        Raises:
            InvalidRequestError, PoolExhaustedError, CacheCorruptionError,
            IncompatibleCacheError: nothing was changed (a corrupt file is
            moved aside, and the agent starts cold next time).
        """
        unknown = sorted(set(generation_args) - set(GENERATION_ARGS))
        if unknown:
            raise InvalidRequestError(f"unknown generation arguments {unknown}; expected some of {list(GENERATION_ARGS)}")
        self.engine.check_request(agent_id, generation_args.get("max_tokens", 256), generation_args.get("stop"))
        tokens = to_token_ids(
            self.engine.tokenizer, prompt, vocab_size=self.engine.vocab_size, tools=tools, chat_template_kwargs=chat_template_kwargs
        )
        self._wait_for_write(agent_id)
        with self._lock:
            in_memory = (agent_id in self._hot and agent_id not in self._disk_ahead) or agent_id in self._unwritten
        loaded = None if in_memory else self._load(agent_id)  # read outside the lock: the engine never waits on it
        with self._lock:
            if self._closed:
                raise InvalidRequestError("the store is closed")
            if agent_id in self._busy.values():
                raise InvalidRequestError(f"agent {agent_id!r} already has a generation in flight")
            hot = self._hot.get(agent_id)
            unwritten = self._unwritten.get(agent_id)
            limit = len(tokens) - 1  # at least one token is prefilled
            if hot is not None and loaded is not None:  # the file holds more than the hot prefix: take the better
                if _common_prefix(loaded.token_ids, tokens) <= _common_prefix(hot.token_ids, tokens):
                    loaded = None
                else:
                    superseded, hot = hot, None
                    self._hot.pop(agent_id)
                    self.pool.release(superseded)
                    self._disk_ahead.discard(agent_id)
            file = unwritten[0] if unwritten is not None else (loaded if hot is None else None)
            own_tokens = hot.token_ids if hot is not None else (file.token_ids if file is not None else [])
            own = min(_common_prefix(own_tokens, tokens), limit)
            length, shared = self._index.lookup(tokens, limit)
            queued = None
            if length > own:
                kind, keep = "shared", length
                source: Any = AgentBlocks(agent_id, self.spec, shared, length, list(tokens[:length]),
                                          valid_from=self._index.valid_from(shared, length))
                self.pool.share(source.all_blocks(), agent_id)
            elif own > 0 and can_resume(hot if hot is not None else file, own):
                kind, keep = ("pool" if hot is not None else "disk"), own
                queued = _Queued(agent_id, handle=hot, file=file if hot is None else None,
                                 on_disk=hot is None and unwritten is None)
                if unwritten is not None:
                    queued.charge = unwritten[1]
                elif queued.file is not None:  # read and verified: keep it in memory only if the budget has room
                    queued.charge = object()
                    if not self.pool.charge(queued.charge, queued.file.nbytes):
                        queued.file, queued.charge = None, None  # read back when the request is next in line
                # What admitting it adds to the budget: nothing for blocks already in the pool or a
                # file already charged; a file still on disk is read into memory then.
                in_memory = hot is not None or queued.charge is not None
                to_read = 0 if in_memory else self.spec.bytes_for_tokens(keep, self.pool.kv_bits, self.pool.kv_group_size)
                source = DeferredCache(
                    agent_id, self.spec, list(tokens[:keep]),
                    fetch=functools.partial(self._fetch, agent_id),
                    prefetch=functools.partial(self._prefetch, agent_id),
                    pool_bytes=to_read,
                )
                self._queued[agent_id] = queued
            else:
                kind, keep, source = "cold", 0, None
            try:
                uid = self.engine.submit(agent_id, tokens[keep:], cache=source, **generation_args)
            except BaseException:
                if kind == "shared":
                    self.pool.release(source)
                if queued is not None:
                    self._queued.pop(agent_id, None)
                    if queued.charge is not None and unwritten is None:
                        self.pool.charge(queued.charge, 0)
                raise
            # Committed.
            if queued is not None:
                queued.uid = uid
                if hot is not None:
                    self._hot.pop(agent_id)
                if unwritten is not None:
                    self._unwritten.pop(agent_id)
            elif hot is not None:  # superseded by a longer shared prefix, or nothing in common
                self._hot.pop(agent_id)
                self.pool.release(hot)
            self._busy[uid] = agent_id
            self._sources[uid] = kind
            return uid

    def cancel(self, uid: int, *, free_blocks: bool = False) -> bool:
        """Cancel a request (see :meth:`BlockPoolBatchEngine.cancel`)."""
        return self.engine.cancel(uid, free_blocks=free_blocks)

    def step(self) -> Iterator[CompletedGeneration]:
        """Run until every request has finished, yielding each completion.

        ``completion.blocks`` stay owned by the store; do not free them.
        ``completion.cache_source`` says where the agent's cache came from.
        """
        for event in self.stream():
            if event.completion is not None:
                yield event.completion

    def stream(self) -> Iterator[GenerationEvent]:
        """Like :meth:`step`, also yielding each token."""
        for event in self.engine.stream():
            if event.completion is not None:
                event.completion = self._on_completion(event.completion)
            yield event

    def tick(self) -> list[GenerationEvent]:
        """One engine iteration (see :meth:`BlockPoolBatchEngine.tick`), completions recorded."""
        events = self.engine.tick()
        for event in events:
            if event.completion is not None:
                event.completion = self._on_completion(event.completion)
        return events

    # ------------------------------------------------------------ tiers

    def where(self, agent_id: str) -> str:
        """``"pool"``, ``"disk"`` or ``"none"``: where an agent's cache is now."""
        with self._lock:
            if agent_id in self._hot or agent_id in self._busy.values() or agent_id in self._unwritten:
                return "pool"
            path = self._path(agent_id)
            return "disk" if path is not None and path.is_file() else "none"

    def agents(self) -> list[AgentInfo]:
        """Every agent the store knows, with where it lives, its tokens and its bytes."""
        with self._lock:
            seen: dict[str, AgentInfo] = {}
            usage = self.pool.stats().agents
            for uid, agent_id in self._busy.items():
                tokens = self.engine.request_tokens(uid)
                seen[agent_id] = AgentInfo(agent_id, "running", tokens, usage[agent_id].bytes if agent_id in usage else 0, False)
            for agent_id, blocks in self._hot.items():
                durable = self._durable.get(agent_id) == blocks.generation or agent_id in self._disk_ahead
                nbytes = usage[agent_id].bytes if agent_id in usage else 0
                seen[agent_id] = AgentInfo(agent_id, "pool", blocks.total_tokens, nbytes, durable)
            for agent_id, (file, _) in self._unwritten.items():
                seen[agent_id] = AgentInfo(agent_id, "pool", len(file.token_ids), file.nbytes, False)
            cache_dir = self.cache_dir
        if cache_dir is not None:
            for path in sorted(cache_dir.glob("*.safetensors")):
                try:
                    header, metadata, _ = read_header(path)
                    agent_id = json.loads(metadata["agent_id"])
                    tokens = int(header["token_ids"]["shape"][0])
                except Exception:
                    continue  # not an agent file, or damaged: `blockpool inspect` reports those
                if agent_id not in seen:
                    seen[agent_id] = AgentInfo(agent_id, "disk", tokens, path.stat().st_size, True)
        return sorted(seen.values(), key=lambda a: a.agent_id)

    def spill(self, agent_id: str) -> bool:
        """Move an idle agent from the pool to disk now, waiting for the write.

        Without a ``cache_dir`` its cache is dropped instead.

        Returns:
            False if it is not idle in the pool.

        Raises:
            PersistenceError: The write failed; the agent stays in memory.
        """
        with self._lock:
            if agent_id not in self._hot or agent_id in self._busy.values():
                return False
            future = self._spill(agent_id)
        if future is not None:
            future.result()
        return True

    def forget(self, agent_id: str) -> None:
        """Drop an agent's cache from the pool and from disk.

        Raises:
            InvalidRequestError: The agent has a generation in flight.
        """
        self._wait_for_write(agent_id)
        with self._lock:
            if agent_id in self._busy.values():
                raise InvalidRequestError(f"agent {agent_id!r} has a generation in flight")
            blocks = self._hot.pop(agent_id, None)
            if blocks is not None:
                self.pool.release(blocks)
            unwritten = self._unwritten.pop(agent_id, None)
            if unwritten is not None:
                self.pool.charge(unwritten[1], 0)
            self._durable.pop(agent_id, None)
            self._disk_ahead.discard(agent_id)
            path = self._path(agent_id)
            if path is not None and path.is_file():
                path.unlink()

    def flush(self) -> int:
        """Write every idle hot agent whose file is not current, now. Returns how many were written.

        Raises:
            PersistenceError: A write failed (the agent stays hot).
        """
        if self.cache_dir is None:
            return 0
        self.wait_durable()
        with self._lock:
            agents = [(a, b) for a, b in self._hot.items() if self._durable.get(a) != b.generation and a not in self._disk_ahead]
            unwritten = list(self._unwritten.items())
        for agent_id, blocks in agents:
            save_agent_file(self._path(agent_id), export_agent(self.pool, blocks, self.fingerprint))
            with self._lock:
                if self._hot.get(agent_id) is blocks:
                    self._durable[agent_id] = blocks.generation
        for agent_id, (file, charge) in unwritten:  # retry the writes that failed
            save_agent_file(self._path(agent_id), file)
            with self._lock:
                if self._unwritten.get(agent_id, (None,))[0] is file:
                    self._unwritten.pop(agent_id)
                    self.pool.charge(charge, 0)
        return len(agents) + len(unwritten)

    def wait_durable(self, agent_id: str | None = None, timeout: float | None = None) -> bool:
        """Wait for background writes (of one agent, or all) to end.

        Returns:
            Whether they all ended within ``timeout`` (``timeout=0`` only checks).
        """
        with self._lock:
            if agent_id is None:
                futures = [f for writes in (self._writes, self._spill_writes) for f in writes.values()]
            else:
                futures = [f for f in (self._writes.get(agent_id), self._spill_writes.get(agent_id)) if f is not None]
        for future in futures:
            try:
                future.result(timeout=timeout)
            except TimeoutError:
                return False
            except Exception:
                pass  # recorded in write_errors
        return True

    def close(self) -> None:
        """Cancel what is in flight, persist every agent, and give every byte back to the pool.

        Raises:
            PersistenceError: Some agent could not be written; the others were.
        """
        with self._lock:
            uids = list(self._busy)
        for uid in uids:
            self.engine.cancel(uid)
        for _ in self.step():
            pass
        error = None
        try:
            self.flush()
        except Exception as e:  # still give the memory back
            error = e
        self.wait_durable()
        with self._lock:
            for blocks in self._hot.values():
                self.pool.release(blocks)
            self._hot.clear()
            for _, charge in self._unwritten.values():
                self.pool.charge(charge, 0)
            self._unwritten.clear()
            self._closed = True
        self.pool.remove_reclaimer(self._reclaim)
        self.pool.drop_cached()  # the prefix index dies with the store
        if self._io is not None:
            self._io.shutdown(wait=True)
        if error is not None:
            raise error

    def stats(self) -> MemoryStats:
        """Agents per tier, and the bytes shared blocks save."""
        with self._lock:
            pool = self.pool.stats()
            per_agent = sum(a.bytes for a in pool.agents.values())
            disk = 0
            if self.cache_dir is not None:
                disk = sum(1 for _ in self.cache_dir.glob("*.safetensors"))
            return MemoryStats(len(self._hot), disk, pool.used_blocks, pool.shared_blocks, pool.used_bytes,
                               max(0, per_agent - pool.block_bytes))

    def tokenize(self, prompt: Prompt, **template_args: Any) -> list[int]:
        """Token ids for a full prompt: text, token ids, or chat messages (see :mod:`blockpool.prompt`)."""
        return to_token_ids(self.engine.tokenizer, prompt, vocab_size=self.engine.vocab_size, **template_args)

    # ------------------------------------------------------------ the engine fetches queued caches

    def _fetch(self, agent_id: str) -> AgentBlocks | AgentFile | None:
        """At admission (engine thread): hand over a queued request's cache."""
        with self._lock:
            queued = self._queued.pop(agent_id, None)
        if queued is None:
            return None
        if queued.handle is None and queued.file is None and queued.loading is None and queued.on_disk:
            self._prefetch_now(queued)
        if queued.loading is not None:
            try:
                queued.loading.result()
            except Exception as error:  # unreadable now: prefill the history instead
                log.warning("could not read agent %r back: %s", agent_id, error)
        with self._lock:
            self._fetched[queued.uid] = queued
            file = queued.file
            if file is not None and queued.on_disk:  # the engine copies it into its caches now; the disk keeps it
                queued.file = None
                if queued.charge is not None:
                    self.pool.charge(queued.charge, 0)
                    queued.charge = None
        return queued.handle if queued.handle is not None else file

    def _prefetch(self, agent_id: str) -> None:
        """The request is next in line: start reading its cache back from disk if it left memory."""
        with self._lock:
            queued = self._queued.get(agent_id)
            if queued is None or queued.handle is not None or queued.file is not None or queued.loading is not None:
                return
            if not queued.on_disk:
                return
        if self.deterministic:
            self._prefetch_now(queued)
        else:
            queued.loading = self._executor().submit(self._read_back, queued)

    def _prefetch_now(self, queued: _Queued) -> None:
        future: Future = Future()
        try:
            self._read_back(queued)
            future.set_result(None)
        except Exception as error:
            future.set_exception(error)
        queued.loading = future

    def _read_back(self, queued: _Queued) -> None:
        try:
            file = self._load(queued.agent_id)
        except CacheCorruptionError:
            file = None  # moved aside by _load
        if file is None:
            return
        mx.eval([a for layer in file.planes for a in layer.values()])
        charge = object()
        self.pool.charge(charge, file.nbytes, force=True)
        with self._lock:
            queued.file, queued.charge = file, charge

    # ------------------------------------------------------------ room for the pool

    def _reclaim(self, missing: int) -> int:
        """The pool is ``missing`` bytes short (engine thread): give it room.

        Returns the bytes freed at once; spills being written free theirs
        when the write ends (the pool knows them as ``releasing_bytes``).
        """
        freed = announced = 0
        with self._lock:
            order = self.engine.waiting_uids()
            head = order[0] if order else None
            queued = sorted((q for q in self._queued.values() if q.uid != head),
                            key=lambda q: -order.index(q.uid) if q.uid in order else 0)
            # 1. In-memory copies of queued agents that are on disk too: dropped, read back later.
            for q in queued:
                if freed >= missing:
                    return freed
                if q.file is not None and q.on_disk and q.charge is not None:
                    freed += q.file.nbytes
                    q.file = None
                    self.pool.charge(q.charge, 0)
                    q.charge = None
            # 2. Idle agents, least recently used first; 3. queued agents, newest first.
            busy = set(self._busy.values())
            idle = [(a, None) for a in self._hot if a not in busy] + [(q.agent_id, q) for q in queued if q.handle is not None]
            for agent_id, q in idle:
                if freed + announced >= missing:
                    break
                nbytes = self.pool.stats().agents[agent_id].bytes if agent_id in self.pool.stats().agents else 0
                if q is None:
                    future = self._spill(agent_id)
                else:
                    future = self._spill_queued(q)
                if future is None or future.done():
                    freed += nbytes
                else:
                    announced += nbytes
        return freed

    def _spill(self, agent_id: str) -> Future | None:
        """Take an idle agent out of the pool (lock held). Returns the write's future, if any."""
        blocks = self._hot.pop(agent_id)
        if self.cache_dir is None or self._durable.get(agent_id) == blocks.generation or agent_id in self._disk_ahead:
            self.pool.release(blocks)  # nowhere to keep it, or its file is current (or longer)
            return None
        file = _exported(self.pool, blocks, self.fingerprint)
        charge = object()
        self.pool.charge(charge, file.nbytes, force=True)  # the copy is memory until it is written
        self.pool.release(blocks)
        self._unwritten[agent_id] = (file, charge)
        return self._write_behind(agent_id, file, charge, blocks.generation, spill=True)

    def _spill_queued(self, queued: _Queued) -> Future | None:
        """Take a queued agent's cache out of the pool (lock held); the engine reads it back when it is admitted."""
        blocks, queued.handle = queued.handle, None
        if self.cache_dir is None:
            self.pool.release(blocks)  # dropped: its history is prefilled again
            return None
        if self._durable.get(queued.agent_id) == blocks.generation:
            self.pool.release(blocks)
            queued.on_disk = True
            return None
        file = _exported(self.pool, blocks, self.fingerprint)
        charge = object()
        self.pool.charge(charge, file.nbytes, force=True)
        self.pool.release(blocks)
        queued.file, queued.charge = file, charge  # kept until written; then it can be dropped too

        def written(future: Future) -> None:
            if future.exception() is None:
                with self._lock:
                    queued.on_disk = True

        future = self._write_behind(queued.agent_id, file, None, blocks.generation, spill=True)
        future.add_done_callback(written)
        return future

    def _write_behind(self, agent_id: str, file: AgentFile, charge: object | None, generation: int | None, spill: bool) -> Future:
        """Write ``file`` off the decode path; release its memory (``charge``) when done."""
        path = self._path(agent_id)
        if spill:
            self.pool.begin_release(file.nbytes)

        def write() -> None:
            try:
                save_agent_file(path, file)
            except BaseException as error:
                log.warning("could not write agent %r: %s", agent_id, error)
                with self._lock:
                    self.write_errors.append(error)
                raise
            finally:
                if spill:
                    self.pool.end_release(file.nbytes)
            with self._lock:
                self._durable[agent_id] = generation
                self._disk_ahead.discard(agent_id)
                if spill and self._unwritten.get(agent_id, (None,))[0] is file:
                    self._unwritten.pop(agent_id)
                if charge is not None and (not spill or agent_id not in self._unwritten):
                    self.pool.charge(charge, 0)

        if self.deterministic:
            future: Future = Future()
            try:
                write()
                future.set_result(None)
            except BaseException as error:  # a failed spill keeps the agent in memory (_unwritten)
                future.set_exception(error)
        else:
            future = self._executor().submit(write)
        (self._spill_writes if spill else self._writes)[agent_id] = future
        return future

    def _executor(self) -> ThreadPoolExecutor:
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockpool-io")
        return self._io

    def _wait_for_write(self, agent_id: str) -> None:
        """Wait for the agent's durable write, if one is in flight (a spill needs no wait: its copy is in memory)."""
        with self._lock:
            future = self._writes.get(agent_id)
        if future is not None:
            try:
                future.result()
            except Exception:
                pass  # recorded; the agent's copy stays in memory

    # ------------------------------------------------------------ completions

    def _on_completion(self, completion: CompletedGeneration) -> CompletedGeneration:
        agent_id = completion.agent_id
        with self._lock:
            self._busy.pop(completion.uid, None)
            source = self._sources.pop(completion.uid, None)
            queued = self._queued.get(agent_id)
            if queued is not None and queued.uid == completion.uid:  # ended before admission: nothing was fetched
                self._queued.pop(agent_id)
                self._restore(queued)
            fetched = self._fetched.pop(completion.uid, None)
            blocks = completion.blocks
            if blocks is not None and blocks.total_tokens:
                if fetched is not None and fetched.charge is not None:
                    self.pool.charge(fetched.charge, 0)  # the file's copy lives in the blocks now
                self._hot[agent_id] = blocks
                self._hot.move_to_end(agent_id)
                self._index.register(blocks)
                if completion.finish_reason in ("cancelled", "error"):
                    # The agent's cache is its history cut back to the failed prompt's common prefix; its file,
                    # if it has one, holds the longer finished turn: keep that one.
                    path = self._path(agent_id)
                    if path is not None and path.is_file():
                        self._disk_ahead.add(agent_id)
                elif self.durable:
                    file = _exported(self.pool, blocks, self.fingerprint)
                    charge = object()
                    self.pool.charge(charge, file.nbytes, force=True)
                    self._write_behind(agent_id, file, charge, blocks.generation, spill=False)
            elif fetched is not None:
                self._restore(fetched)  # the request ended before its history reached the blocks
            if completion.cached_tokens == 0:
                source = "cold"  # what it resumed from could not serve the prefix after all
            return replace(completion, cache_source=source)

    def _restore(self, queued: _Queued) -> None:
        """Give back a queued cache the engine did not keep (lock held)."""
        if queued.handle is not None:
            self._hot[queued.agent_id] = queued.handle
        elif queued.file is not None and not queued.on_disk:
            self._unwritten[queued.agent_id] = (queued.file, queued.charge)
        elif queued.charge is not None:
            self.pool.charge(queued.charge, 0)

    # ------------------------------------------------------------ files

    def _path(self, agent_id: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / agent_file_name(agent_id)

    def _load(self, agent_id: str) -> AgentFile | None:
        """The agent's file, read and verified; a damaged one is moved aside."""
        path = self._path(agent_id)
        if path is None or not (path.exists() or path.is_symlink()):
            return None
        try:
            file = load_agent_file(path, self.fingerprint, self.spec)
        except CacheCorruptionError as e:
            moved = quarantine(path)
            raise CacheCorruptionError(f"{e} (moved aside to {moved.name})") from e
        if file.agent_id != agent_id:
            moved = quarantine(path)
            raise CacheCorruptionError(f"{path} holds agent {file.agent_id!r}, not {agent_id!r} (moved aside to {moved.name})")
        return file


def _exported(pool: Any, blocks: AgentBlocks, fingerprint: str) -> AgentFile:
    """An agent ready to write: backed by its blocks' arrays (no copy), viewed on this thread, so that a
    writer thread only reads memory (MLX streams belong to the thread that made them)."""
    return export_agent(pool, blocks, fingerprint)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
