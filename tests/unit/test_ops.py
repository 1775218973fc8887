"""The native block ops against the pure-MLX reference: pooled and per-block ops.

These tests pin the CPU (the path this project runs and measures): graph
structure, donation, and the mx.compile error semantics are the CPU
kernels'. Property tests over random layouts, id forms and dtypes run on the
default device (the GPU on a Mac) in tests/property/test_ops_native.py; the
quantized ops are in test_quantized.py; backend selection in test_backend.py.
"""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

import blockpool
from blockpool import _ext, ops, reference
from blockpool.errors import InvalidRequestError

DTYPES = [mx.float16, mx.bfloat16, mx.float32, mx.uint32]


@pytest.fixture(autouse=True)
def on_the_cpu(monkeypatch):
    monkeypatch.delenv(ops.ENV_VAR, raising=False)  # these test the native kernels
    with mx.stream(mx.cpu):
        yield


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


def node_count(outputs: list[mx.array], name: str) -> int:
    dot = io.StringIO()
    mx.export_to_dot(dot, *outputs)
    return dot.getvalue().count(f'"{name}"')


# ---------------------------------------------------------------- the module


def test_cpu_streams_use_the_compiled_primitives():
    assert ops.backend(mx.cpu) == "native"
    assert blockpool.gather_blocks is ops.gather_blocks
    assert blockpool.scatter_blocks is ops.scatter_blocks
    pool = random_pool(4, 1, 2, 3, mx.float32)
    out = ops.gather_blocks([pool], [[2]])  # only the required arguments
    assert node_count(out, "GatherBlocks") == 1


def test_extension_loads_without_mlx_core_imported_first():
    # Load the .so directly in a fresh interpreter: the dynamic loader must
    # find libmlx through the extension's own rpath.
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('_ext', {_ext.__file__!r})\n"
        "assert 'mlx.core' not in sys.modules\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "print(m.gather_blocks.__name__, m.split_blocks.__name__)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "LD_LIBRARY_PATH"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "gather_blocks split_blocks"


def test_generated_stub_is_installed_and_typed():
    stub = os.path.join(os.path.dirname(_ext.__file__), "_ext.pyi")
    text = open(stub).read()
    assert "def gather_blocks(pools: Sequence[mlx.core.array]" in text
    assert "def concat_blocks(blocks: Sequence[Sequence[mlx.core.array]]" in text
    assert "heads: Sequence[mlx.core.array | None], *, block_tokens: int = 256" in text
    assert "-> list[list[mlx.core.array]]" in text


def test_whole_cache_is_one_graph_node():
    k = random_pool(8, 2, 4, 3, mx.float16)
    v = random_pool(8, 2, 4, 5, mx.float16, seed=1)
    layers = 6
    outs = ops.gather_blocks([k] * layers + [v] * layers, [[i, (i + 1) % 8] for i in range(layers)] * 2)
    assert node_count(outs, "GatherBlocks") == 1
    assert len(outs) == 2 * layers
    blocks = [[k[i], k[(i + 1) % 8]] for i in range(layers)] + [[v[i]] for i in range(layers)]
    joined = ops.concat_blocks(blocks)
    assert node_count(joined, "ConcatBlocks") == 1 and len(joined) == 2 * layers
    split = ops.split_blocks(joined, [0] * len(joined), [None] * len(joined), block_tokens=4)
    flat = [b for entry in split for b in entry]
    assert node_count(flat, "SplitBlocks") == 1 and len(flat) == 3 * layers


# ---------------------------------------------------------------- pooled ops


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


def test_pools_of_every_itemsize_in_one_call():
    pools = [
        mx.arange(6 * 2 * 2 * 3).reshape(6, 2, 2, 3).astype(dtype)
        for dtype in (mx.uint8, mx.int16, mx.float32, mx.int64)
    ]
    ids = [[5, 0], [1], [2, 2, 3], [4]]
    assert_all_equal(ops.gather_blocks(pools, ids), reference.gather_blocks(pools, ids))
    sources = [g[:, :, :3] + 1 for g in reference.gather_blocks(pools, [[0, 1]] * 4)]
    ids = [[1, 3], [0, 2], [4, 5], [3, 1]]
    assert_all_equal(ops.scatter_blocks(pools, ids, sources), reference.scatter_blocks(pools, ids, sources))


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


