"""Why blockpool raises MLX's allocator cache limit for large reconstructions.

Gathers into 64 MiB outputs, once under MLX's default 32 MiB cache limit and
once with the limit raised by ops.ensure_cache_limit. Reported, not gated.
"""

from __future__ import annotations

import mlx.core as mx
import pytest

from blockpool import ops
from conftest import BLOCK_TOKENS, DTYPE, HEAD_DIM, HEADS, record

ENTRIES, BLOCKS = 8, 128  # 8 outputs of 128 blocks = 64 MiB each
DEFAULT_CACHE_LIMIT = 32 * 2**20


@pytest.mark.parametrize("limit", ["default", "ensured"])
def test_gather_64mib_outputs(benchmark, limit):
    pool = mx.random.normal((ENTRIES * BLOCKS, HEADS, BLOCK_TOKENS, HEAD_DIM)).astype(DTYPE)
    mx.eval(pool)
    ids = [list(range(e * BLOCKS, (e + 1) * BLOCKS)) for e in range(ENTRIES)]
    nbytes = pool.nbytes
    mx.clear_cache()
    previous = mx.set_cache_limit(DEFAULT_CACHE_LIMIT)
    if limit == "ensured":
        ops.ensure_cache_limit(2 * nbytes)
    try:

        def gather():
            out = ops.gather_blocks([pool] * ENTRIES, ids)
            mx.eval(out)

        benchmark.group = f"8 outputs of 64 MiB, {limit} cache limit"
        benchmark.pedantic(gather, rounds=10, warmup_rounds=2, iterations=1)
        record(benchmark, nbytes)
    finally:
        mx.set_cache_limit(previous)
        mx.clear_cache()
