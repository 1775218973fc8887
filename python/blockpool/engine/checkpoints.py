"""Recurrent checkpoints: where a prefill stops to snapshot a hybrid model's state, and the snapshots.

A recurrent layer can resume only from a position whose state was kept
(:mod:`blockpool.kinds.recurrent`). While a request prefills, its chunks
are cut at the checkpoint grid (every ``every`` tokens, on block
boundaries) and the state is snapshotted there and where the prompt ends
(the last token is processed with the first generated one). Snapshots go
straight into pool blocks held by the agent, charged to the budget like any
block, and wait in ``request.history.pending`` until the request's
write-back makes them part of its handle (or it ends without output, and
they are freed). A snapshot that finds no room is skipped: checkpoints save
recomputation, they are never needed for exactness.

For a model without recurrent layers this does nothing.
"""

from __future__ import annotations

import logging
from typing import Any

from blockpool.errors import PoolExhaustedError

log = logging.getLogger("blockpool.engine")


#: Checkpoints may add at most this share of the memory of the K and V blocks they come between.
CHECKPOINT_SHARE = 0.25
#: The interval of a model with no K and V at all (recurrent layers only), in blocks.
STATE_ONLY_BLOCKS = 4


def auto_checkpoint_blocks(spec: Any) -> int:
    """The default checkpoint interval: the fewest blocks whose K and V take at least 1 / CHECKPOINT_SHARE
    times a checkpoint's bytes (one snapshot per recurrent layer); STATE_ONLY_BLOCKS without K and V.

    Measured on the suite's tiny Qwen3.5-like model (4,096-token prompt, two CPU cores): prefill took
    1.39 s without grid checkpoints, 1.41 s with one every 4 blocks and 1.41 s with one every block,
    so their time is negligible and their memory decides. There a checkpoint is 5,632 bytes against
    65,536 bytes of K and V per block: one per block. A Qwen3-Next-sized layout gets one every few
    dozen blocks.
    """
    state = sum(spec.bytes_per_block(i) for i in spec.state_layers)
    kv = sum(spec.bytes_per_block(i) for i in range(spec.num_layers) if spec.kind(i).storage == "tokens")
    if not kv:
        return STATE_ONLY_BLOCKS
    return max(1, -(-int(state / CHECKPOINT_SHARE) // kv))


class Checkpointer:
    """Checkpoint positions and snapshots for one engine.

    Args:
        spec: The model's cache layout.
        pool: The pool the snapshots go to.
        every: The grid in tokens (a multiple of the block size), or None
            for no grid (only prompt ends and turn ends are kept).
    """

    def __init__(self, spec: Any, pool: Any, every: int | None):
        self.spec, self.pool, self.every = spec, pool, every
        self.layers = spec.state_layers

    def chunk(self, request: Any, size: int) -> int:
        """How many of the next ``size`` prompt tokens to prefill now: up to the next grid point."""
        if not self.layers or not self.every or size <= 0:
            return size
        position = request.history.keep + request.prefilled
        return min(size, self.every - position % self.every)

    def after_chunk(self, request: Any, batch: Any, row: int) -> None:
        """After a prefill chunk: snapshot the request's state if it stands at a grid point or its prompt's end."""
        if not self.layers or not request.prefilled:
            return
        position = request.history.keep + request.prefilled
        on_grid = bool(self.every) and position % self.every == 0
        at_end = request.prefilled == len(request.prompt) - 1
        if on_grid or at_end:
            self.snapshot(request, batch, row, position)

    def snapshot(self, request: Any, batch: Any, row: int, position: int) -> None:
        """Copy row ``row``'s recurrent state into new blocks of the agent, recorded as taken at ``position``."""
        pending = request.history.pending
        if any(p == position for pairs in pending.values() for p, _ in pairs):
            return
        states = batch.row_states(row, self.layers)
        try:
            blocks = self.pool.reserve({i: 1 for i in self.layers}, request.agent_id)
        except PoolExhaustedError:
            log.debug("no room for a checkpoint of agent %r at %d: skipped", request.agent_id, position)
            return
        try:
            self.pool.write_states([(i, blocks[i], [states[i]]) for i in self.layers])
        except BaseException:
            self.pool.free([b for new in blocks.values() for b in new], request.agent_id)
            raise
        for i in self.layers:
            pending.setdefault(i, []).append((position, blocks[i][0]))