# Issue 10: id arrays that are not row-contiguous were read as if they were.
STRIDED_IDS = {
    "step 3": lambda: mx.arange(12)[::3],
    "reversed step": lambda: mx.arange(12)[::-3][::-1],
    "broadcast": lambda: mx.broadcast_to(mx.array([6]), (4,)),
    "transposed column": lambda: mx.arange(12).reshape(4, 3).T[0],
    "int64 strided": lambda: mx.arange(12, dtype=mx.int64)[::3],
    "numpy strided": lambda: np.arange(12)[::3],
}
EXPECTED_IDS = {
    "step 3": [0, 3, 6, 9],
    "reversed step": [2, 5, 8, 11],
    "broadcast": [6, 6, 6, 6],
    "transposed column": [0, 3, 6, 9],
    "int64 strided": [0, 3, 6, 9],
    "numpy strided": [0, 3, 6, 9],
}


@pytest.mark.parametrize("name", sorted(STRIDED_IDS))
def test_gather_reads_id_views_as_their_values(name):
    pool = mx.arange(12 * 2).reshape(12, 1, 1, 2).astype(mx.float32)
    out = ops.gather_blocks([pool], [STRIDED_IDS[name]()])[0]
    assert out[0, 0, :, 0].tolist() == [2.0 * i for i in EXPECTED_IDS[name]]


@pytest.mark.parametrize("compiled", [False, True])
def test_scatter_writes_the_blocks_a_strided_id_view_names(compiled):
    pool = mx.zeros((12, 1, 1, 2))
    src = (mx.arange(4) + 1.0).reshape(1, 1, 4, 1) * mx.ones((1, 1, 4, 2))

    def scatter(p, ids, s):
        return ops.scatter_blocks([p], [ids], [s])[0]

    fn = mx.compile(scatter) if compiled else scatter
    out = fn(pool, mx.arange(12)[::3], src)
    written = {i: out[i, 0, 0, 0].item() for i in range(12) if out[i, 0, 0, 0].item() != 0}
    assert written == {0: 1.0, 3: 2.0, 6: 3.0, 9: 4.0}


def test_traced_strided_and_wide_ids_are_read_by_value():
    pool = mx.arange(12 * 2).reshape(12, 1, 1, 2).astype(mx.float32)
    gather = mx.compile(lambda p, i: ops.gather_blocks([p], [i])[0])
    assert gather(pool, mx.arange(12)[::3])[0, 0, :, 0].tolist() == [0.0, 6.0, 12.0, 18.0]
    # A traced int64 id past 2^32 must not wrap into range.
    with pytest.raises(RuntimeError, match="out of range"):
        mx.eval(gather(pool, mx.array([1, 2**32 + 1], dtype=mx.int64)))


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
    with pytest.raises(RuntimeError, match=r"block id 10 in block_ids\[0\] is out of range for a pool of 10 blocks"):
        mx.eval(scatter(pool, mx.array([3, 10]), src))
    with pytest.raises(RuntimeError, match="block id 3 appears more than once"):
        mx.eval(scatter(pool, mx.array([3, 3]), src))
    np.testing.assert_array_equal(np.array(pool), before)


# Issue 10: mx.compile(shapeless=True) froze id and token counts at trace
# time. Shapes are now read from the inputs, so it is supported.


def test_shapeless_compile_follows_the_id_count():
    pool = random_pool(10, 2, 4, 3, mx.float16)
    gather = mx.compile(lambda p, i: ops.gather_blocks([p], [i])[0], shapeless=True)
    for ids in ([2, 7], [9, 0, 4, 1], [5]):
        got = gather(pool, mx.array(ids))
        assert got.shape == (1, 2, 4 * len(ids), 3)
        assert mx.array_equal(got, reference.gather_blocks([pool], [ids])[0]).item()


