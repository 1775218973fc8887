"""The engine: :class:`BlockPoolBatchEngine` and what it hands out. See :mod:`.core` for its parts."""

from blockpool.engine.core import BlockPoolBatchEngine
from blockpool.engine.history import HistorySource
from blockpool.engine.types import CompletedGeneration, GenerationEvent, ProgressCallback, RequestState

__all__ = [
    "BlockPoolBatchEngine",
    "CompletedGeneration",
    "GenerationEvent",
    "HistorySource",
    "ProgressCallback",
    "RequestState",
]
