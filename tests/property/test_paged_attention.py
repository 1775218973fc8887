"""Hypothesis: the native paged attention against its pure-MLX reference, and the reference against mlx-lm.

Random block tables (blocks shared between rows, held in any order, absent
before a window), context lengths, query counts and starts (padding queries
past a row's end included), head counts, head dims, windows, mlx-lm ring
orders, attention sinks, quantized blocks and dtypes. The native kernel
must equal the reference bit for bit; with a softcap (computed with
``std::tanh`` natively and ``mx.tanh`` in the reference) to within a few
units in the last place. The reference itself is checked against mlx-lm's
own caches in ``test_reference_matches_mlx_lm_caches_bit_for_bit``.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlx_lm.models.base import scaled_dot_product_attention
from mlx_lm.models.cache import KVCache, RotatingKVCache

from blockpool import ops, reference
from blockpool.errors import InvalidRequestError

DTYPES = [mx.float32, mx.float16, mx.bfloat16]


@st.composite
def cases(draw):
    dtype = draw(st.sampled_from(DTYPES))
    kv_heads = draw(st.sampled_from([1, 2]))
    repeats = draw(st.sampled_from([1, 2, 4]))
    quantized = draw(st.booleans())
    dim = draw(st.sampled_from([32, 64] if quantized else [8, 16, 32]))
    v_dim = dim if quantized else draw(st.sampled_from([dim, 8]))
    block_tokens = draw(st.sampled_from([4, 8, 16]))
    rows = draw(st.integers(1, 3))
    n = draw(st.integers(1, 4))
    window = draw(st.sampled_from([0, 0, 3, 7, 20]))
    lengths = [draw(st.integers(0, 50)) for _ in range(rows)]
    starts = []
    for length in lengths:
        if length == 0:
            starts.append(0)
        else:  # the row's last n tokens, or fewer (padding queries past its end)
            starts.append(draw(st.integers(max(0, length - n), length - 1)))
    rings = None
    if window and n == 1 and draw(st.booleans()):
        rings = [draw(st.sampled_from([-1, 0, max(0, s - draw(st.integers(0, 30)))])) for s in starts]
    return {
        "dtype": dtype,
        "kv_heads": kv_heads,
        "q_heads": kv_heads * repeats,
        "dim": dim,
        "v_dim": v_dim,
        "block_tokens": block_tokens,
        "n": n,
        "window": window,
        "lengths": lengths,
        "starts": starts,
        "rings": rings,
        "sinks": draw(st.booleans()),
        "softcap": draw(st.sampled_from([0.0, 0.0, 5.0])),
        "quantized": quantized,
        "bits": draw(st.sampled_from([4, 8])),
        "seed": draw(st.integers(0, 2**16)),
        "shuffle": draw(st.randoms(use_true_random=False)),
    }


def build(case):
    """Blocks, tables and queries for a case: each row's blocks drawn from one shared list."""
    dtype, h, bt = case["dtype"], case["kv_heads"], case["block_tokens"]
    key = mx.random.key(case["seed"])
    k1, k2, k3, k4 = mx.random.split(key, 4)
    needed = [-(-length // bt) for length in case["lengths"]]
    total = max(1, sum(needed))
    keys = mx.random.normal((total, h, bt, case["dim"]), key=k1).astype(dtype)
    values = mx.random.normal((total, h, bt, case["v_dim"]), key=k2).astype(dtype)
    order = list(range(total))
    case["shuffle"].shuffle(order)
    tables, next_block = [], 0
    for row, count in enumerate(needed):
        table = [order[next_block + j] for j in range(count)]
        next_block += count
        if case["window"]:  # blocks wholly before every query's window are not held
            lo = max(0, case["starts"][row] - case["window"] + 1)
            table = [-1 if (j + 1) * bt <= lo else b for j, b in enumerate(table)]
        tables.append(table)
    if len(tables) > 1 and needed[0] and needed[1] and not case["window"]:
        tables[1][0] = tables[0][0]  # a shared prefix block
    queries = mx.random.normal((len(needed), case["q_heads"], case["n"], case["dim"]), key=k3).astype(dtype)
    if case["n"] > 1:
        queries = mx.swapaxes(mx.contiguous(mx.swapaxes(queries, 1, 2)), 1, 2)  # the same values, strided as a model's
    kwargs = {"scale": case["dim"] ** -0.5, "window": case["window"], "softcap": case["softcap"]}
    if case["sinks"]:
        kwargs["sinks"] = mx.random.normal((case["q_heads"],), key=k4).astype(dtype)
    if case["rings"] is not None:
        kwargs["ring_bases"] = case["rings"]
    blocks = {"key_blocks": [keys[i] for i in range(total)], "value_blocks": [values[i] for i in range(total)]}
    if case["quantized"]:
        # The first half of the blocks quantized (as a pool's sealed blocks), the rest full (open tails).
        half = total // 2
        planes = [[mx.quantize(x[i], group_size=32, bits=case["bits"]) for i in range(half)] for x in (keys, values)]
        remap = {i: (i - half if i >= half else (total - half) + i) for i in range(total)}
        tables = [[remap[b] if b >= 0 else -1 for b in t] for t in tables]
        blocks = {
            "key_blocks": [keys[i] for i in range(half, total)],
            "value_blocks": [values[i] for i in range(half, total)],
            "quantized_keys": planes[0],
            "quantized_values": planes[1],
        }
        kwargs.update(group_size=32, bits=case["bits"])
        if not blocks["key_blocks"]:  # every block quantized
            blocks["key_blocks"], blocks["value_blocks"] = [], []
    return queries, blocks, tables, kwargs


@settings(max_examples=150, deadline=None)
@given(case=cases())
def test_native_paged_attention_equals_the_reference(case):
    queries, blocks, tables, kwargs = build(case)
    lengths, starts = case["lengths"], case["starts"]
    got = ops.paged_attention(
        queries, blocks["key_blocks"], blocks["value_blocks"], tables, lengths, starts, stream=mx.cpu,
        quantized_keys=blocks.get("quantized_keys"), quantized_values=blocks.get("quantized_values"), **kwargs,
    )  # fmt: skip
    want = reference.paged_attention(
        queries, blocks["key_blocks"], blocks["value_blocks"], tables, lengths, starts,
        kwargs["scale"], kwargs["window"], kwargs["softcap"], kwargs.get("sinks"), kwargs.get("ring_bases"),
        blocks.get("quantized_keys", ()), blocks.get("quantized_values", ()), 32, kwargs.get("bits", 0),
    )  # fmt: skip
    assert got.shape == want.shape == (len(lengths), case["q_heads"], case["n"], case["v_dim"])
    assert got.dtype == want.dtype == case["dtype"]
    if case["softcap"]:
        tolerance = {mx.float32: 1e-5, mx.float16: 2e-2, mx.bfloat16: 1e-1}[case["dtype"]]
        assert mx.allclose(got.astype(mx.float32), want.astype(mx.float32), atol=tolerance, rtol=tolerance).item()
    else:
        difference = np.abs(np.array(got.astype(mx.float32) - want.astype(mx.float32))).max()
        assert mx.array_equal(got, want).item(), difference


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).split(".")[-1])
@pytest.mark.parametrize("prompt", [5, 40, 100], ids=lambda n: f"prefill-{n}")
def test_reference_matches_mlx_lm_caches_bit_for_bit(dtype, prompt):
    """The oracle is mlx-lm itself: after a prefill, each decode step's attention over a
    ``KVCache`` and over a ``RotatingKVCache`` ring equals the native kernel over the same tokens in
    blocks, bit for bit (the ring's order through ``ring_bases``)."""
    window, bt, heads, dim, steps = 32, 16, 2, 16, 50
    key = mx.random.key(prompt)
    all_k = mx.random.normal((1, heads, prompt + steps, dim), key=key).astype(dtype)
    all_v = mx.random.normal((1, heads, prompt + steps, dim), key=mx.random.split(key)[0]).astype(dtype)
    full, ring = KVCache(), RotatingKVCache(max_size=window)
    for cache in (full, ring):
        cache.update_and_fetch(all_k[:, :, :prompt], all_v[:, :, :prompt])
    blocks_k = [all_k[0, :, j * bt : (j + 1) * bt] for j in range(-(-(prompt + steps) // bt))]
    blocks_v = [all_v[0, :, j * bt : (j + 1) * bt] for j in range(-(-(prompt + steps) // bt))]
    pad = lambda b: mx.contiguous(mx.pad(b, [(0, 0), (0, bt - b.shape[1]), (0, 0)]))  # noqa: E731
    blocks_k, blocks_v = [pad(b) for b in blocks_k], [pad(b) for b in blocks_v]
    base = prompt if prompt >= window else 0
    for t in range(prompt, prompt + steps):
        q = mx.random.normal((1, 4, 1, dim), key=mx.random.key(t)).astype(dtype)
        table = [list(range(t // bt + 1))]
        for cache, kwargs in ((full, {}), (ring, {"window": window, "ring_bases": [base]})):
            k, v = cache.update_and_fetch(all_k[:, :, t : t + 1], all_v[:, :, t : t + 1])
            want = scaled_dot_product_attention(q, k, v, cache=cache, scale=0.25, mask=None)
            got = ops.paged_attention(q, blocks_k, blocks_v, table, [t + 1], scale=0.25, stream=mx.cpu, **kwargs)
            assert mx.array_equal(got, want).item(), (t, type(cache).__name__)


def test_time_order_differs_from_a_wrapped_ring():
    """Why ring_bases exists: summed in time order, a wrapped ring's attention is not mlx-lm's bit for bit."""
    window, dim = 32, 16
    key = mx.random.key(3)
    all_k = mx.random.normal((1, 2, 160, dim), key=key)
    all_v = mx.random.normal((1, 2, 160, dim), key=mx.random.split(key)[0])
    ring = RotatingKVCache(max_size=window)
    ring.update_and_fetch(all_k[:, :, :100], all_v[:, :, :100])
    blocks_k = [mx.contiguous(all_k[0, :, j * 16 : (j + 1) * 16]) for j in range(10)]
    blocks_v = [mx.contiguous(all_v[0, :, j * 16 : (j + 1) * 16]) for j in range(10)]
    differs = 0
    for t in range(100, 160):
        q = mx.random.normal((1, 4, 1, dim), key=mx.random.key(t))
        k, v = ring.update_and_fetch(all_k[:, :, t : t + 1], all_v[:, :, t : t + 1])
        want = scaled_dot_product_attention(q, k, v, cache=ring, scale=0.25, mask=None)
        table = [list(range(t // 16 + 1))]
        time_order = ops.paged_attention(q, blocks_k, blocks_v, table, [t + 1], scale=0.25, window=window)
        differs += not mx.array_equal(time_order, want).item()
    assert differs > 0


@pytest.mark.parametrize(
    "change, message",
    [
        ({"tables": [[0, 7]]}, "not a block index"),
        ({"tables": [[-1, 1]]}, "has no block for positions"),
        ({"lengths": [9]}, "needs 0 <= start <= length"),
        ({"starts": [8]}, "needs 0 <= start <= length"),
        ({"queries": mx.zeros((1, 3, 1, 8))}, "cannot share"),
        ({"queries": mx.zeros((1, 4, 1, 4))}, "must be"),
        ({"queries": mx.zeros((1, 4, 1, 8), dtype=mx.int32)}, "float32, float16 or bfloat16"),
        ({"sinks": mx.zeros((3,))}, "sinks must be"),
        ({"values": [mx.zeros((2, 4, 8))]}, "must pair up"),
        ({"tables": [[0, 1], [0]]}, "rows"),
    ],
)
def test_bad_input_is_refused_before_a_graph_is_built(change, message):
    blocks = [mx.zeros((2, 4, 8)), mx.ones((2, 4, 8))]
    args = {
        "queries": mx.zeros((1, 4, 1, 8)),
        "keys": blocks,
        "values": blocks,
        "tables": [[0, 1]],
        "lengths": [6],
        "starts": [5],
        "sinks": None,
    }
    args.update(change)
    with pytest.raises(InvalidRequestError, match=message):
        ops.paged_attention(
            args["queries"], args["keys"], args["values"], args["tables"], args["lengths"], args["starts"],
            scale=1.0, sinks=args["sinks"],
        )  # fmt: skip


def test_write_tokens_reuses_an_unshared_block_and_copies_a_shared_one():
    from blockpool import _ext

    source = mx.random.normal((2, 2, 3, 8))
    block = mx.zeros((2, 4, 8))
    mx.eval(source, block)
    before = _ext.copied_writes()
    for t in range(3):  # the only reference is the write itself: in place
        (block,) = ops.write_tokens([source], [(0, block, 1, t, 1, t)], block_tokens=4)
        mx.eval(block)
    assert _ext.copied_writes() == before
    assert mx.array_equal(block[:, :3], source[1]).item() and not block[:, 3].any().item()
    kept = block
    (written,) = ops.write_tokens([source], [(0, block, 0, 0, 1, 3)], block_tokens=4)
    mx.eval(written)  # `kept` still references the old block: it is copied, and stays as it was
    assert _ext.copied_writes() == before + 1
    assert not kept[:, 3].any().item() and mx.array_equal(written[:, 3], source[0, :, 0]).item()


@pytest.mark.parametrize(
    "write, message",
    [
        ((1, None, 0, 0, 1, 0), "names source 1"),
        ((0, None, 2, 0, 1, 0), "do not fit"),
        ((0, None, 0, 2, 2, 0), "do not fit"),
        ((0, None, 0, 0, 1, 4), "do not fit"),
        ((0, mx.zeros((2, 4, 4)), 0, 0, 1, 0), "destination must be"),
    ],
)
def test_write_tokens_refuses_bad_writes(write, message):
    with pytest.raises(InvalidRequestError, match=message):
        ops.write_tokens([mx.zeros((2, 2, 3, 8))], [write], block_tokens=4)
