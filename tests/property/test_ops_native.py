"""Property tests: every native block op equals its pure-MLX reference.

Random geometry; ids drawn as lists, tuples, numpy arrays and mx.arrays
(contiguous, strided, reversed, broadcast and transposed views; int32 and
int64); every dtype size (1, 2, 4 and 8 bytes) and several dtypes in one
call. Inputs that are referenced elsewhere must come back unchanged.
"""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockpool import ops, reference

EXAMPLES = settings(max_examples=60, deadline=None)


@pytest.fixture(scope="module", autouse=True)
def native_ops():
    """These compare the native ops with the reference: never reference against itself."""
    with pytest.MonkeyPatch.context() as patch:
        patch.delenv(ops.ENV_VAR, raising=False)
        yield


# 1, 2, 4 and 8 bytes.
DTYPES = [
    mx.uint8, mx.int8, mx.bool_,
    mx.float16, mx.bfloat16, mx.int16,
    mx.float32, mx.int32, mx.uint32,
    mx.int64, mx.uint64, mx.complex64,
]  # fmt: skip
FLOATS = [mx.float16, mx.bfloat16, mx.float32]


def make_array(shape: tuple[int, ...], dtype: mx.Dtype, seed: int) -> mx.array:
    key = mx.random.key(seed)
    if dtype == mx.bool_:
        a = mx.random.randint(0, 2, shape, key=key).astype(mx.bool_)
    elif mx.issubdtype(dtype, mx.integer):
        a = mx.random.randint(-100 if mx.issubdtype(dtype, mx.signedinteger) else 0, 100, shape, key=key).astype(dtype)
    else:
        a = mx.random.normal(shape, key=key).astype(dtype)
    mx.eval(a)
    return a


def as_numpy(a: mx.array) -> np.ndarray:
    """A comparable host copy (numpy has no bfloat16)."""
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a)


def assert_all_equal(actual: list[mx.array], expected: list[mx.array]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert mx.array_equal(a, e).item()


@st.composite
def id_form(draw, ids: list[int], unique: bool):
    """``ids`` as one of the forms users pass."""
    form = draw(
        st.sampled_from(["list", "tuple", "numpy", "contiguous", "strided", "reversed", "broadcast", "transposed"])
    )
    dtype = draw(st.sampled_from([mx.int32, mx.int64]))
    n = len(ids)
    if form == "list":
        return list(ids)
    if form == "tuple":
        return tuple(ids)
    if form == "numpy":
        return np.array(ids, dtype=np.int64 if dtype == mx.int64 else np.int32).reshape(n)[::1]
    if form == "contiguous":
        return mx.array(ids, dtype=dtype)
    if form == "reversed":
        return mx.array(ids[::-1], dtype=dtype)[::-1]
    if form == "broadcast" and n > 0 and (len(set(ids)) == 1 and (not unique or n == 1)):
        return mx.broadcast_to(mx.array(ids[:1], dtype=dtype), (n,))
    if form == "transposed":
        table = mx.array([[i, -7] for i in ids] or [[0, 0]], dtype=dtype)[:n]  # column 0 holds the ids
        return table.T[0]
    # strided: the ids at every third position of a longer array
    step = draw(st.integers(2, 4))
    spread = [-9] * (n * step)
    spread[::step] = ids
    return mx.array(spread, dtype=dtype)[::step] if n else mx.array([], dtype=dtype)


# ---------------------------------------------------------------- pooled ops


@st.composite
def pooled_calls(draw, unique: bool):
    """Pools of mixed dtypes and random entries over them; with ``unique`` each id is used once per pool."""
    block = draw(st.integers(1, 6))
    heads = draw(st.integers(1, 3))
    num_pools = draw(st.integers(1, 3))
    pools = []
    for p in range(num_pools):
        num_blocks = draw(st.integers(1, 8))
        dim = draw(st.integers(1, 5))
        pools.append(make_array((num_blocks, heads, block, dim), draw(st.sampled_from(DTYPES)), seed=p))
    free = {p: list(draw(st.permutations(range(pools[p].shape[0])))) for p in range(num_pools)}
    which, ids, sources, offsets = [], [], [], []
    for e in range(draw(st.integers(1, 5))):
        p = draw(st.integers(0, num_pools - 1))
        if unique:
            n = draw(st.integers(0, min(3, len(free[p]))))
            chosen, free[p] = free[p][:n], free[p][n:]
        else:
            chosen = draw(st.lists(st.integers(0, pools[p].shape[0] - 1), max_size=4))
        first = draw(st.integers(0, block - 1)) if chosen else 0
        tokens = draw(st.integers(0, len(chosen) * block - first)) if chosen else 0
        src = make_array((1, tokens, heads, pools[p].shape[3]), pools[p].dtype, seed=100 + e)
        sources.append(
            mx.swapaxes(src, 1, 2) if draw(st.booleans()) else src.reshape(1, heads, tokens, pools[p].shape[3])
        )
        which.append(p)
        ids.append(draw(id_form(chosen, unique)))
        offsets.append(first)
    return [pools[p] for p in which], ids, sources, offsets


def as_lists(ids) -> list[list[int]]:
    return [np.array(i).astype(np.int64).tolist() if not isinstance(i, (list, tuple)) else list(i) for i in ids]


@EXAMPLES
@given(pooled_calls(unique=False))
def test_gather(call):
    pools, ids, _, _ = call
    assert_all_equal(ops.gather_blocks(pools, ids), reference.gather_blocks(pools, as_lists(ids)))


@EXAMPLES
@given(pooled_calls(unique=True))
def test_scatter(call):
    pools, ids, sources, offsets = call
    snapshots = [as_numpy(p) for p in pools]
    got = ops.scatter_blocks(pools, ids, sources, offsets)
    assert_all_equal(got, reference.scatter_blocks(pools, as_lists(ids), sources, offsets))
    for p, snap in zip(pools, snapshots):  # referenced inputs are never modified
        np.testing.assert_array_equal(as_numpy(p), snap)


@st.composite
def quantized_calls(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    group_size = draw(st.sampled_from([32, 64]))
    heads, block = draw(st.integers(1, 2)), draw(st.integers(1, 4))
    triples = []
    for p in range(draw(st.integers(1, 3))):
        dim = group_size * draw(st.integers(1, 2))
        x = make_array((draw(st.integers(1, 5)), heads, block, dim), draw(st.sampled_from(FLOATS)), seed=p) * 4
        triples.append(mx.quantize(x, group_size=group_size, bits=bits))
    which = [draw(st.integers(0, len(triples) - 1)) for _ in range(draw(st.integers(1, 4)))]
    ids = [draw(id_form(draw(st.lists(st.integers(0, triples[p][0].shape[0] - 1), max_size=3)), False)) for p in which]
    packed, scales, biases = ([triples[p][k] for p in which] for k in range(3))
    return packed, scales, biases, ids, group_size, bits


@EXAMPLES
@given(quantized_calls())
def test_gather_dequantize(call):
    packed, scales, biases, ids, group_size, bits = call
    got = ops.gather_dequantize_blocks(packed, scales, biases, ids, group_size=group_size, bits=bits)
    want = reference.gather_dequantize_blocks(packed, scales, biases, as_lists(ids), group_size, bits)
    assert [g.dtype for g in got] == [s.dtype for s in scales]
    assert_all_equal(got, want)


# ---------------------------------------------------------------- per-block ops


@st.composite
def block_entries(draw):
    """Entries of separate block arrays (some of them strided views), mixed dtypes across entries."""
    block = draw(st.integers(1, 6))
    entries = []
    for e in range(draw(st.integers(1, 4))):
        heads, dim = draw(st.integers(1, 3)), draw(st.integers(1, 5))
        dtype = draw(st.sampled_from(DTYPES))
        layout = draw(st.sampled_from(["own", "pool view", "transposed"]))
        count = draw(st.integers(1, 4))
        if layout == "pool view":
            pool = make_array((count + 1, heads, block, dim), dtype, seed=e)
            blocks = [pool[i] for i in range(1, count + 1)]
        elif layout == "transposed":
            blocks = [mx.swapaxes(make_array((block, heads, dim), dtype, seed=10 * e + i), 0, 1) for i in range(count)]
        else:
            blocks = [make_array((heads, block, dim), dtype, seed=10 * e + i) for i in range(count)]
        order = draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=5))  # repeats allowed
        entries.append([blocks[i] for i in order])
    return entries


