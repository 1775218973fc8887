"""The native gather/scatter primitives against the pure-MLX reference."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import blockpool
from blockpool import _ext, ops, reference

DTYPES = [mx.float16, mx.bfloat16, mx.float32, mx.uint32]


def random_pool(num_blocks: int, heads: int, block: int, dim: int, dtype: mx.Dtype, seed: int = 0) -> mx.array:
    key = mx.random.key(seed)
    if dtype == mx.uint32:
        pool = mx.random.randint(0, 2**31 - 1, (num_blocks, heads, block, dim), key=key).astype(mx.uint32)
    else:
        pool = mx.random.normal((num_blocks, heads, block, dim), key=key).astype(dtype)
    mx.eval(pool)
    return pool


def assert_all_equal(actual: list[mx.array], expected: list[mx.array]) -> None:
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.shape == e.shape and a.dtype == e.dtype
        assert mx.array_equal(a, e).item()


def data_address(a: mx.array) -> int:
    """Address of an evaluated array's buffer; the numpy view is dropped at once."""
    return np.asarray(a).__array_interface__["data"][0]


def test_ops_are_the_compiled_primitives():
    assert ops.gather_blocks is _ext.gather_blocks
    assert ops.scatter_blocks is _ext.scatter_blocks
    assert blockpool.gather_blocks is _ext.gather_blocks
    assert type(_ext.gather_blocks).__name__ == "nb_func"


def test_extension_loads_without_mlx_core_imported_first():
    # Load the .so directly in a fresh interpreter: the dynamic loader must
    # find libmlx through the extension's own rpath.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_ext', {_ext.__file__!r})\n"
        "assert 'mlx.core' not in sys.modules\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.gather_blocks.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "gather_blocks"


def test_generated_stub_is_installed_and_typed():
    stub = os.path.join(os.path.dirname(_ext.__file__), "_ext.pyi")
    text = open(stub).read()
    assert "def gather_blocks(pools: Sequence[mlx.core.array]" in text
    assert "-> list[mlx.core.array]" in text


