"""Shared pieces of the benchmarks: the EXP-006 geometry and timing stats."""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generation_stream

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
import tiny_models  # noqa: E402  (the tests' tiny model builder)

# EXP-006: Gemma-3-12B-like KV geometry, float16, 256-token blocks.
HEADS, BLOCK_TOKENS, HEAD_DIM, DTYPE = 8, 256, 128, mx.float16
ITEMSIZE = 2


def idle() -> None:
    """Wait for every stream the contenders use: mlx-lm (and the engine) generate on their own stream,
    which ``mx.synchronize()`` alone does not wait for, and an abandoned generator leaves a step running there."""
    mx.synchronize()
    mx.synchronize(generation_stream)


def record(benchmark, nbytes: int) -> None:
    """Add bytes moved, throughput and tail percentiles to the saved JSON."""
    data = np.array(benchmark.stats.stats.data)
    benchmark.extra_info.update(
        bytes=nbytes,
        p50_ms=float(np.percentile(data, 50) * 1e3),
        p95_ms=float(np.percentile(data, 95) * 1e3),
        p99_ms=float(np.percentile(data, 99) * 1e3),
        gb_per_s=float(nbytes / np.median(data) / 1e9),
    )


def record_seconds(benchmark, tokens: int | None = None) -> None:
    """Tail percentiles (and tokens/s when ``tokens`` is given) for timings that are not copies."""
    data = np.array(benchmark.stats.stats.data)
    benchmark.extra_info.update(
        p50_ms=float(np.percentile(data, 50) * 1e3),
        p95_ms=float(np.percentile(data, 95) * 1e3),
        p99_ms=float(np.percentile(data, 99) * 1e3),
    )
    if tokens is not None:
        benchmark.extra_info.update(tokens=tokens, tokens_per_s=float(tokens / np.median(data)))


@pytest.fixture(scope="session")
def llama(tmp_path_factory):
    """The tests' tiny llama (2 layers, hidden 64), written to disk and loaded with mlx_lm.load."""
    from mlx_lm import load

    return load(str(tiny_models.write_model_dir(tmp_path_factory.mktemp("llama"), "llama")))


def tokens(n: int, seed: int) -> list[int]:
    """``n`` random token ids, none of them special."""
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()