@EXAMPLES
@given(block_entries())
def test_concat(entries):
    assert_all_equal(ops.concat_blocks(entries), reference.concat_blocks(entries))


@st.composite
def split_calls(draw):
    block_tokens = draw(st.integers(1, 8))
    sources, offsets, heads = [], [], []
    for e in range(draw(st.integers(1, 4))):
        h, dim, tokens = draw(st.integers(1, 3)), draw(st.integers(1, 4)), draw(st.integers(0, 20))
        dtype = draw(st.sampled_from(DTYPES))
        src = make_array((1, tokens, h, dim), dtype, seed=e)
        sources.append(mx.swapaxes(src, 1, 2) if draw(st.booleans()) else src.reshape(1, h, tokens, dim))
        offsets.append(draw(st.integers(0, block_tokens - 1)))
        heads.append(make_array((h, block_tokens, dim), dtype, seed=50 + e) if draw(st.booleans()) else None)
    return sources, offsets, heads, block_tokens


@EXAMPLES
@given(split_calls())
def test_split(call):
    sources, offsets, heads, block_tokens = call
    got = ops.split_blocks(sources, offsets, heads, block_tokens=block_tokens)
    want = reference.split_blocks(sources, offsets, heads, block_tokens)
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert_all_equal(g, w)
    # concat undoes split: the source sits at its offset
    for entry, src, first in zip(got, sources, offsets):
        if entry:
            joined = ops.concat_blocks([entry])[0]
            assert mx.array_equal(joined[:, :, first : first + src.shape[2]], src).item()


@st.composite
def quantized_block_entries(draw):
    bits = draw(st.sampled_from([2, 4, 8]))
    group_size = draw(st.sampled_from([32, 64]))
    packed, scales, biases = [], [], []
    for e in range(draw(st.integers(1, 3))):
        heads, block = draw(st.integers(1, 2)), draw(st.integers(1, 4))
        count = draw(st.integers(1, 3))
        x = make_array((count, heads, block, group_size), draw(st.sampled_from(FLOATS)), seed=e) * 3
        q, s, b = mx.quantize(x, group_size=group_size, bits=bits)
        order = draw(st.lists(st.integers(0, count - 1), min_size=1, max_size=4))
        packed.append([q[i] for i in order])
        scales.append([s[i] for i in order])
        biases.append([b[i] for i in order])
    return packed, scales, biases, group_size, bits


@EXAMPLES
@given(quantized_block_entries())
def test_concat_dequantize(call):
    packed, scales, biases, group_size, bits = call
    got = ops.concat_dequantize_blocks(packed, scales, biases, group_size=group_size, bits=bits)
    assert_all_equal(got, reference.concat_dequantize_blocks(packed, scales, biases, group_size, bits))