def test_whole_cache_is_one_graph_node():
    k = random_pool(8, 2, 4, 3, mx.float16)
    v = random_pool(8, 2, 4, 5, mx.float16, seed=1)
    layers = 6
    outs = ops.gather_blocks([k] * layers + [v] * layers, [[i, (i + 1) % 8] for i in range(layers)] * 2)
    dot = io.StringIO()
    mx.export_to_dot(dot, *outs)
    assert dot.getvalue().count('"GatherBlocks"') == 1
    assert len(outs) == 2 * layers


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gather_matches_reference(dtype):
    pool = random_pool(12, 3, 8, 5, dtype)
    ids = [[3, 0, 11], [7], [], [5, 5, 2]]
    out = ops.gather_blocks([pool] * 4, ids)
    assert_all_equal(out, reference.gather_blocks([pool] * 4, ids))
    assert out[0].shape == (1, 3, 24, 5)
    assert out[2].shape == (1, 3, 0, 5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_scatter_matches_reference_with_partial_blocks(dtype):
    pool = random_pool(12, 3, 8, 5, dtype)
    src = random_pool(1, 3, 19, 5, dtype, seed=3)  # 2 full blocks + 3 tokens
    ids, sources, offsets = [[4, 9, 1], [6]], [src, src[:, :, :5]], [0, 2]
    expected = reference.scatter_blocks([pool, pool], ids, sources, offsets)
    out = ops.scatter_blocks([pool, pool], ids, sources, offsets)
    assert_all_equal(out, expected)
    # The tail of the last block and every other block keep their contents.
    assert mx.array_equal(out[0][1, :, 3:], pool[1, :, 3:]).item()
    assert mx.array_equal(out[0][0], pool[0]).item()


def test_k_and_v_with_different_head_dims_in_one_call():
    k = random_pool(6, 2, 4, 8, mx.float16)
    v = random_pool(6, 2, 4, 3, mx.float16, seed=1)
    out = ops.gather_blocks([k, v, k, v], [[1, 2], [1, 2], [5], [5]])
    assert [o.shape for o in out] == [(1, 2, 8, 8), (1, 2, 8, 3), (1, 2, 4, 8), (1, 2, 4, 3)]
    assert_all_equal(out, reference.gather_blocks([k, v, k, v], [[1, 2], [1, 2], [5], [5]]))
    src_k, src_v = out[0][:, :, :6], out[1][:, :, :6]
    new = ops.scatter_blocks([k, v], [[0, 3], [0, 3]], [src_k, src_v])
    assert_all_equal(new, reference.scatter_blocks([k, v], [[0, 3], [0, 3]], [src_k, src_v]))


def test_lazy_and_strided_inputs():
    base = random_pool(10, 2, 4, 6, mx.float32)
    lazy_pool = base * 2.0  # not evaluated
    lazy_ids = mx.arange(3, 7)  # not evaluated
    out = ops.gather_blocks([lazy_pool], [lazy_ids])
    assert_all_equal(out, reference.gather_blocks([base * 2.0], [[3, 4, 5, 6]]))

    # A source that is a strided view, like a slice of an mlx-lm KVCache buffer.
    buffer = random_pool(1, 2, 16, 6, mx.float32, seed=5)
    view = buffer[:, :, 3:10, :]
    transposed = mx.swapaxes(random_pool(1, 7, 2, 6, mx.float32, seed=6), 1, 2)  # [1, 2, 7, 6], strided
    for src in (view, transposed):
        got = ops.scatter_blocks([lazy_pool], [mx.array([8, 1])], [src], [1])
        assert_all_equal(got, reference.scatter_blocks([base * 2.0], [[8, 1]], [src], [1]))


def test_ids_from_numpy_and_tuples():
    pool = random_pool(9, 1, 2, 2, mx.float32)
    ids = [np.array([4, 2], dtype=np.int64), (8,), mx.array([1], dtype=mx.uint8)]
    assert_all_equal(ops.gather_blocks([pool] * 3, ids), reference.gather_blocks([pool] * 3, [[4, 2], [8], [1]]))


def test_works_inside_compile():
    pool = random_pool(10, 2, 4, 3, mx.float16)
    src = random_pool(1, 2, 6, 3, mx.float16, seed=2)

    @mx.compile
    def round_trip(pool, ids, src):
        written = ops.scatter_blocks([pool], [ids], [src])[0]
        return ops.gather_blocks([written], [ids])[0]

    for ids in ([2, 7], [9, 0]):
        got = round_trip(pool, mx.array(ids), src)
        written = reference.scatter_blocks([pool], [ids], [src])[0]
        assert mx.array_equal(got, reference.gather_blocks([written], [ids])[0]).item()
        assert mx.array_equal(got[:, :, :6], src).item()


def test_traced_ids_are_checked_before_any_write():
    pool = random_pool(10, 2, 4, 3, mx.float32)
    before = np.array(pool)
    src = random_pool(1, 2, 8, 3, mx.float32, seed=2)
    scatter = mx.compile(lambda p, i, s: ops.scatter_blocks([p], [i], [s])[0])
    # Inside mx.compile the ids are not known when the graph is built, so
    # the kernel checks them and MLX raises when the graph is evaluated.
    with pytest.raises(RuntimeError, match="out of range"):
        mx.eval(scatter(pool, mx.array([3, 10]), src))
    with pytest.raises(RuntimeError, match="more than once"):
        mx.eval(scatter(pool, mx.array([3, 3]), src))
    np.testing.assert_array_equal(np.array(pool), before)


# ---------------------------------------------------------------- property


@st.composite
def block_tables(draw):
    """Pools with random geometry and dtype, and random entries over them."""
    dtype = draw(st.sampled_from(DTYPES))
    block = draw(st.integers(1, 8))
    heads = draw(st.integers(1, 3))
    num_blocks = draw(st.integers(1, 12))
    dims = draw(st.lists(st.integers(1, 6), min_size=1, max_size=2))
    pools = [random_pool(num_blocks, heads, block, d, dtype, seed=i) for i, d in enumerate(dims)]
    entries = draw(st.integers(1, 5))
    which = [draw(st.integers(0, len(pools) - 1)) for _ in range(entries)]
    # Unique ids per pool across the whole call, so the table also suits scatter.
    free = {p: draw(st.permutations(range(num_blocks))) for p in range(len(pools))}
    ids, sources, offsets = [], [], []
    for e, p in enumerate(which):
        n = draw(st.integers(0, min(3, len(free[p]))))
        ids.append(list(free[p][:n]))
        free[p] = free[p][n:]
        first = draw(st.integers(0, block - 1)) if n else 0
        tokens = draw(st.integers(0, n * block - first)) if n else 0
        sources.append(random_pool(1, heads, tokens, pools[p].shape[3], dtype, seed=100 + e))
        offsets.append(first)
    return [pools[p] for p in which], ids, sources, offsets


@settings(max_examples=60, deadline=None)
@given(block_tables())
def test_gather_property(table):
    pools, ids, _, _ = table
    assert_all_equal(ops.gather_blocks(pools, ids), reference.gather_blocks(pools, ids))


@settings(max_examples=60, deadline=None)
@given(block_tables())
def test_scatter_property(table):
    pools, ids, sources, offsets = table
    snapshots = [np.array(p.astype(mx.float32)) for p in pools]
    got = ops.scatter_blocks(pools, ids, sources, offsets)
    assert_all_equal(got, reference.scatter_blocks(pools, ids, sources, offsets))
    for p, snap in zip(pools, snapshots):  # referenced inputs are never modified
        np.testing.assert_array_equal(np.array(p.astype(mx.float32)), snap)


# ---------------------------------------------------------------- donation


def test_scatter_is_in_place_when_the_pool_is_unreferenced():
    k = random_pool(64, 4, 16, 32, mx.float32)
    v = random_pool(64, 4, 16, 32, mx.float32, seed=1)
    src = random_pool(1, 4, 20, 32, mx.float32, seed=2)
    k_addr, v_addr = data_address(k), data_address(v)
    mx.eval(src)
    mx.reset_peak_memory()
    active = mx.get_active_memory()
    # The rule: rebind the only names holding the pools before evaluating.
    out = ops.scatter_blocks([k, v, k, v], [[3, 9], [3, 9], [40], [40]], [src, src, src[:, :, :4], src[:, :, :4]])
    k, v = out[0], out[1]
    del out
    mx.eval(k, v)
    assert data_address(k) == k_addr and data_address(v) == v_addr
    assert mx.get_peak_memory() - active < k.nbytes // 4  # no pool-sized copy was made
    assert mx.array_equal(k[9, :, :4], src[0, :, 16:]).item()
    assert mx.array_equal(v[40, :, :4], src[0, :, :4]).item()


def test_scatter_copies_when_the_pool_is_referenced():
    k = random_pool(16, 2, 8, 4, mx.float32)
    keep = k  # a second reference: the scatter must not touch k's buffer
    before = np.array(k)
    src = random_pool(1, 2, 8, 4, mx.float32, seed=2)
    new = ops.scatter_blocks([k], [[5]], [src])[0]
    mx.eval(new)
    assert data_address(new) != data_address(keep)
    np.testing.assert_array_equal(np.array(keep), before)
    assert mx.array_equal(new[5], src[0]).item()


# ---------------------------------------------------------------- bad input


def _pool_and_src():
    pool = random_pool(8, 2, 4, 3, mx.float32)
    return pool, random_pool(1, 2, 6, 3, mx.float32, seed=1)


BAD_CALLS = {
    "gather id out of range": lambda p, s: ops.gather_blocks([p], [[8]]),
    "gather negative id": lambda p, s: ops.gather_blocks([p], [[-1]]),
    "gather array id out of range": lambda p, s: ops.gather_blocks([p], [mx.array([1, 9])]),
    "gather wide id": lambda p, s: ops.gather_blocks([p], [mx.array([2**33], dtype=mx.int64)]),
    "gather float ids": lambda p, s: ops.gather_blocks([p], [mx.array([1.0])]),
    "gather list of floats": lambda p, s: ops.gather_blocks([p], [[1.5]]),
    "gather 2-D ids": lambda p, s: ops.gather_blocks([p], [mx.array([[1]])]),
    "gather rank 3 pool": lambda p, s: ops.gather_blocks([p[0]], [[0]]),
    "gather lengths differ": lambda p, s: ops.gather_blocks([p, p], [[0]]),
    "scatter id out of range": lambda p, s: ops.scatter_blocks([p], [[1, 8]], [s]),
    "scatter duplicate ids": lambda p, s: ops.scatter_blocks([p], [[2, 2]], [s]),
    "scatter duplicate across entries": lambda p, s: ops.scatter_blocks([p, p], [[2, 3], [3]], [s, s[:, :, :1]]),
    "scatter T too large": lambda p, s: ops.scatter_blocks([p], [[1]], [s]),
    "scatter T too large with offset": lambda p, s: ops.scatter_blocks([p], [[1, 2]], [s], [3]),
    "scatter offset out of range": lambda p, s: ops.scatter_blocks([p], [[1, 2]], [s], [4]),
    "scatter dtype mismatch": lambda p, s: ops.scatter_blocks([p], [[1, 2]], [s.astype(mx.float16)]),
    "scatter head mismatch": lambda p, s: ops.scatter_blocks([p], [[1, 2]], [mx.concatenate([s, s], axis=1)]),
    "scatter dim mismatch": lambda p, s: ops.scatter_blocks([p], [[1, 2]], [s[..., :2]]),
    "scatter source rank": lambda p, s: ops.scatter_blocks([p], [[1, 2]], [s[0]]),
    "scatter batch of two": lambda p, s: ops.scatter_blocks([p], [[1, 2]], [mx.concatenate([s, s])]),
    "scatter sources length": lambda p, s: ops.scatter_blocks([p], [[1, 2]], []),
    "scatter ids length": lambda p, s: ops.scatter_blocks([p, p], [[1, 2]], [s, s]),
    "scatter offsets length": lambda p, s: ops.scatter_blocks([p], [[1, 2]], [s], [0, 0]),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_is_a_value_error_and_changes_nothing(name):
    pool, src = _pool_and_src()
    before = np.array(pool)
    with pytest.raises(ValueError) as info:
        BAD_CALLS[name](pool, src)
    assert str(info.value)  # a message, not an empty error
    np.testing.assert_array_equal(np.array(pool), before)


def test_empty_call_returns_empty_list():
    assert ops.gather_blocks([], []) == []
    assert ops.scatter_blocks([], [], []) == []
