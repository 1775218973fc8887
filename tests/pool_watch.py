"""What a pool charges while a request runs, read between the engine's events (tests and benchmarks)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any


def most_charged(engine: Any, pool: Any, submit: Callable[[], int]) -> tuple[int, Any]:
    """Submit one request (``submit`` returns its uid) and run the engine to its end: the most the pool
    charged meanwhile above what it charged before, and the request's completion."""
    before = pool.used_bytes
    uid = submit()
    most, done = before, None
    for event in engine.stream():
        most = max(most, pool.used_bytes)
        if event.completion is not None and event.uid == uid:
            done = event.completion
    assert done is not None and done.finish_reason in ("stop", "length"), done
    return most - before, done
