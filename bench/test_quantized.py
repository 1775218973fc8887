"""Reconstruction of 32 blocks x 48 layers from 16-, 8- and 4-bit blocks; agents per GiB (computed).

16-bit is the plain native gather; 8 and 4 bits are the fused native
gather-and-dequantize, which reads the packed data, scales and biases and
writes float16. Every setting produces the same 1.5 GiB of float16 K and V;
the memcpy ceiling is one numpy.copyto of those output bytes.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest

from blockpool import Geometry, LayerSpec, ModelCacheSpec, ops
from conftest import BLOCK_TOKENS, DTYPE, HEAD_DIM, HEADS, record

BLOCKS, LAYERS, GROUP = 32, 48, 64
GROUP_NAME = "reconstruct 32 blocks x 48 layers, by bits"


@pytest.fixture(scope="module")
def planes():
    shape = (BLOCKS * LAYERS, HEADS, BLOCK_TOKENS, HEAD_DIM)
    k = mx.random.normal(shape, key=mx.random.key(0)).astype(DTYPE)
    v = mx.random.normal(shape, key=mx.random.key(1)).astype(DTYPE)
    mx.eval(k, v)
    stored = {16: ((k,), (v,))}
    for bits in (8, 4):
        stored[bits] = (mx.quantize(k, group_size=GROUP, bits=bits), mx.quantize(v, group_size=GROUP, bits=bits))
        mx.eval(stored[bits])
    ops.ensure_cache_limit(2 * 2 * k.nbytes)
    ids = [list(range(layer * BLOCKS, (layer + 1) * BLOCKS)) for layer in range(LAYERS)]
    return stored, ids + ids, 2 * k.nbytes


@pytest.mark.parametrize("bits", [16, 8, 4])
def test_reconstruct(benchmark, planes, bits):
    stored, ids, out_bytes = planes
    k, v = stored[bits]
    read_bytes = sum(p.nbytes for p in k + v)

    def reconstruct():
        if bits == 16:
            out = ops.gather_blocks([k[0]] * LAYERS + [v[0]] * LAYERS, ids)
        else:
            pick = lambda i: [k[i]] * LAYERS + [v[i]] * LAYERS  # noqa: E731
            out = ops.gather_dequantize_blocks(pick(0), pick(1), pick(2), ids, group_size=GROUP, bits=bits)
        mx.eval(out)

    benchmark.group = GROUP_NAME
    benchmark.pedantic(reconstruct, rounds=10, warmup_rounds=2)
    record(benchmark, out_bytes)
    benchmark.extra_info["bytes_read"] = read_bytes


def test_reconstruct_memcpy_ceiling(benchmark, planes):
    _, _, out_bytes = planes
    src = np.ones(out_bytes // 2, dtype=np.float16)
    dst = np.empty_like(src)
    benchmark.group = GROUP_NAME
    benchmark.pedantic(lambda: np.copyto(dst, src), rounds=10, warmup_rounds=2)
    record(benchmark, out_bytes)


# Published configurations (Hugging Face config.json), not models run here.
GEOMETRIES = {
    "Gemma-3-12B-like": ModelCacheSpec(
        tuple(LayerSpec(Geometry(8, 256, 256, "bfloat16"), None if i % 6 == 5 else 1024) for i in range(48))
    ),
    "Llama-3-8B-like": ModelCacheSpec(tuple(LayerSpec(Geometry(8, 128, 128, "bfloat16")) for _ in range(32))),
}


def test_agents_per_gib_table():
    """Agents of 4,096 tokens whose blocks fit in 1 GiB, by storage setting.

    COMPUTED from the block layout (ModelCacheSpec.bytes_for_tokens), not
    measured: no model runs and nothing is timed, so this is a plain test
    that prints the table, not a benchmark (it used to record zero times).
    """
    rows = []
    for model in sorted(GEOMETRIES):
        spec = GEOMETRIES[model]
        fits = {bits: (1 << 30) // spec.bytes_for_tokens(4096, bits) for bits in (None, 8, 4)}
        rows.append(f"| {model} | {fits[None]} | {fits[8]} | {fits[4]} |")
        # The layout's own arithmetic: packed data plus one scale and one bias per group.
        assert fits[None] < fits[8] < fits[4]
    print("\nAgents of 4,096 tokens per GiB of blocks (computed from the layout, not measured)")
    print("| model | 16-bit | 8-bit | 4-bit |\n|---|---|---|---|\n" + "\n".join(rows))
