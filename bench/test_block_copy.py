"""EXP-006: reconstruction (gather) and extraction (scatter) of block caches.

Each case is (blocks per layer, layers), with K and V planes of the EXP-006
geometry. The memcpy ceiling (one numpy.copyto of the same bytes) and the
naive method (per-layer mx.concatenate of block slices) run in the same
session, so bench/gate.py can gate on ratios rather than on absolute times.
The per-block cases do the same for the elastic pool's layout, one array per
block: concat_blocks against the same ceiling and per-layer mx.concatenate.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from blockpool import ops
from conftest import BLOCK_TOKENS, DTYPE, HEAD_DIM, HEADS, ITEMSIZE, record

CASES = [(1, 12), (4, 24), (8, 30), (32, 48)]


class Workload:
    """K and V pools holding `layers` x `blocks` blocks, and each layer's ids."""

    def __init__(self, blocks: int, layers: int):
        self.blocks, self.layers = blocks, layers
        shape = (blocks * layers, HEADS, BLOCK_TOKENS, HEAD_DIM)
        self.k = mx.random.normal(shape, key=mx.random.key(0)).astype(DTYPE)
        self.v = mx.random.normal(shape, key=mx.random.key(1)).astype(DTYPE)
        mx.eval(self.k, self.v)
        ids = [list(range(layer * blocks, (layer + 1) * blocks)) for layer in range(layers)]
        self.ids = ids + ids
        self.nbytes = 2 * self.k.nbytes  # bytes one full reconstruction produces
        self.rounds = 15 if self.nbytes > 2**29 else 50
        ops.ensure_cache_limit(2 * self.nbytes)

    def pools(self) -> list[mx.array]:
        return [self.k] * self.layers + [self.v] * self.layers

    def gather(self) -> list[mx.array]:
        out = ops.gather_blocks(self.pools(), self.ids)
        mx.eval(out)
        return out

    def scatter(self, sources: list[mx.array]) -> None:
        # Rebind the pools before evaluating so the scatter writes in place.
        out = ops.scatter_blocks(self.pools(), self.ids, sources)
        self.k, self.v = out[0], out[self.layers]
        del out
        mx.eval(self.k, self.v)


