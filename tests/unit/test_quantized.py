"""Quantized blocks: the fused native gather-and-dequantize, quantized pools and files."""

from __future__ import annotations

import mlx.core as mx
import pytest

from blockpool import (
    AgentBlocks,
    BlockPool,
    BlockWrite,
    Geometry,
    InvalidRequestError,
    LayerSpec,
    ModelCacheSpec,
    ops,
    reference,
)
from blockpool.persistence import export_agent, import_agent, load_agent_file, save_agent_file

FLOATS = [mx.float16, mx.bfloat16, mx.float32]
SETTINGS = [(bits, gs) for bits in (8, 4, 2) for gs in (32, 64, 128)]


def quantized_pool(num_blocks, heads, block, dim, dtype, bits, group_size, seed=0):
    x = (mx.random.normal((num_blocks, heads, block, dim), key=mx.random.key(seed)) * 3).astype(dtype)
    return mx.quantize(x, group_size=group_size, bits=bits)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("bits, group_size", SETTINGS)
def test_fused_op_equals_reference_exactly(dtype, bits, group_size):
    q, s, b = quantized_pool(9, 2, 8, 128, dtype, bits, group_size)
    q2, s2, b2 = quantized_pool(5, 2, 8, 128, dtype, bits, group_size, seed=1)  # a second pool (V)
    ids = [[4, 0, 8], [2], [], [1, 1]]
    args = ([q, q2, q, q2], [s, s2, s, s2], [b, b2, b, b2], ids)
    out = ops.gather_dequantize_blocks(*args, group_size=group_size, bits=bits)
    expected = reference.gather_dequantize_blocks(*args, group_size=group_size, bits=bits)
    for o, e in zip(out, expected):
        assert o.dtype == dtype and o.shape == e.shape and mx.array_equal(o, e).item()
    assert out[0].shape == (1, 2, 24, 128) and out[2].shape == (1, 2, 0, 128)


def test_fused_op_inside_compile_and_with_lazy_ids():
    # Traced ids (an argument of the compiled function) run on CPU streams only.
    with mx.stream(mx.cpu):
        q, s, b = quantized_pool(6, 1, 4, 64, mx.float16, 8, 64)
        f = mx.compile(lambda q, s, b, i: ops.gather_dequantize_blocks([q], [s], [b], [i], group_size=64, bits=8)[0])
        got = f(q, s, b, mx.arange(1, 4))
        expected = reference.gather_dequantize_blocks([q], [s], [b], [[1, 2, 3]], group_size=64, bits=8)[0]
        assert mx.array_equal(got, expected).item()


def test_only_required_arguments():
    q, s, b = quantized_pool(3, 1, 4, 64, mx.float16, 4, 64)  # the defaults: bits=4, group_size=64
    out = ops.gather_dequantize_blocks([q], [s], [b], [[2, 0]])
    assert mx.array_equal(out[0], reference.gather_dequantize_blocks([q], [s], [b], [[2, 0]])[0]).item()
    joined = ops.concat_dequantize_blocks([[q[2], q[0]]], [[s[2], s[0]]], [[b[2], b[0]]])
    assert mx.array_equal(joined[0], out[0]).item()


# Issue 10: every entry used the first entry's dtype, and a 4-byte dtype
# after a 2-byte one wrote past the output buffer.
@pytest.mark.parametrize(
    "order", [(mx.float16, mx.float32, mx.bfloat16), (mx.float32, mx.bfloat16, mx.float16)], ids=str
)
def test_each_entry_keeps_its_own_scales_dtype(order):
    pools = [quantized_pool(4, 2, 8, 64, dtype, 4, 32, seed=i) for i, dtype in enumerate(order)]
    packed, scales, biases = (list(p) for p in zip(*pools))
    ids = [[3, 1], [0, 2, 3], [1]]
    out = ops.gather_dequantize_blocks(packed, scales, biases, ids, group_size=32, bits=4)
    assert [o.dtype for o in out] == list(order)
    for got, want in zip(out, reference.gather_dequantize_blocks(packed, scales, biases, ids, group_size=32, bits=4)):
        assert got.dtype == want.dtype and mx.array_equal(got, want).item()
    blocks = [[[plane[j] for j in entry] for plane, entry in zip(planes, ids)] for planes in (packed, scales, biases)]
    joined = ops.concat_dequantize_blocks(*blocks, group_size=32, bits=4)
    for got, want in zip(joined, out):
        assert got.dtype == want.dtype and mx.array_equal(got, want).item()


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("bits, group_size", SETTINGS)
def test_concat_dequantize_equals_reference_exactly(dtype, bits, group_size):
    q, s, b = quantized_pool(5, 2, 8, 128, dtype, bits, group_size)
    entries = [[4, 0, 4], [2]]
    planes = [[[plane[j] for j in entry] for entry in entries] for plane in (q, s, b)]
    out = ops.concat_dequantize_blocks(*planes, group_size=group_size, bits=bits)
    expected = reference.concat_dequantize_blocks(*planes, group_size=group_size, bits=bits)
    for o, e in zip(out, expected):
        assert o.dtype == dtype and o.shape == e.shape and mx.array_equal(o, e).item()
    assert out[0].shape == (1, 2, 24, 128)


