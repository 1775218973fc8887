"""Running the server tensor-parallel under ``mlx.launch``: rank 0 tells the other ranks what to do.

Every rank loads its shard of the model (mlx-lm's ``sharded_load``), owns a
pool sized for its shard of the KV heads, and runs the same engine. The
model's forward pass sums partial results across ranks, so every rank must
run the same batch, step for step. Rank 0 alone serves HTTP; at each engine
iteration it sends the others the list of operations to apply before that
iteration (submit with the request's full parameters, cancel, forget, stop),
and every rank applies the same list at the same iteration. Nothing a rank
decides may depend on timing: rank 0 makes every timing-dependent choice
(which waiting request goes next, whether a write finished) and sends the
outcome.

The transport is the one ``mlx_lm.server`` uses: a pickled list summed into
every rank with ``mx.distributed.all_sum`` (rank 0 contributes the bytes,
the others zeros). It runs on mlx-lm's generation stream, the engine's: the
engine evaluates the next decode step asynchronously, and that step's own
all_sums must reach the wire before these, in the same order on every rank.
"""

from __future__ import annotations

import pickle
from typing import Any

import mlx.core as mx
import numpy as np
from mlx_lm.generate import generation_stream


class Lockstep:
    """Sends rank 0's per-iteration operations to every rank.

    Args:
        group: The ``mx.distributed`` group; a group of one sends nothing.
    """

    def __init__(self, group: Any | None = None):
        self.group = group if group is not None else mx.distributed.init()
        self.rank, self.size = self.group.rank(), self.group.size()

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def share(self, operations: list[Any] | None) -> list[Any]:
        """Rank 0 passes its operations and gets them back; the other ranks pass None and get rank 0's."""
        if not self.distributed:
            return list(operations or [])
        if self.rank == 0:
            data = pickle.dumps(list(operations or []), protocol=pickle.HIGHEST_PROTOCOL) if operations else b""
            size = self._sum(mx.array([len(data)], dtype=mx.int32)).item()
            if size:
                self._sum(mx.array(np.frombuffer(data, dtype=np.uint8)))
            return list(operations or [])
        size = self._sum(mx.zeros((1,), dtype=mx.int32)).item()
        if not size:
            return []
        data = self._sum(mx.zeros((size,), dtype=mx.uint8))
        return pickle.loads(np.array(data).tobytes())

    def agree_seed(self) -> int:
        """A seed every rank gets the same of (rank 0's), for the global random state."""
        seed = int(np.random.SeedSequence().generate_state(1, dtype=np.uint32)[0]) if self.rank == 0 else 0
        if self.distributed:
            seed = int(self._sum(mx.array([seed], dtype=mx.int64)).item())
        return seed

    def _sum(self, array: mx.array) -> mx.array:
        with mx.stream(generation_stream):
            out = mx.distributed.all_sum(array, group=self.group)
            mx.eval(out)
        return out
