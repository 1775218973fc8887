"""Moving caches between the pool and disk: reclaim order, write-behind, prefetch.

When the pool is short it asks the store for room (:meth:`Spiller.reclaim`),
which gives it in this order: the in-memory copies of queued agents that are
also on disk, then idle agents (least recently used first), then queued
agents (newest first, never the head of the queue). An agent leaving the
pool is copied out of its blocks, its blocks are freed, and its file is
written in the background (outside the lock, off the decode path); until the
write ends its copy stays in memory, charged to the pool, and the pool knows
the bytes as *releasing*. A failed write keeps the copy in memory rather
than losing it. A queued agent whose cache is on disk is read back in the
background while it is next in line (:meth:`Spiller.prefetch`), and handed to
the engine at admission (:meth:`Spiller.fetch`).

``deterministic`` runs all disk work synchronously, so that what runs when
depends only on the sequence of calls (ranks that must stay in lockstep).
"""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import mlx.core as mx

from blockpool.errors import CacheCorruptionError
from blockpool.persistence import AgentFile
from blockpool.store.agent_files import AgentFiles
from blockpool.store.tiers import Queued, Tiers

log = logging.getLogger("blockpool.memory")


class Spiller:
    """The store's disk traffic. Methods named ``_locked`` expect the store's lock to be held."""

    def __init__(
        self, tiers: Tiers, pool: Any, engine: Any, files: AgentFiles, lock: threading.RLock, deterministic: bool
    ):
        self.tiers, self.pool, self.engine, self.files = tiers, pool, engine, files
        self._lock, self.deterministic = lock, deterministic
        self._io: ThreadPoolExecutor | None = None
        self.writes: dict[str, Future] = {}  # agent -> its latest durable write
        self.spill_writes: dict[str, Future] = {}  # agent -> its latest spill write
        self.errors: list[BaseException] = []  # background write failures, oldest first

    # ------------------------------------------------------------ room for the pool

    def reclaim(self, missing: int) -> int:
        """The pool is ``missing`` bytes short (engine thread): give it room.

        Returns the bytes freed at once; spills being written free theirs
        when the write ends (the pool knows them as ``releasing_bytes``).
        """
        tiers = self.tiers
        freed = announced = 0
        with self._lock:
            order = self.engine.waiting_uids()
            head = order[0] if order else None
            queued = sorted(
                (q for q in tiers.queued.values() if q.uid != head),
                key=lambda q: -order.index(q.uid) if q.uid in order else 0,
            )
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
            candidates = [(a, None) for a in tiers.idle()] + [(q.agent_id, q) for q in queued if q.handle is not None]
            usage = self.pool.stats().agents
            for agent_id, q in candidates:
                if freed + announced >= missing:
                    break
                nbytes = usage[agent_id].bytes if agent_id in usage else 0
                future = self.spill_locked(agent_id) if q is None else self._spill_queued_locked(q)
                if future is None or future.done():
                    freed += nbytes
                else:
                    announced += nbytes
        return freed

    def spill_locked(self, agent_id: str) -> Future | None:
        """Take an idle agent out of the pool. Returns the write's future, if any."""
        tiers = self.tiers
        blocks = tiers.hot.pop(agent_id)
        if self.files.cache_dir is None or tiers.is_durable(agent_id, blocks):
            self.pool.release(blocks)  # nowhere to keep it, or its file is current (or longer)
            return None
        file = self.files.export(self.pool, blocks)
        charge = object()
        self.pool.charge(charge, file.nbytes, force=True)  # the copy is memory until it is written
        self.pool.release(blocks)
        tiers.unwritten[agent_id] = (file, charge)
        return self.write_behind_locked(agent_id, file, charge, blocks.generation, spill=True)

    def _spill_queued_locked(self, queued: Queued) -> Future | None:
        """Take a queued agent's cache out of the pool; the engine reads it back when it is admitted."""
        blocks, queued.handle = queued.handle, None
        if self.files.cache_dir is None:
            self.pool.release(blocks)  # dropped: its history is prefilled again
            return None
        if self.tiers.durable.get(queued.agent_id) == blocks.generation:
            self.pool.release(blocks)
            queued.on_disk = True
            return None
        file = self.files.export(self.pool, blocks)
        charge = object()
        self.pool.charge(charge, file.nbytes, force=True)
        self.pool.release(blocks)
        queued.file, queued.charge = file, charge  # kept until written; then it can be dropped too

        def written(future: Future) -> None:
            if future.exception() is None:
                with self._lock:
                    queued.on_disk = True

        future = self.write_behind_locked(queued.agent_id, file, None, blocks.generation, spill=True)
        future.add_done_callback(written)
        return future

    # ------------------------------------------------------------ writing

    def write_behind_locked(
        self, agent_id: str, file: AgentFile, charge: object | None, generation: int | None, spill: bool
    ) -> Future:
        """Write ``file`` off the decode path; release its memory (``charge``) when done."""
        if spill:
            self.pool.begin_release(file.nbytes)
        tiers = self.tiers

        def write() -> None:
            try:
                self.files.save(agent_id, file)
            except BaseException as error:
                log.warning("could not write agent %r: %s", agent_id, error)
                with self._lock:
                    self.errors.append(error)
                raise
            finally:
                if spill:
                    self.pool.end_release(file.nbytes)
            with self._lock:
                tiers.durable[agent_id] = generation
                tiers.disk_ahead.discard(agent_id)
                if spill and tiers.unwritten.get(agent_id, (None,))[0] is file:
                    tiers.unwritten.pop(agent_id)
                if charge is not None and (not spill or agent_id not in tiers.unwritten):
                    self.pool.charge(charge, 0)

        if self.deterministic:
            future: Future = Future()
            try:
                write()
                future.set_result(None)
            except BaseException as error:  # a failed spill keeps the agent in memory (unwritten)
                future.set_exception(error)
        else:
            future = self._executor().submit(write)
        (self.spill_writes if spill else self.writes)[agent_id] = future
        return future

    def write_turn_locked(self, agent_id: str, blocks: Any) -> Future:
        """A durable store: write a finished turn behind; the copy's memory is charged until it is written."""
        file = self.files.export(self.pool, blocks)
        charge = object()
        self.pool.charge(charge, file.nbytes, force=True)
        return self.write_behind_locked(agent_id, file, charge, blocks.generation, spill=False)

    def wait_for_write(self, agent_id: str) -> None:
        """Wait for the agent's durable write, if one is in flight (a spill needs no wait: its copy is in memory)."""
        with self._lock:
            future = self.writes.get(agent_id)
        if future is not None:
            try:
                future.result()
            except Exception:
                pass  # recorded; the agent's copy stays in memory

    def wait(self, agent_id: str | None = None, timeout: float | None = None) -> bool:
        """Wait for background writes (of one agent, or all); whether they all ended within ``timeout``."""
        with self._lock:
            if agent_id is None:
                futures = [f for writes in (self.writes, self.spill_writes) for f in writes.values()]
            else:
                futures = [f for f in (self.writes.get(agent_id), self.spill_writes.get(agent_id)) if f is not None]
        for future in futures:
            try:
                future.result(timeout=timeout)
            except TimeoutError:
                return False
            except Exception:
                pass  # recorded in errors
        return True

    def flush(self) -> int:
        """Write every idle hot agent whose file is not current, and retry failed writes, now (caller's thread)."""
        if self.files.cache_dir is None:
            return 0
        self.wait()
        tiers = self.tiers
        with self._lock:
            agents = [(a, b) for a, b in tiers.hot.items() if not tiers.is_durable(a, b)]
            unwritten = list(tiers.unwritten.items())
        for agent_id, blocks in agents:
            self.files.save(agent_id, self.files.export(self.pool, blocks))
            with self._lock:
                if tiers.hot.get(agent_id) is blocks:
                    tiers.durable[agent_id] = blocks.generation
        for agent_id, (file, _) in unwritten:  # retry the writes that failed
            self.files.save(agent_id, file)
            with self._lock:
                if tiers.unwritten.get(agent_id, (None,))[0] is file:
                    tiers.drop_unwritten(agent_id)
        return len(agents) + len(unwritten)

    # ------------------------------------------------------------ reading back

    def fetch(self, agent_id: str) -> Any:
        """At admission (engine thread): hand over a queued request's cache (a handle, a file, or None)."""
        with self._lock:
            queued = self.tiers.queued.pop(agent_id, None)
        if queued is None:
            return None
        if queued.handle is None and queued.file is None and queued.loading is None and queued.on_disk:
            self._read_now(queued)
        if queued.loading is not None:
            try:
                queued.loading.result()
            except Exception as error:  # unreadable now: prefill the history instead
                log.warning("could not read agent %r back: %s", agent_id, error)
        with self._lock:
            self.tiers.fetched[queued.uid] = queued
            file = queued.file
            if file is not None and queued.on_disk:  # the engine copies it now; the disk keeps it
                queued.file = None  # its charge stays until the copy is made (settled)
        return queued.handle if queued.handle is not None else file

    def settled(self, agent_id: str, queued: Queued) -> None:
        """The engine copied what it fetched where its request reads it: a file read back from disk can go."""
        with self._lock:
            if queued.on_disk and queued.file is None and queued.handle is None and queued.charge is not None:
                self.pool.charge(queued.charge, 0)
                queued.charge = None

    def prefetch(self, agent_id: str) -> None:
        """The request is next in line: start reading its cache back from disk if it left memory and
        the budget has room for it now (else it is read when it is admitted, with room made then)."""
        with self._lock:
            queued = self.tiers.queued.get(agent_id)
            if queued is None or queued.handle is not None or queued.file is not None or queued.loading is not None:
                return
            if not queued.on_disk or queued.charge is not None:
                return
            charge = object()
            if not self.pool.charge(charge, queued.read_bytes):
                return  # a read now would hold memory past the budget
            queued.charge = charge
        if self.deterministic:
            self._read_now(queued)
        else:
            queued.loading = self._executor().submit(self._read_back, queued)

    def _read_now(self, queued: Queued) -> None:
        future: Future = Future()
        try:
            self._read_back(queued)
            future.set_result(None)
        except Exception as error:
            future.set_exception(error)
        queued.loading = future

    def _read_back(self, queued: Queued) -> None:
        """Read a queued agent's file into memory, charged (a prefetch charged its expected size first)."""
        try:
            file = self.files.load(queued.agent_id)
        except CacheCorruptionError:
            file = None  # moved aside by load
        with self._lock:
            charge = queued.charge or object()
            if file is None:
                self.pool.charge(charge, 0)
                queued.charge = None
                return
        mx.eval([a for layer in file.planes for a in layer.values()])
        self.pool.charge(charge, file.nbytes, force=True)  # it is in memory: charge what it really takes
        with self._lock:
            queued.file, queued.charge = file, charge

    def _executor(self) -> ThreadPoolExecutor:
        if self._io is None:
            self._io = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockpool-io")
        return self._io

    def shutdown(self) -> None:
        if self._io is not None:
            self._io.shutdown(wait=True)