def test_concat_dequantize_of_strided_planes():
    q, s, b = quantized_pool(4, 2, 8, 64, mx.bfloat16, 8, 32)
    # Blocks that are views: head-transposed packed words, sliced scales.
    qt = mx.swapaxes(mx.swapaxes(q, 1, 2).reshape(4, 8, 2, 16), 1, 2)
    planes = ([[qt[1], qt[3]]], [[s[1], s[3]]], [[b[1], b[3]]])
    out = ops.concat_dequantize_blocks(*planes, group_size=32, bits=8)[0]
    assert mx.array_equal(out, reference.concat_dequantize_blocks(*planes, group_size=32, bits=8)[0]).item()


BAD = {
    "bits 3": (
        lambda q, s, b: ops.gather_dequantize_blocks([q], [s], [b], [[0]], group_size=64, bits=3),
        "bits must be 2, 4 or 8, got 3",
    ),
    "group 16": (
        lambda q, s, b: ops.gather_dequantize_blocks([q], [s], [b], [[0]], group_size=16, bits=4),
        "group_size must be 32, 64 or 128, got 16",
    ),
    "wrong group": (
        lambda q, s, b: ops.gather_dequantize_blocks([q], [s], [b], [[0]], group_size=32, bits=4),
        r"scales and biases must be \[6, 1, 4, 2\]",
    ),
    "float packed": (
        lambda q, s, b: ops.gather_dequantize_blocks([s], [s], [b], [[0]], group_size=64, bits=4),
        "packed data must be uint32, got float16",
    ),
    "id out of range": (
        lambda q, s, b: ops.gather_dequantize_blocks([q], [s], [b], [[6]], group_size=64, bits=4),
        "block id 6 .* out of range for a pool of 6 blocks",
    ),
    "dtype mismatch": (
        lambda q, s, b: ops.gather_dequantize_blocks([q], [s], [b.astype(mx.float32)], [[0]], group_size=64, bits=4),
        "must share one dtype",
    ),
    "float64 scales": (
        lambda q, s, b: ops.gather_dequantize_blocks(
            [q], [s.astype(mx.float64)], [b.astype(mx.float64)], [[0]], group_size=64, bits=4
        ),
        "must share one dtype: float16, bfloat16 or float32",
    ),
    "lengths": (
        lambda q, s, b: ops.gather_dequantize_blocks([q, q], [s], [b], [[0], [1]], group_size=64, bits=4),
        "got 2 packed pools but 1 scales pools",
    ),
    "mixed triples": (
        lambda q, s, b: ops.gather_dequantize_blocks([q, q], [s, s * 2], [b, b], [[0], [1]], group_size=64, bits=4),
        "the same packed pool is paired with other scales or biases",
    ),
    "concat empty entry": (lambda q, s, b: ops.concat_dequantize_blocks([[]], [[]], [[]]), r"packed\[0\] is empty"),
    "concat block counts": (
        lambda q, s, b: ops.concat_dequantize_blocks([[q[0], q[1]]], [[s[0]]], [[b[0], b[1]]]),
        "2 packed blocks, 1 scales and 2 biases",
    ),
    "concat entry counts": (
        lambda q, s, b: ops.concat_dequantize_blocks([[q[0]]], [], [[b[0]]]),
        "1 packed entries, 0 scales entries",
    ),
    "concat scales shape": (
        lambda q, s, b: ops.concat_dequantize_blocks([[q[0]]], [[s[0][:, :2]]], [[b[0]]]),
        r"scales\[0\]\[0\] and its biases must have shape \(1, 4, 1\)",
    ),
    "concat scales dtypes differ": (
        lambda q, s, b: ops.concat_dequantize_blocks(
            [[q[0], q[1]]], [[s[0], s[1].astype(mx.float32)]], [[b[0], b[1].astype(mx.float32)]]
        ),
        "must share one dtype",
    ),
    "concat packed not uint32": (
        lambda q, s, b: ops.concat_dequantize_blocks([[s[0]]], [[s[0]]], [[b[0]]]),
        r"packed\[0\]\[0\] must be uint32",
    ),
    "concat bits 3": (
        lambda q, s, b: ops.concat_dequantize_blocks([[q[0]]], [[s[0]]], [[b[0]]], bits=3),
        "bits must be 2, 4 or 8",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD))
def test_fused_ops_reject_bad_input(name):
    q, s, b = quantized_pool(6, 1, 4, 64, mx.float16, 4, 64)
    call, message = BAD[name]
    with pytest.raises(InvalidRequestError, match=message):
        call(q, s, b)