def test_shapeless_compile_follows_the_source_length_and_pool_size():
    scatter = mx.compile(lambda p, i, s: ops.scatter_blocks([p], [i], [s], [1])[0], shapeless=True)
    for blocks, ids, tokens in ((10, [2, 7], 5), (14, [13, 0, 4], 9), (6, [5], 2)):
        pool = random_pool(blocks, 2, 4, 3, mx.float32, seed=blocks)
        src = random_pool(1, 2, tokens, 3, mx.float32, seed=tokens)
        got = scatter(pool, mx.array(ids), src)
        assert mx.array_equal(got, reference.scatter_blocks([pool], [ids], [src], [1])[0]).item()


def test_shapeless_compile_rechecks_what_the_trace_checked():
    scatter = mx.compile(lambda p, i, s: ops.scatter_blocks([p], [i], [s])[0], shapeless=True)
    pool = random_pool(10, 2, 4, 3, mx.float32)
    mx.eval(scatter(pool, mx.array([1, 2]), random_pool(1, 2, 8, 3, mx.float32)))
    before = np.array(pool)
    # Same id count, but now more tokens than two blocks hold.
    with pytest.raises(RuntimeError, match="does not fit its 2 blocks of 4 tokens"):
        mx.eval(scatter(pool, mx.array([1, 2]), random_pool(1, 2, 9, 3, mx.float32)))
    np.testing.assert_array_equal(np.array(pool), before)


def test_shapeless_compile_of_the_per_block_ops():
    concat = mx.compile(lambda a, b: ops.concat_blocks([[a, b, a]])[0], shapeless=True)
    split = mx.compile(lambda s: ops.split_blocks([s], [1], [None], block_tokens=4)[0], shapeless=True)
    for tokens in (4, 8):
        a, b = random_pool(2, 2, tokens, 3, mx.float32)
        assert mx.array_equal(concat(a, b), reference.concat_blocks([[a, b, a]])[0]).item()
    src = random_pool(1, 2, 6, 3, mx.float32)
    assert_all_equal(split(src), reference.split_blocks([src], [1], [None], 4)[0])
    assert_all_equal(split(src[:, :, : 7 - 1]), reference.split_blocks([src[:, :, :6]], [1], [None], 4)[0])
    # 9 tokens at offset 1 need 3 blocks, but the traced graph returns 2.
    with pytest.raises(ValueError, match="the number of blocks per entry cannot change"):
        split(random_pool(1, 2, 9, 3, mx.float32))


# ---------------------------------------------------------------- per-block ops


def blocks_of(pool: mx.array) -> list[mx.array]:
    """A pool cut into separate block arrays (each its own buffer), as the elastic pool stores them."""
    blocks = [pool[i] * 1 if pool.dtype != mx.bool_ else pool[i] | False for i in range(pool.shape[0])]
    mx.eval(blocks)
    return blocks


@pytest.mark.parametrize("dtype", DTYPES + [mx.uint8, mx.int64], ids=str)
def test_concat_matches_reference_and_the_pooled_gather(dtype):
    pool = (
        random_pool(6, 3, 8, 5, dtype)
        if dtype in DTYPES
        else mx.arange(6 * 3 * 8 * 5).reshape(6, 3, 8, 5).astype(dtype)
    )
    blocks = blocks_of(pool)
    entries = [[blocks[4], blocks[0], blocks[4]], [blocks[5]]]  # an array may repeat
    out = ops.concat_blocks(entries)
    assert_all_equal(out, reference.concat_blocks(entries))
    assert_all_equal(out, ops.gather_blocks([pool, pool], [[4, 0, 4], [5]]))


def test_concat_of_strided_blocks_and_mixed_entries():
    k = mx.swapaxes(random_pool(1, 4, 2, 8, mx.float16)[0], 0, 1)  # [2, 4, 8] transposed view
    v = random_pool(3, 2, 4, 3, mx.bfloat16, seed=1)[1:, :, :, :]  # sliced pool: blocks are views
    q = random_pool(2, 1, 2, 2, mx.uint32, seed=2)
    entries = [[k, k], [v[0], v[1]], [q[0], q[1], q[0]]]
    out = ops.concat_blocks(entries)
    assert [o.dtype for o in out] == [mx.float16, mx.bfloat16, mx.uint32]
    assert_all_equal(out, reference.concat_blocks(entries))


