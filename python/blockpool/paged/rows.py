"""Paged rows: each running sequence's K and V kept in its blocks, written and read where they are.

A sequence of a paged batch holds, per paged layer, the blocks of its
history (from its handle) and the blocks allocated while it runs. Before a
forward pass, :meth:`PagedRows.prepare` makes room for its new tokens: its
last, partly filled block is taken out of the pool to be written in place
(or, when another agent holds it too, or the pool is quantized, continued in
a new block that starts as a copy of it), and new blocks are allocated for
the rest. During the pass each layer writes its new K and V into those
blocks (:meth:`PagedRows.write`, native ``write_tokens``) and attends over
every block where it is (:meth:`PagedRows.attend`, native
``paged_attention``). Nothing is gathered: a running request holds its KV
once.

The handle a sequence started from stays valid while it runs: none of its
blocks is freed, and its rows are never written over (only positions past
its tokens, in a block taken in place). So a request that ends without
output hands its handle back as it was (:meth:`PagedRows.abandon` frees the
new blocks and puts taken ones back); one that ends with output gets a new
handle of the blocks it holds (:meth:`PagedRows.plans`), and the handle's
blocks it no longer needs (a sliding window's oldest) are freed then.

Quantized pools: blocks written while a request runs are kept in the
model's dtype until the request's write-back quantizes them (as the gather
path keeps a request's own tokens in full precision); they are charged as
working memory meanwhile.

Which tokens a layer keeps is its cache kind's rule (``block_range``), and
the order mlx-lm's ``RotatingKVCache`` sums a sliding layer's keys in is
kept per row (``ring_base``, see ``csrc/block_index.h``), so results equal
mlx-lm's bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx

from blockpool import ops
from blockpool.block import AgentBlocks, KVBlock
from blockpool.errors import UnsupportedModelError
from blockpool.kinds import LayerPlan, blocks_for

Planes = dict[str, mx.array]


@dataclass(eq=False)
class LayerRow:
    """One sequence's blocks in one paged layer: logical block ``first + j`` is ``blocks[j]``, read
    from ``planes[j]`` (None for a block of a sliding window freed while the request runs)."""

    blocks: list[KVBlock | None]
    planes: list[Planes | None]
    first: int
    valid_from: int
    ring_base: int
    fresh: set[int] = field(default_factory=set)  # ids allocated while the request runs
    taken: set[int] = field(default_factory=set)  # ids whose arrays are out of the pool, written in place
    heads: dict[int, tuple[Planes, int]] = field(default_factory=dict)  # quantized: a copy's first rows, as stored
    published: set[int] = field(default_factory=set)  # ids handed out for sharing: continued in a copy
    writes: list[tuple[int, int, int, int]] = field(default_factory=list)  # (index, offset, source start, count)


@dataclass(eq=False)
class PagedSequence:
    """One running sequence: its agent, the handle it started from, its tokens and its layers' blocks."""

    agent_id: str
    base: AgentBlocks
    total: int
    layers: dict[int, LayerRow]
    count: int = 0  # new tokens of the forward pass being built


def ring_base(window: int | None, handle: AgentBlocks, layer_id: int) -> int:
    """Where mlx-lm's ring of a sliding layer starts for a history (-1: a layer with no ring)."""
    if not window:
        return -1
    total = handle.total_tokens
    index = handle.ring_index.get(layer_id)
    if index is not None:  # the next token goes to slot ``index``
        return total - index
    return total if total >= window else 0


def start_sequence(pool: Any, layers: Sequence[int], handle: AgentBlocks) -> PagedSequence:
    """A sequence that continues ``handle``'s history (no copy: its blocks are read where they are)."""
    spec, b, total = handle.spec, handle.spec.block_tokens, handle.total_tokens
    held = {i: handle.blocks[i] for i in layers if handle.blocks[i]}
    arrays = pool.block_arrays(held) if held else {}
    rows = {}
    for i in layers:
        blocks = list(handle.blocks[i])
        rows[i] = LayerRow(
            blocks=blocks,
            planes=list(arrays.get(i, [])),
            first=blocks_for(total, b) - len(blocks),
            valid_from=handle.valid_start(i) if total else 0,
            ring_base=ring_base(spec.kind(i).window, handle, i),
        )
    return PagedSequence(handle.agent_id, handle, total, rows)


