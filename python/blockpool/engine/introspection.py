"""What an engine can be asked about its requests and memory, apart from the engine itself.

:class:`EngineIntrospection` is a mixin of
:class:`~blockpool.engine.core.BlockPoolBatchEngine`: it reads the engine's
records (``_lock``, ``_requests``, ``_events``, ``_scheduler``, ``_stepper``,
``pool``) under its lock and changes nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from mlx_lm.generate_utils import BatchCountersSnapshot, BatchStats

from blockpool.engine.types import RequestState


class EngineIntrospection:
    """Read-only views of an engine: requests in flight and waiting, their state and sizes, memory, counters."""

    _lock: Any
    _requests: dict
    _events: Any
    _scheduler: Any
    _stepper: Any
    pool: Any

    @property
    def in_flight(self) -> int:
        """Requests submitted and not yet handed out as completed."""
        with self._lock:
            return len(self._requests) + self._events.completions_pending()

    def waiting_uids(self) -> list[int]:
        """The uids of the requests waiting for room, first in line first."""
        with self._lock:
            return [r.uid for r in self._scheduler.waiting]

    @property
    def waiting(self) -> int:
        """Requests waiting for room."""
        with self._lock:
            return len(self._scheduler.waiting)

    def request_state(self, uid: int) -> RequestState | None:
        """Where a request in flight is (None once it has ended)."""
        with self._lock:
            request = self._requests.get(uid)
            if request is None:
                return None
            admission = self._stepper.admission
            if request in self._scheduler.waiting:
                state = "waiting"
            elif admission is not None and request in admission.requests:
                state = "prefilling"
            else:
                state = "running"
            return RequestState(state, request.preemptions, len(request.tokens))

    def request_tokens(self, uid: int) -> int:
        """Tokens a request's agent will hold if it ended now (history, prompt, generated); 0 if unknown."""
        with self._lock:
            request = self._requests.get(uid)
            return 0 if request is None else request.total_tokens

    def request_bytes(self, history_tokens: int, prompt_tokens: int, max_tokens: int) -> int:
        """The most memory a request can take alone: its blocks, its working cache and one layer's copy.

        ``submit`` refuses a request for which this exceeds the pool's budget.
        """
        return self._scheduler.request_bytes(history_tokens + prompt_tokens + max_tokens)

    def fits_ever(self, history_tokens: int, prompt_tokens: int, max_tokens: int) -> bool:
        """Whether such a request could finish alone in an empty pool (else ``submit`` refuses it)."""
        return self.request_bytes(history_tokens, prompt_tokens, max_tokens) <= self.pool.total_bytes

    @property
    def batch_cache_nbytes(self) -> int:
        """Bytes of KV the running requests hold outside blocks (their working caches)."""
        return self._stepper.nbytes

    @contextlib.contextmanager
    def stats(self) -> Iterator[BatchStats]:
        """mlx-lm's ``BatchStats`` for the work done while the block runs (prompt and decode tokens, speeds)."""
        stats = BatchStats()
        start = BatchCountersSnapshot(**self._stepper.counters_snapshot())
        try:
            yield stats
        finally:
            stats += BatchCountersSnapshot.between(start, BatchCountersSnapshot(**self._stepper.counters_snapshot()))