@pytest.fixture(scope="module", params=CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def workload(request):
    w = Workload(*request.param)
    yield w
    del w
    mx.clear_cache()


def _run(benchmark, workload, fn, nbytes):
    benchmark.group = f"{workload.blocks} blocks x {workload.layers} layers"
    benchmark.pedantic(fn, rounds=workload.rounds, warmup_rounds=3, iterations=1)
    record(benchmark, nbytes)


def test_gather_native(benchmark, workload):
    _run(benchmark, workload, lambda: workload.gather(), workload.nbytes)


def test_scatter_native(benchmark, workload):
    sources = workload.gather()
    _run(benchmark, workload, lambda: workload.scatter(sources), workload.nbytes)


def test_round_trip_native(benchmark, workload):
    _run(benchmark, workload, lambda: workload.scatter(workload.gather()), 2 * workload.nbytes)


def test_gather_memcpy_ceiling(benchmark, workload):
    # One numpy.copyto of the same number of bytes: what the memory system allows.
    src = np.ones(workload.nbytes // ITEMSIZE, dtype=np.float16)
    dst = np.empty_like(src)
    _run(benchmark, workload, lambda: np.copyto(dst, src), workload.nbytes)


def test_gather_memcpy_ceiling_two_threads(benchmark, workload):
    """Two threads, each one numpy.copyto of half the bytes (numpy lets go of the GIL while it
    copies): what two cores' memory bandwidth allows, the ceiling for the native gather's two threads."""
    from concurrent.futures import ThreadPoolExecutor

    src = np.ones(workload.nbytes // ITEMSIZE, dtype=np.float16)
    dst = np.empty_like(src)
    half = len(src) // 2
    parts = [(dst[:half], src[:half]), (dst[half:], src[half:])]
    with ThreadPoolExecutor(max_workers=2) as pool:

        def copy():
            for future in [pool.submit(np.copyto, d, s) for d, s in parts]:
                future.result()

        _run(benchmark, workload, copy, workload.nbytes)


def test_gather_naive_concat(benchmark, workload):
    def naive():
        out = [
            mx.concatenate([pool[i] for i in ids], axis=1)[None] for pool, ids in zip(workload.pools(), workload.ids)
        ]
        mx.eval(out)

    saved = workload.rounds
    workload.rounds = min(saved, 5)
    try:
        _run(benchmark, workload, naive, workload.nbytes)
    finally:
        workload.rounds = saved


# ------------------------------------------------ per-block arrays (elastic pool)
# The elastic pool keeps each block as its own array [H, B, D] per plane, so a
# reconstruction joins many separate arrays (concat_blocks) and a write-back
# cuts new ones (split_blocks). Same geometry and byte counts as above.

BLOCK_CASES = [(4, 24), (32, 48)]


class BlockArrays:
    """K and V as one separate array per block: layers x blocks of each."""

    def __init__(self, blocks: int, layers: int):
        self.blocks, self.layers = blocks, layers
        # Each block is generated on its own, so each has its own buffer.
        self.entries = [
            [mx.random.normal((HEADS, BLOCK_TOKENS, HEAD_DIM), key=mx.random.key(layer * blocks + b)).astype(DTYPE)
             for b in range(blocks)]
            for layer in range(2 * layers)  # K entries, then V entries
        ]  # fmt: skip
        mx.eval(self.entries)
        self.nbytes = sum(b.nbytes for entry in self.entries for b in entry)
        self.rounds = 15 if self.nbytes > 2**29 else 50
        ops.ensure_cache_limit(2 * self.nbytes)

    def concat(self) -> list[mx.array]:
        out = ops.concat_blocks(self.entries)
        mx.eval(out)
        return out


@pytest.fixture(scope="module", params=BLOCK_CASES, ids=lambda c: f"{c[0]}x{c[1]}")
def block_arrays(request):
    w = BlockArrays(*request.param)
    yield w
    del w
    mx.clear_cache()


def _run_blocks(benchmark, w, fn, nbytes, rounds=None):
    benchmark.group = f"per-block arrays, {w.blocks} blocks x {w.layers} layers"
    benchmark.pedantic(fn, rounds=rounds or w.rounds, warmup_rounds=3, iterations=1)
    record(benchmark, nbytes)


def test_concat_native(benchmark, block_arrays):
    _run_blocks(benchmark, block_arrays, block_arrays.concat, block_arrays.nbytes)


def test_concat_memcpy_ceiling(benchmark, block_arrays):
    src = np.ones(block_arrays.nbytes // ITEMSIZE, dtype=np.float16)
    dst = np.empty_like(src)
    _run_blocks(benchmark, block_arrays, lambda: np.copyto(dst, src), block_arrays.nbytes)


def test_concat_copyto_per_block(benchmark, block_arrays):
    """numpy.copyto of each separate block into its place: the ceiling for this layout.

    One big copy (above) reads from one allocation backed by huge pages;
    blocks are separate allocations of 512 KiB each, as in the elastic pool.
    Reported, not gated.
    """
    blocks = [
        [np.ones((HEADS, BLOCK_TOKENS, HEAD_DIM), dtype=np.float16) for _ in entry] for entry in block_arrays.entries
    ]
    outs = [np.empty((HEADS, len(entry) * BLOCK_TOKENS, HEAD_DIM), dtype=np.float16) for entry in blocks]

    def copy():
        for entry, out in zip(blocks, outs):
            for j, block in enumerate(entry):
                np.copyto(out[:, j * BLOCK_TOKENS : (j + 1) * BLOCK_TOKENS], block)

    _run_blocks(benchmark, block_arrays, copy, block_arrays.nbytes)


def test_concat_naive_concatenate(benchmark, block_arrays):
    def naive():
        out = [mx.concatenate(entry, axis=1)[None] for entry in block_arrays.entries]
        mx.eval(out)

    _run_blocks(benchmark, block_arrays, naive, block_arrays.nbytes, rounds=min(block_arrays.rounds, 5))


def test_split_native(benchmark, block_arrays):
    """Write-back: every layer's cache cut into new block arrays (reported, not gated)."""
    sources = block_arrays.concat()
    offsets, heads = [0] * len(sources), [None] * len(sources)

    def split():
        mx.eval(ops.split_blocks(sources, offsets, heads, block_tokens=BLOCK_TOKENS))

    _run_blocks(benchmark, block_arrays, split, block_arrays.nbytes)