@pytest.mark.parametrize("offset, tokens", [(0, 8), (0, 11), (3, 5), (3, 1), (7, 9), (2, 0), (0, 0)])
@pytest.mark.parametrize("with_head", [False, True])
def test_split_matches_reference(offset, tokens, with_head):
    src = random_pool(1, 3, tokens, 5, mx.float16, seed=tokens)
    head = random_pool(1, 3, 8, 5, mx.float16, seed=99)[0] if with_head else None
    out = ops.split_blocks([src], [offset], [head], block_tokens=8)[0]
    assert len(out) == -(-(offset + tokens) // 8)
    assert_all_equal(out, reference.split_blocks([src], [offset], [head], 8)[0])
    if out:
        first = out[0]
        expected_head = head[:, :offset] if with_head else mx.zeros((3, offset, 5), dtype=mx.float16)
        assert mx.array_equal(first[:, :offset], expected_head).item()
        if tokens:
            assert mx.array_equal(first[:, offset : offset + 1], src[0, :, :1]).item()


def test_split_with_the_default_block_size_and_strided_sources():
    src = mx.swapaxes(random_pool(1, 300, 2, 4, mx.float32), 1, 2)  # [1, 2, 300, 4], strided
    head = random_pool(1, 2, 256, 4, mx.float32, seed=1)[0]
    out = ops.split_blocks([src, src[:, :, 10:20]], [100, 0], [head, None])
    assert [len(e) for e in out] == [2, 1]
    assert [b.shape for b in out[0]] == [(2, 256, 4)] * 2
    for got, want in zip(out, reference.split_blocks([src, src[:, :, 10:20]], [100, 0], [head, None])):
        assert_all_equal(got, want)


def test_split_then_concat_round_trip():
    src = random_pool(1, 2, 21, 6, mx.bfloat16)
    head = random_pool(1, 2, 8, 6, mx.bfloat16, seed=4)[0]
    blocks = ops.split_blocks([src], [5], [head], block_tokens=8)[0]
    joined = ops.concat_blocks([blocks])[0]
    assert joined.shape == (1, 2, 32, 6)
    assert mx.array_equal(joined[:, :, :5], head[None, :, :5]).item()
    assert mx.array_equal(joined[:, :, 5:26], src).item()
    assert not mx.any(joined[:, :, 26:]).item()


def test_split_into_many_blocks_uses_a_node_per_128_blocks():
    # Every output of an MLX node references all its siblings (n^2 for n
    # outputs), so a large write-back is cut into nodes of at most 128 blocks
    # (an entry is never cut: a larger one is a node of its own).
    src = random_pool(1, 2, 300, 3, mx.float16)
    sources = [src, src[:, :, :40], src[:, :, 100:200]]
    out = ops.split_blocks(sources, [0, 0, 0], [None] * 3, block_tokens=1)
    assert [len(e) for e in out] == [300, 40, 100]
    flat = [b for entry in out for b in entry]
    assert node_count(flat, "SplitBlocks") == 3  # [300], [40], [100]
    for got, want in zip(out, reference.split_blocks(sources, [0, 0, 0], [None] * 3, 1)):
        assert_all_equal(got, want)


def test_split_blocks_are_separate_buffers():
    src = random_pool(1, 1, 16, 4, mx.float32)
    blocks = ops.split_blocks([src], [0], [None], block_tokens=4)[0]
    mx.eval(blocks)
    addresses = {data_address(b) for b in blocks}
    assert len(addresses) == 4
    assert data_address(src) not in addresses


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


def _inputs():
    pool = random_pool(8, 2, 4, 3, mx.float32)
    src = random_pool(1, 2, 6, 3, mx.float32, seed=1)
    return pool, src, [pool[i] for i in range(4)]


# name -> (call, the message it must give)
BAD_CALLS = {
    "gather id out of range": (
        lambda p, s, b: ops.gather_blocks([p], [[8]]),
        r"block id 8 in block_ids\[0\] is out of range for a pool of 8 blocks",
    ),
    "gather negative id": (
        lambda p, s, b: ops.gather_blocks([p], [[-1]]),
        r"block id -1 in block_ids\[0\] is out of range",
    ),
    "gather array id out of range": (
        lambda p, s, b: ops.gather_blocks([p], [mx.array([1, 9])]),
        r"block id 9 .* out of range",
    ),
    "gather strided id out of range": (
        lambda p, s, b: ops.gather_blocks([p], [mx.arange(12)[::3]]),
        r"block id 9 .* out of range",
    ),
    "gather wide id": (
        lambda p, s, b: ops.gather_blocks([p], [mx.array([2**33], dtype=mx.int64)]),
        r"block id 8589934592 .* out of range",
    ),
    "gather float ids": (
        lambda p, s, b: ops.gather_blocks([p], [mx.array([1.0])]),
        r"block_ids\[0\] must be an integer array, got float32",
    ),
    "gather list of floats": (
        lambda p, s, b: ops.gather_blocks([p], [[1.5]]),
        r"block_ids\[0\] must be a list of ints or an integer mx.array",
    ),
    "gather 2-D ids": (
        lambda p, s, b: ops.gather_blocks([p], [mx.array([[1]])]),
        r"block_ids\[0\] must be 1-D, got shape \(1, 1\)",
    ),
    "gather rank 3 pool": (
        lambda p, s, b: ops.gather_blocks([p[0]], [[0]]),
        r"pools\[0\] must have rank 4 \[num_blocks, H, B, D\], got shape \(2, 4, 3\)",
    ),
    "gather lengths differ": (lambda p, s, b: ops.gather_blocks([p, p], [[0]]), r"got 2 pools but 1 block id lists"),
    "scatter id out of range": (lambda p, s, b: ops.scatter_blocks([p], [[1, 8]], [s]), r"block id 8 .* out of range"),
    "scatter duplicate ids": (
        lambda p, s, b: ops.scatter_blocks([p], [[2, 2]], [s]),
        r"block id 2 appears more than once in one scatter",
    ),
    "scatter duplicate across entries": (
        lambda p, s, b: ops.scatter_blocks([p, p], [[2, 3], [3]], [s, s[:, :, :1]]),
        r"block id 3 appears more than once .*block_ids\[1\]",
    ),
    "scatter T too large": (
        lambda p, s, b: ops.scatter_blocks([p], [[1]], [s]),
        r"sources\[0\] has 6 tokens, more than its 1 blocks of 4 tokens hold",
    ),
    "scatter T too large with offset": (
        lambda p, s, b: ops.scatter_blocks([p], [[1, 2]], [s], [3]),
        r"6 tokens starting at offset 3, more than its 2 blocks",
    ),
    "scatter offset out of range": (
        lambda p, s, b: ops.scatter_blocks([p], [[1, 2]], [s], [4]),
        r"offsets\[0\] = 4 must be in \[0, 4\)",
    ),
    "scatter dtype mismatch": (
        lambda p, s, b: ops.scatter_blocks([p], [[1, 2]], [s.astype(mx.float16)]),
        r"sources\[0\] has dtype float16 but its pool has dtype float32",
    ),
    "scatter head mismatch": (
        lambda p, s, b: ops.scatter_blocks([p], [[1, 2]], [mx.concatenate([s, s], axis=1)]),
        r"sources\[0\] must have shape \[1, 2, T, 3\]",
    ),
    "scatter dim mismatch": (
        lambda p, s, b: ops.scatter_blocks([p], [[1, 2]], [s[..., :2]]),
        r"must have shape \[1, 2, T, 3\] .* got \(1, 2, 6, 2\)",
    ),
    "scatter source rank": (lambda p, s, b: ops.scatter_blocks([p], [[1, 2]], [s[0]]), r"got \(2, 6, 3\)"),
    "scatter batch of two": (
        lambda p, s, b: ops.scatter_blocks([p], [[1, 2]], [mx.concatenate([s, s])]),
        r"got \(2, 2, 6, 3\)",
    ),
    "scatter sources length": (lambda p, s, b: ops.scatter_blocks([p], [[1, 2]], []), r"got 1 pools but 0 sources"),
    "scatter ids length": (
        lambda p, s, b: ops.scatter_blocks([p, p], [[1, 2]], [s, s]),
        r"got 2 pools but 1 block id lists",
    ),
    "scatter offsets length": (
        lambda p, s, b: ops.scatter_blocks([p], [[1, 2]], [s], [0, 0]),
        r"got 1 pools but 2 offsets",
    ),
    "concat empty entry": (
        lambda p, s, b: ops.concat_blocks([[b[0]], []]),
        r"blocks\[1\] is empty: every entry needs at least one block",
    ),
    "concat rank 4 block": (
        lambda p, s, b: ops.concat_blocks([[p]]),
        r"blocks\[0\]\[0\] must have rank 3 \[H, B, D\], got shape \(8, 2, 4, 3\)",
    ),
    "concat shapes differ": (
        lambda p, s, b: ops.concat_blocks([[b[0], b[1][:, :2]]]),
        r"blocks\[0\]\[1\] has shape \(2, 2, 3\) but blocks\[0\]\[0\] has shape \(2, 4, 3\)",
    ),
    "concat dtypes differ": (
        lambda p, s, b: ops.concat_blocks([[b[0], b[1].astype(mx.float16)]]),
        r"blocks\[0\]\[1\] has dtype float16 but blocks\[0\]\[0\] has dtype float32",
    ),
    "split offset out of range": (
        lambda p, s, b: ops.split_blocks([s], [4], [None], block_tokens=4),
        r"offsets\[0\] = 4 must be in \[0, 4\)",
    ),
    "split negative offset": (
        lambda p, s, b: ops.split_blocks([s], [-1], [None], block_tokens=4),
        r"offsets\[0\] = -1 must be in \[0, 4\)",
    ),
    "split head shape": (
        lambda p, s, b: ops.split_blocks([s], [1], [b[0][:, :3]], block_tokens=4),
        r"heads\[0\] must have shape \(2, 4, 3\) .* got \(2, 3, 3\)",
    ),
    "split head dtype": (
        lambda p, s, b: ops.split_blocks([s], [1], [b[0].astype(mx.float16)], block_tokens=4),
        r"heads\[0\] has dtype float16 but its source has dtype float32",
    ),
    "split source rank": (
        lambda p, s, b: ops.split_blocks([s[0]], [0], [None], block_tokens=4),
        r"sources\[0\] must have shape \[1, H, T, D\], got \(2, 6, 3\)",
    ),
    "split lengths differ": (
        lambda p, s, b: ops.split_blocks([s, s], [0], [None, None], block_tokens=4),
        r"got 2 sources, 1 offsets and 2 heads",
    ),
    "split block_tokens 0": (
        lambda p, s, b: ops.split_blocks([s], [0], [None], block_tokens=0),
        r"block_tokens must be at least 1, got 0",
    ),
}


@pytest.mark.parametrize("name", sorted(BAD_CALLS))
def test_bad_input_is_an_invalid_request_and_changes_nothing(name):
    pool, src, blocks = _inputs()
    before = np.array(pool)
    call, message = BAD_CALLS[name]
    with pytest.raises(InvalidRequestError) as info:
        call(pool, src, blocks)
    assert re.search(message, str(info.value)), str(info.value)
    assert str(info.value).split(":")[0] in ops.OPS  # names the op
    np.testing.assert_array_equal(np.array(pool), before)


def test_wrong_argument_types():
    pool, src, blocks = _inputs()
    # A flat list of blocks, not a list of entries: each array would be
    # iterated into sub-arrays.
    with pytest.raises(InvalidRequestError, match=r"blocks\[0\] is an mx.array; each entry must be a list"):
        ops.concat_blocks(blocks)
    with pytest.raises(TypeError, match="incompatible function arguments"):
        ops.split_blocks([src], [0.5], [None])


def test_empty_calls_return_empty_lists():
    assert ops.gather_blocks([], []) == []
    assert ops.scatter_blocks([], [], []) == []
    assert ops.concat_blocks([]) == []
    assert ops.split_blocks([], [], []) == []
    src = random_pool(1, 2, 0, 3, mx.float32)
    assert ops.split_blocks([src], [0], [None]) == [[]]
