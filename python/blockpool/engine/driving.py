"""Who drives the engine: one thread at a time runs the model; others may submit and cancel.

Driving (``step``, ``stream``, ``tick``) may nest on the thread that
drives (a ``tick`` inside a ``stream`` loop, say); another thread that
tries to drive meanwhile gets :class:`~blockpool.errors.EngineBusyError`
at once rather than blocking, since a second driver would interleave its
model calls with the first one's.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

from blockpool.errors import EngineBusyError


class DriveGuard:
    """The thread that drives an engine, and how deeply it is nested."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._driver: int | None = None  # thread id driving the engine
        self._depth = 0

    @contextlib.contextmanager
    def driving(self) -> Iterator[None]:
        """Hold the engine for this thread while the block runs.

        Raises:
            EngineBusyError: Another thread is driving it.
        """
        me = threading.get_ident()
        with self._lock:
            if self._driver not in (None, me):
                raise EngineBusyError(
                    "another thread is driving this engine (step, stream or tick); "
                    "drive it from one thread and submit from any"
                )
            self._driver = me
            self._depth += 1
        try:
            yield
        finally:
            with self._lock:
                self._depth -= 1
                if self._depth == 0:
                    self._driver = None