# ------------------------------------------------------------------ pools

GEOMETRY = Geometry(2, 128, 64, "bfloat16")  # K and V with different head dims


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group_size", [32, 64])
def test_quantized_pool_round_trip_with_partial_blocks(bits, group_size):
    spec = ModelCacheSpec((LayerSpec(GEOMETRY), LayerSpec(GEOMETRY)))
    pool = BlockPool(spec, num_blocks=8, kv_bits=bits, kv_group_size=group_size)
    assert sorted(pool.plane_names) == ["k", "k_biases", "k_scales", "v", "v_biases", "v_scales"]
    blocks = pool.reserve({0: 2, 1: 1}, "a")
    k = mx.random.normal((1, 2, 300, 128)).astype(mx.bfloat16)
    v = mx.random.normal((1, 2, 300, 64)).astype(mx.bfloat16)
    pool.write([BlockWrite(0, blocks[0], k, v), BlockWrite(1, blocks[1], k[..., 280:, :], v[..., 280:, :], offset=20)])
    out = pool.read(blocks)

    def expected(x):
        return mx.dequantize(*mx.quantize(x, group_size=group_size, bits=bits), group_size=group_size, bits=bits)

    assert mx.array_equal(out[0][0][..., :300, :], expected(k)).item()
    assert mx.array_equal(out[0][1][..., :300, :], expected(v)).item()
    assert mx.array_equal(out[1][0][..., 20:40, :], expected(k[..., 280:, :])).item()
    assert out[0][0].dtype == mx.bfloat16


def test_bytes_per_block_and_budget_per_setting():
    g = Geometry(8, 128, 128, "float16")
    assert g.bytes_per_block() == 8 * 256 * 256 * 2
    # packed data plus one scale and one bias (2 bytes each) per group of 64
    assert g.bytes_per_block(kv_bits=8, group_size=64) == 8 * 256 * (2 * 128 + 2 * 2 * 2 * 2)
    assert g.bytes_per_block(kv_bits=4, group_size=64) == 8 * 256 * (2 * 64 + 2 * 2 * 2 * 2)
    spec = ModelCacheSpec((LayerSpec(g),))
    budget = 100 * g.bytes_per_block()
    sizes = {bits: BlockPool(spec, memory_bytes=budget, kv_bits=bits).total_blocks for bits in (None, 8, 4)}
    assert sizes[None] == 100 and sizes[8] == 188 and sizes[4] == 355  # about 2x and 3.5x


def test_quantization_settings_are_checked():
    spec = ModelCacheSpec((LayerSpec(Geometry(2, 48, 48, "float16")),))
    with pytest.raises(InvalidRequestError, match="multiples of kv_group_size"):
        BlockPool(spec, num_blocks=4, kv_bits=8, kv_group_size=32)
    for bad in ({"kv_bits": 3}, {"kv_bits": 8, "kv_group_size": 16}):
        with pytest.raises(InvalidRequestError):
            BlockPool(ModelCacheSpec((LayerSpec(GEOMETRY),)), num_blocks=4, **bad)


def test_quantized_agents_are_stored_as_they_are(tmp_path):
    spec = ModelCacheSpec((LayerSpec(GEOMETRY), LayerSpec(GEOMETRY, window=64)))
    sizes = {}
    for bits in (None, 4):
        pool = BlockPool(spec, num_blocks=16, kv_bits=bits)
        blocks = pool.reserve({0: 4, 1: 1}, "a")
        k = mx.random.normal((1, 2, 1000, 128)).astype(mx.bfloat16)
        v = mx.random.normal((1, 2, 1000, 64)).astype(mx.bfloat16)
        pool.write(
            [
                BlockWrite(0, blocks[0], k, v),
                BlockWrite(1, blocks[1], k[..., 936:, :], v[..., 936:, :], offset=936 - 768),
            ]
        )
        agent = AgentBlocks("a", spec, blocks, 1000, list(range(1000)))
        path = tmp_path / f"a{bits}.safetensors"
        save_agent_file(path, export_agent(pool, agent, "fp"))
        sizes[bits] = path.stat().st_size
        loaded = load_agent_file(path, "fp", spec)
        assert loaded.kv_bits == bits
        before = pool.read(agent.blocks)
        pool.release(agent)
        back = import_agent(pool, loaded)
        after = pool.read(back.blocks)
        assert mx.array_equal(before[0][0][..., :1000, :], after[0][0][..., :1000, :]).item()
        assert mx.array_equal(
            before[1][1][..., 936 - 768 : 1000 - 768, :], after[1][1][..., 936 - 768 : 1000 - 768, :]
        ).item()
        pool.release(back)
        assert pool.available_blocks() == 16
    assert sizes[4] / sizes[None] < 0.32  # about a quarter: packed data plus scales and biases