class PagedRows:
    """The paged layers of a batch's sequences: room for new tokens, writes, attention, write-back.

    Args:
        pool: The pool the blocks live in.
        layers: The spec entries that run paged.
        rows: The sequences, in batch order.
    """

    def __init__(self, pool: Any, layers: Sequence[int], rows: Sequence[PagedSequence] = ()):
        self.pool, self.spec, self.layers = pool, pool.spec, tuple(layers)
        self.block_tokens = self.spec.block_tokens
        self.windows = {i: self.spec.kind(i).window or 0 for i in self.layers}
        self.rows: list[PagedSequence] = list(rows)
        self.attended: set[int] = set()  # layers whose attention ran through attend() (the support check)
        self._masks: dict[int, tuple[mx.array, int]] = {}  # id -> (mask, window) made this pass by make_mask
        self._quantized = pool.kv_bits is not None

    # ------------------------------------------------------------ rows

    def __len__(self) -> int:
        return len(self.rows)

    def extend(self, rows: Sequence[PagedSequence]) -> None:
        self.rows += list(rows)

    def keep(self, indices: Sequence[int]) -> None:
        """Keep only these rows (the others were written back or abandoned)."""
        self.rows = [self.rows[i] for i in indices]

    # ------------------------------------------------------------ memory

    def growth_bytes(self) -> int:
        """Bytes the next one-token step allocates: a block per layer for each row whose last block is
        full (or must be copied first), and its full-precision arrays in a quantized pool."""
        total = 0
        for row in self.rows:
            for i, lr in row.layers.items():
                if row.total % self.block_tokens == 0 or not self._writable(row, i, lr):
                    total += self._new_block_bytes(i)
        return total

    def nbytes(self) -> int:
        """Working bytes beyond the blocks' charge: a quantized pool's blocks kept in the model's dtype."""
        if not self._quantized:
            return 0
        return sum(
            self._full_block_bytes(i)
            for row in self.rows
            for i, lr in row.layers.items()
            for blk in lr.blocks
            if blk is not None and blk.block_id in lr.fresh
        )

    def arrays(self, layer_id: int | None = None) -> list[mx.array]:
        """The arrays being written, of one layer or all (to evaluate or schedule them)."""
        out = []
        for row in self.rows:
            for i, lr in row.layers.items():
                if layer_id is not None and i != layer_id:
                    continue
                for blk, planes in zip(lr.blocks, lr.planes):
                    if blk is not None and planes is not None and blk.block_id in lr.taken:
                        out += list(planes.values())
        return out

    # ------------------------------------------------------------ one forward pass

    def prepare(self, counts: Sequence[int]) -> None:
        """Before a forward pass of ``counts[r]`` new tokens per row: make every block they go to
        writable (allocating past the budget: the scheduler made room) and plan the writes."""
        b = self.block_tokens
        for row, n in zip(self.rows, counts):
            row.count = n
            for lr in row.layers.values():
                lr.writes = []
            if not n:
                continue
            start, end = row.total, row.total + n
            need = {}
            for i, lr in row.layers.items():
                if start % b:
                    self._make_writable(row, i, lr, start // b - lr.first)
                need[i] = max(0, blocks_for(end, b) - (lr.first + len(lr.blocks)))
            wanted = {i: k for i, k in need.items() if k}
            got = self.pool.reserve(wanted, row.agent_id, force=True) if wanted else {}
            for i, lr in row.layers.items():
                for blk in got.get(i, []):
                    lr.blocks.append(blk)
                    lr.planes.append(None)
                    lr.fresh.add(blk.block_id)
                    lr.taken.add(blk.block_id)
                p = start
                while p < end:
                    count = min(b - p % b, end - p)
                    lr.writes.append((p // b - lr.first, p % b, p - start, count))
                    p += count

    def write(self, layer_id: int, keys: mx.array, values: mx.array) -> None:
        """A layer's new K and V ``[rows, H, N, D]`` into the rows' blocks (in place where nothing else
        holds the arrays: the old ones are dropped before the writes run)."""
        jobs, targets = [], []
        for r, row in enumerate(self.rows):
            lr = row.layers[layer_id]
            for index, offset, first, count in lr.writes:
                planes = lr.planes[index]
                old_k, old_v = (planes["k"], planes["v"]) if planes is not None else (None, None)
                jobs.append((0, old_k, r, first, count, offset))
                jobs.append((1, old_v, r, first, count, offset))
                targets.append((lr, index))
                lr.planes[index] = None
        if not jobs:
            return
        planes = old_k = old_v = None
        try:
            written = ops.write_tokens([keys, values], jobs, block_tokens=self.block_tokens)
        except BaseException:
            for (lr, index), k_job, v_job in zip(targets, jobs[0::2], jobs[1::2]):
                lr.planes[index] = None if k_job[1] is None else {"k": k_job[1], "v": v_job[1]}
            raise
        jobs.clear()
        for (lr, index), k, v in zip(targets, written[0::2], written[1::2]):
            lr.planes[index] = {"k": k, "v": v}

    def mask(self, n: int, window: int | None) -> mx.array:
        """A mask array as mlx-lm's caches make it (never evaluated: the kernel masks by position),
        remembered with its window so that :meth:`mask_window` knows it when the model passes it back."""
        from mlx_lm.models.base import create_causal_mask

        offset = max((row.total for row in self.rows), default=0)
        array = create_causal_mask(n, offset, window_size=window)
        self._masks[id(array)] = (array, window or 0)
        return array

    def mask_window(self, mask: object) -> int:
        """The window a mask the model passes to attention stands for (0: none beyond the causal mask).

        Raises:
            UnsupportedModelError: A mask array this layer's cache did not make.
        """
        if mask is None or isinstance(mask, str):
            return 0
        known = self._masks.get(id(mask))
        if known is None or known[0] is not mask:
            raise UnsupportedModelError(
                "the model passes its own attention mask, which paged attention cannot apply "
                "(create the engine with paged=False)"
            )
        return known[1]

    def attend(
        self, layer_id: int, queries: mx.array, scale: float, sinks: mx.array | None = None, window: int = 0
    ) -> mx.array:
        """The layer's attention for every row's queries over its blocks, in place (``window``: a window
        the model's mask adds to the layer's own)."""
        self.attended.add(layer_id)
        keys, values, quantized, tables, where = [], [], [], [], {}
        for row in self.rows:
            lr = row.layers[layer_id]
            table = [-1] * lr.first
            for blk, planes in zip(lr.blocks, lr.planes):
                if blk is None or planes is None:
                    table.append(-1)
                    continue
                key = blk.block_id
                if key not in where:
                    if "k_scales" in planes:
                        where[key] = -2 - len(quantized)
                        quantized.append(planes)
                    else:
                        where[key] = len(keys)
                        keys.append(planes["k"])
                        values.append(planes["v"])
                table.append(where[key])
            tables.append(table)
        if quantized:  # quantized blocks come after the full-precision ones
            n = len(keys)
            tables = [[n - 2 - t if t <= -2 else t for t in table] for table in tables]
        ring = self.windows[layer_id]  # the kind's window: mlx-lm keeps it as a ring
        window = min(w for w in (ring, window) if w) if ring or window else 0
        rings = [row.layers[layer_id].ring_base if row.count == 1 else -1 for row in self.rows] if ring else None
        return ops.paged_attention(
            queries,
            keys,
            values,
            tables,
            [row.total + row.count for row in self.rows],
            [row.total for row in self.rows],
            scale=scale,
            window=window,
            sinks=sinks,
            ring_bases=rings,
            quantized_keys=[(q["k"], q["k_scales"], q["k_biases"]) for q in quantized],
            quantized_values=[(q["v"], q["v_scales"], q["v_biases"]) for q in quantized],
            group_size=self.pool.kv_group_size,
            bits=self.pool.kv_bits,
        )

    def commit(self) -> None:
        """After a forward pass: the rows hold their new tokens; fresh blocks that fell out of a
        sliding window are freed, and a multi-token step restarts mlx-lm's ring."""
        b = self.block_tokens
        self._masks.clear()
        for row in self.rows:
            n, row.count = row.count, 0
            if not n:
                continue
            row.total += n
            for i, lr in row.layers.items():
                lr.writes = []
                window = self.windows[i]
                if not window:
                    continue
                if n > 1:  # mlx-lm's RotatingKVCache puts a multi-token update in time order
                    lr.ring_base = row.total if row.total >= window else 0
                lo = self.spec.kind(i).block_range(row.total, b)[0]
                gone = []
                for j in range(max(0, min(lo, lr.first + len(lr.blocks)) - lr.first)):
                    blk = lr.blocks[j]
                    if blk is not None and blk.block_id in lr.fresh:
                        gone.append(blk)
                        lr.fresh.discard(blk.block_id)
                        lr.taken.discard(blk.block_id)
                        lr.blocks[j] = lr.planes[j] = None
                if gone:
                    self.pool.free(gone, row.agent_id)

    # ------------------------------------------------------------ write-back and abandon

    def plans(self, index: int) -> tuple[dict[int, LayerPlan], dict[int, int]]:
        """Store row ``index``'s written blocks in the pool and plan its new handle: per paged layer the
        blocks it keeps (none to write), and the handle's blocks it no longer needs; and the ring index
        of each sliding layer, as mlx-lm's cache records it."""
        row, b = self.rows[index], self.block_tokens
        self._store(row)
        plans, rings = {}, {}
        for i, lr in row.layers.items():
            lo, hi = self.spec.kind(i).block_range(row.total, b)
            kept = tuple(lr.blocks[j - lr.first] for j in range(lo, hi))
            if any(blk is None for blk in kept):
                raise RuntimeError(f"layer {i}: a block the history needs was freed")
            ids = {blk.block_id for blk in kept}
            dropped = tuple(blk for blk in row.base.blocks[i] if blk.block_id not in ids)
            plans[i] = LayerPlan(i, lo, kept, dropped, 0, row.total, max(lr.valid_from, lo * b))
            window = self.windows[i]
            if window and row.total > window and (ring := (row.total - lr.ring_base) % window):
                rings[i] = ring
        return plans, rings

    def written_back(self, index: int, handle: AgentBlocks, published: bool = False) -> None:
        """Row ``index`` was written back as ``handle``: its blocks are the handle's now (it may go on).

        ``published``: the handle was handed out for other agents to share (a prompt shared early), so
        its partly filled last block is continued in a copy, leaving the shared tokens readable."""
        row, b = self.rows[index], self.block_tokens
        row.base = handle
        stored = self.pool.block_arrays({i: handle.blocks[i] for i in row.layers}) if self._quantized else {}
        for i, lr in row.layers.items():
            lo = self.spec.kind(i).block_range(row.total, b)[0]
            cut = max(0, lo - lr.first)
            lr.blocks, lr.planes, lr.first = lr.blocks[cut:], lr.planes[cut:], lr.first + cut
            if self._quantized:  # read the stored planes: the full-precision copies can go
                lr.planes = list(stored[i])
            lr.fresh.clear()
            lr.taken.clear()
            lr.heads.clear()
            lr.published = {lr.blocks[-1].block_id} if published and row.total % b and lr.blocks else set()

    def cancel_pass(self) -> None:
        """A forward pass failed before :meth:`commit`: its writes are not tokens of the rows."""
        self._masks.clear()
        for row in self.rows:
            row.count = 0
            for lr in row.layers.values():
                lr.writes = []

    def abandon(self, index: int) -> None:
        """Row ``index`` ends without output: free its new blocks, put taken ones back. Its handle is
        as it was."""
        row = self.rows[index]
        for lr in row.layers.values():
            fresh = [blk for blk in lr.blocks if blk is not None and blk.block_id in lr.fresh]
            for blk, planes in zip(lr.blocks, lr.planes):
                if blk is not None and blk.block_id in lr.taken and blk.block_id not in lr.fresh:
                    mx.eval(planes)
                    self.pool.put_data(blk, planes)
            if fresh:
                self.pool.free(fresh, row.agent_id)
            lr.fresh.clear()
            lr.taken.clear()

    # ------------------------------------------------------------ helpers

    def _writable(self, row: PagedSequence, layer_id: int, lr: LayerRow) -> bool:
        """Whether the block the row's next token goes to can be written without a new block."""
        b = self.block_tokens
        if row.total % b == 0:
            return True
        blk = lr.blocks[row.total // b - lr.first]
        if blk.block_id in lr.taken or blk.block_id in lr.fresh:
            return True
        return not self._quantized and blk.block_id not in lr.published and self.pool.refcount(blk) == 1

    def _make_writable(self, row: PagedSequence, layer_id: int, lr: LayerRow, index: int) -> None:
        """Make the partly filled block at ``index`` writable: take it out of the pool, or continue it
        in a new block (copy on write) when another agent holds it or the pool is quantized."""
        blk = lr.blocks[index]
        key = blk.block_id
        if key in lr.taken:
            return
        solely = not self._quantized and key not in lr.published and self.pool.refcount(blk) == 1
        if key in lr.fresh or solely:
            taken = self.pool.take_data(blk, row.agent_id)
            if key not in lr.fresh or not self._quantized:
                lr.planes[index] = taken
            lr.taken.add(key)
            return
        (new,) = self.pool.reserve({layer_id: 1}, row.agent_id, force=True)[layer_id]
        planes = lr.planes[index]
        if self._quantized:
            lr.heads[new.block_id] = (planes, row.total % self.block_tokens)
            planes = {
                name: mx.dequantize(
                    planes[name],
                    planes[f"{name}_scales"],
                    planes[f"{name}_biases"],
                    group_size=self.pool.kv_group_size,
                    bits=self.pool.kv_bits,
                )
                for name in ("k", "v")
            }
        lr.blocks[index], lr.planes[index] = new, planes  # written as a copy: the shared arrays stay as they are
        lr.fresh.add(new.block_id)
        lr.taken.add(new.block_id)

    def _store(self, row: PagedSequence) -> None:
        """Put every block the row wrote into the pool (quantized first, in a quantized pool)."""
        for lr in row.layers.values():
            for blk, planes in zip(lr.blocks, lr.planes):
                if blk is None or blk.block_id not in lr.taken:
                    continue
                mx.eval(planes)
                self.pool.put_data(blk, self._as_stored(lr, blk, planes))
                if not self._quantized:
                    lr.taken.discard(blk.block_id)

    def _as_stored(self, lr: LayerRow, blk: KVBlock, planes: Planes) -> Planes:
        if not self._quantized:
            return planes
        stored = {}
        head, rows = lr.heads.get(blk.block_id, (None, 0))
        for name in ("k", "v"):
            q = mx.quantize(planes[name], group_size=self.pool.kv_group_size, bits=self.pool.kv_bits)
            for suffix, part in zip(("", "_scales", "_biases"), q):
                plane = name + suffix
                if head is not None and rows:  # the copied rows stay exactly as they were stored
                    part = mx.concatenate([head[plane][:, :rows], part[:, rows:]], axis=1)
                stored[plane] = part
        mx.eval(stored)
        return stored

    def _full_block_bytes(self, layer_id: int) -> int:
        return self.spec.bytes_per_block(layer_id)

    def _new_block_bytes(self, layer_id: int) -> int:
        return self.pool.bytes_per_block(layer_id) + (self._full_block_bytes(layer_id) if self._quantized else 0)
