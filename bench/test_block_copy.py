"""EXP-006: reconstruction (gather) and extraction (scatter) of block caches.

Each case is (blocks per layer, layers), with K and V planes of the EXP-006
geometry. The memcpy ceiling (one numpy.copyto of the same bytes) and the
naive method (per-layer mx.concatenate of block slices) run in the same
session, so bench/gate.py can gate on ratios rather than on absolute times.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from conftest import BLOCK_TOKENS, DTYPE, HEAD_DIM, HEADS, ITEMSIZE, record

from blockpool import ops

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


def test_gather_naive_concat(benchmark, workload):
    def naive():
        out = [mx.concatenate([pool[i] for i in ids], axis=1)[None] for pool, ids in zip(workload.pools(), workload.ids)]
        mx.eval(out)

    saved = workload.rounds
    workload.rounds = min(saved, 5)
    try:
        _run(benchmark, workload, naive, workload.nbytes)
    finally:
        workload.rounds = saved
