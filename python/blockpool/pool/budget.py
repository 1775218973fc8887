"""The byte budget: every byte of KV the pool and the engine on it hold, against one ceiling.

Three things are charged:

- **blocks**: every allocated block, held or cached-free;
- **working**: bytes an owner (the engine's running batch, a store's
  in-memory copy of an agent) holds outside blocks, set per owner;
- **transient**: bytes of a copy in progress, charged around it.

When something does not fit, the budget first asks its *evictor* (handed in
by the pool: drop the oldest cached-free block) until it fits or nothing is
left to evict; :meth:`Budget.make_room` then asks the registered
*reclaimers* (a store that spills idle agents). It never reaches into block
records itself. *Releasing* bytes are memory reclaimers promised to free
when background work ends (a spill being written), so that a waiter knows
more is coming.

All state is guarded by the pool's lock, which the budget is given.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from blockpool.errors import InvalidRequestError, PoolExhaustedError

Reclaimer = Callable[[int], int]
"""Called with the bytes the pool lacks; frees what it can (now or soon) and returns the bytes it freed now."""


class Budget:
    """One ceiling for blocks, working and transient bytes.

    Args:
        total_bytes: The ceiling.
        total_blocks: The pool's size in blocks, to state shortfalls in blocks.
        lock: The pool's lock (reentrant); the budget's state is under it.
        evict: Drops one cached-free block and returns True, or returns
            False when there is none. Called with the lock held.
    """

    def __init__(self, total_bytes: int, total_blocks: int, lock: threading.RLock, evict: Callable[[], bool]):
        self.total_bytes, self.total_blocks = total_bytes, total_blocks
        self._lock, self._evict = lock, evict
        self.block_bytes = 0
        self._working: dict[object, int] = {}
        self._transient = 0
        self._releasing = 0
        self._released = threading.Condition(lock)
        self._reclaimers: list[Reclaimer] = []

    # ------------------------------------------------------------ reading

    @property
    def used(self) -> int:
        """Everything charged: blocks, working and transient bytes."""
        with self._lock:
            return self.block_bytes + sum(self._working.values()) + self._transient

    @property
    def transient_bytes(self) -> int:
        with self._lock:
            return self._transient

    def working(self, owner: object | None = None) -> int:
        """Working bytes charged by one owner, or by all."""
        with self._lock:
            return sum(self._working.values()) if owner is None else self._working.get(owner, 0)

    def blocks_in(self, nbytes: int) -> int:
        """``nbytes`` in blocks of the pool's unit (``total_bytes / total_blocks``)."""
        return max(0, nbytes) * self.total_blocks // self.total_bytes

    # ------------------------------------------------------------ fitting

    def fits(self, nbytes: int) -> bool:
        """Whether ``nbytes`` more fit, evicting cached-free blocks (oldest first) as needed. Lock held."""
        while self.total_bytes - self.used < nbytes and self._evict():
            pass
        return self.total_bytes - self.used >= nbytes

    def make_room(self, nbytes: int, *, reclaim: bool = True) -> bool:
        """Try to make ``nbytes`` chargeable: evict, then ask the reclaimers (outside the lock).

        Returns:
            Whether ``nbytes`` fit now. Reclaimers may also have started
            work (a spill being written) that frees memory later.
        """
        with self._lock:
            if self.fits(nbytes):
                return True
            if not reclaim:
                return False
            reclaimers = list(self._reclaimers)
        for reclaimer in reclaimers:
            with self._lock:
                missing = self.total_bytes - self.used - nbytes
                if missing >= 0:
                    return True
            reclaimer(-missing)
        with self._lock:
            return self.fits(nbytes)

    def add_reclaimer(self, reclaimer: Reclaimer) -> None:
        with self._lock:
            self._reclaimers.append(reclaimer)

    def remove_reclaimer(self, reclaimer: Reclaimer) -> None:
        with self._lock:
            if reclaimer in self._reclaimers:
                self._reclaimers.remove(reclaimer)

    # ------------------------------------------------------------ charging

    def charge(self, owner: object, nbytes: int, *, force: bool = False) -> bool:
        """Set ``owner``'s working bytes; False (nothing changed) if the growth does not fit.

        Growing may evict cached-free blocks, never asks the reclaimers;
        shrinking always succeeds; ``force`` records memory already held,
        even past the ceiling.
        """
        if nbytes < 0:
            raise InvalidRequestError(f"cannot charge {nbytes} bytes")
        with self._lock:
            current = self._working.get(owner, 0)
            if nbytes > current and not self.fits(nbytes - current) and not force:
                return False
            if nbytes:
                self._working[owner] = nbytes
            else:
                self._working.pop(owner, None)
            return True

    @contextlib.contextmanager
    def transient(
        self, nbytes: int, *, force: bool = False, available: Callable[[], int] = lambda: 0
    ) -> Iterator[None]:
        """Charge ``nbytes`` while a copy runs; ``PoolExhaustedError`` if they do not fit (unless ``force``)."""
        with self._lock:
            if not self.fits(nbytes) and not force:
                raise PoolExhaustedError(self.blocks_in(nbytes), available(), "for a copy")
            self._transient += nbytes
        try:
            yield
        finally:
            with self._lock:
                self._transient -= nbytes

    # ------------------------------------------------------------ memory promised by background work

    @property
    def releasing(self) -> int:
        with self._lock:
            return self._releasing

    def begin_release(self, nbytes: int) -> None:
        with self._lock:
            self._releasing += nbytes

    def end_release(self, nbytes: int) -> None:
        with self._released:
            self._releasing -= nbytes
            self._released.notify_all()

    def wait_for_release(self, timeout: float) -> None:
        with self._released:
            if self._releasing:
                self._released.wait(timeout)

    def check(self, cached_bytes: int) -> None:
        """Raise ``AssertionError`` if the charges are impossible."""
        assert self._transient >= 0
        assert self.used - cached_bytes <= self.total_bytes + self._transient


