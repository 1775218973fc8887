"""The errors blockpool raises. Each says what was wrong; none leaves state half-changed."""

from __future__ import annotations


class BlockPoolError(Exception):
    """Base class of every blockpool error."""


class PoolExhaustedError(BlockPoolError):
    """The pool has fewer free blocks than a request needs. Nothing was allocated."""

    def __init__(self, requested: int, available: int, detail: str = ""):
        self.requested = requested
        self.available = available
        where = f" {detail}" if detail else ""
        super().__init__(f"pool exhausted: asked for {requested} blocks{where} but only {available} are free")


class BlockOperationError(BlockPoolError):
    """A block operation broke ownership rules: a block the agent does not hold, a double free."""


class UnsupportedModelError(BlockPoolError):
    """The model's cache is not plain attention KV (e.g. SSM state, chunked or nested caches)."""


class InvalidRequestError(BlockPoolError, ValueError):
    """A request to the engine or the store is malformed. Nothing was changed."""


class IncompatibleCacheError(BlockPoolError):
    """A cache was made for another model: its geometry or fingerprint does not match."""


class GenerationError(BlockPoolError):
    """The model failed while a request was generating. Its blocks were returned to the pool."""


class EngineBusyError(BlockPoolError):
    """Another thread is already driving the engine (``step``, ``stream`` or ``tick``).

    One thread runs the model; others may ``submit`` and ``cancel`` freely.
    """


class PersistenceError(BlockPoolError, OSError):
    """An agent file could not be written or read: the disk is full or read-only, the path
    is unusable (a directory in the way, no such directory), or an I/O error.

    It is an ``OSError`` too: ``errno`` and ``filename`` say what and where. A
    failed write leaves no temporary file, and the previous file (if any) as it was.
    """


class CacheCorruptionError(BlockPoolError):
    """A persisted cache failed verification: truncated, bit-flipped, or not a cache file."""