class BudgetMethods:
    """The pool's memory API (working charges, copies in flight, reclaimers), delegated to its :class:`Budget`.

    Mixed into :class:`~blockpool.pool.BlockPool`, which sets ``_budget``.
    """

    _budget: Budget

    def add_reclaimer(self, reclaimer: Reclaimer) -> None:
        """Register a callable that frees memory when the pool is short (see :data:`Reclaimer`)."""
        self._budget.add_reclaimer(reclaimer)

    def remove_reclaimer(self, reclaimer: Reclaimer) -> None:
        """Unregister a reclaimer (no error if it was not registered)."""
        self._budget.remove_reclaimer(reclaimer)

    def make_room(self, nbytes: int, *, reclaim: bool = True) -> bool:
        """Try to make ``nbytes`` chargeable: drop cached-free blocks, then ask the reclaimers.

        Returns:
            Whether ``nbytes`` fit now. Reclaimers may also have started
            work (a spill being written) that frees memory later.
        """
        return self._budget.make_room(nbytes, reclaim=reclaim)

    def charge(self, owner: object, nbytes: int, *, force: bool = False) -> bool:
        """Set the working bytes ``owner`` holds outside blocks; False (nothing changed) if they do not fit.

        Growing a charge may drop cached-free blocks; it never asks the
        reclaimers (call :meth:`make_room` first for that). Shrinking always
        succeeds. ``force`` records the charge even past the budget (memory
        that is already held: the pool then fits nothing new until it drops).
        """
        return self._budget.charge(owner, nbytes, force=force)

    def working_bytes(self, owner: object | None = None) -> int:
        """Working bytes charged by one owner, or by all."""
        return self._budget.working(owner)

    @contextlib.contextmanager
    def transient(self, nbytes: int, *, force: bool = False) -> Iterator[None]:
        """Charge ``nbytes`` for the duration of a copy.

        Raises:
            PoolExhaustedError: They do not fit (unless ``force``: a copy that
                frees at least as much as it takes, e.g. a write-back, may
                run over for its duration rather than fail).
        """
        with self._budget.transient(nbytes, force=force, available=self.available_blocks):
            yield

    @property
    def releasing_bytes(self) -> int:
        """Bytes reclaimers have promised to free soon (a spill being written)."""
        return self._budget.releasing

    def begin_release(self, nbytes: int) -> None:
        """A reclaimer announces memory it will free when background work ends."""
        self._budget.begin_release(nbytes)

    def end_release(self, nbytes: int) -> None:
        """The announced work ended (the memory was freed, or will not be); wakes waiters."""
        self._budget.end_release(nbytes)

    def wait_for_release(self, timeout: float) -> None:
        """Sleep until announced background work ends, or ``timeout`` seconds."""
        self._budget.wait_for_release(timeout)
