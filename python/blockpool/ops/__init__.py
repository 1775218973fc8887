"""The block ops, and which implementation runs them on each device.

Pooled ops (a pool array ``[num_blocks, H, B, D]`` and block ids):
``gather_blocks``, ``scatter_blocks``, ``gather_dequantize_blocks``.
Per-block ops (one array ``[H, B, D]`` per block): ``concat_blocks``,
``concat_dequantize_blocks``, ``split_blocks``. Each call builds one graph
node for all its entries (``scatter_blocks``: one per distinct pool;
``split_blocks``: one per 128 new blocks, since every output of an MLX node
references all its siblings). Paged attention over per-block arrays:
``paged_attention`` (one node) and ``write_tokens`` (one node per write, so
that a block nothing else holds is written in place).

Backends. ``native`` is the compiled MLX primitives of ``blockpool._ext``;
``reference`` is the pure-MLX :mod:`blockpool.reference`. CPU streams use
native. GPU streams use native only where this build has GPU kernels
(Metal) and each op passed a self-check: the first GPU use of an op in a
process runs it on a tiny case against the reference, and on a mismatch or
an error warns once and uses the reference for that op from then on. CUDA
builds of mlx, and Macs whose Metal build failed, use the reference on the
GPU. The environment variable ``BLOCKPOOL_OPS`` overrides this:
``reference`` uses the reference for every op on every device; ``native``
uses the compiled primitives everywhere, without a self-check (a GPU
without kernels then fails at evaluation); unset, empty or ``auto`` is the
default. :func:`backend` tells which one a device gets.

Errors. Bad input raises :class:`~blockpool.errors.InvalidRequestError`
(a ``ValueError``) when the op is called, before any graph is built, in
both backends: every call is checked by the native op function. Block ids
traced by ``mx.compile`` (ids passed as arguments of the compiled function)
are only known at evaluation: a bad one makes ``mx.eval`` raise
``RuntimeError`` before anything is written, on CPU streams; on GPU streams
the native ops refuse traced ids when the graph is built, because a GPU
kernel cannot check before it writes. ``mx.compile(..., shapeless=True)``
is supported: shapes are read from the arrays at evaluation and checked
again there (``RuntimeError`` on a mismatch); ``split_blocks`` refuses a
shapeless call whose entries would need a different number of blocks.

Rule for in-place writes: ``scatter_blocks`` reuses a pool's buffer only if,
when the graph is evaluated, nothing but the scatter itself references the
old pool array. Rebind the name that held the pool to the result before
evaluating (``pool = scatter_blocks([pool], ...)[0]``) and keep no other
copies, or the whole pool is copied.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import mlx.core as mx

from blockpool import _ext, reference
from blockpool.errors import InvalidRequestError
from blockpool.ops.self_check import ENV_VAR, Backend, cases, flatten, same, self_check

__all__ = [
    "OPS",
    "backend",
    "concat_blocks",
    "concat_dequantize_blocks",
    "ensure_cache_limit",
    "gather_blocks",
    "gather_dequantize_blocks",
    "native_gpu_kernels",
    "paged_attention",
    "scatter_blocks",
    "split_blocks",
    "verify",
    "write_tokens",
]

StreamLike = mx.Stream | mx.Device | None
BlockIdList = Sequence[int] | mx.array

#: The ops this module dispatches, by name.
OPS: tuple[str, ...] = (
    "gather_blocks",
    "scatter_blocks",
    "gather_dequantize_blocks",
    "concat_blocks",
    "concat_dequantize_blocks",
    "split_blocks",
    "paged_attention",
    "write_tokens",
)

#: Whether this build has native GPU kernels (Metal) and a Metal GPU to run
#: them. False on Linux, on CUDA builds, and where the Metal build failed.
native_gpu_kernels: bool = bool(_ext.metal_kernels_built) and mx.metal.is_available()

_MODES = {"": "auto", "auto": "auto", "native": "native", "reference": "reference"}


def ensure_cache_limit(nbytes: int) -> int:
    """Raise MLX's allocator cache limit to at least ``nbytes``; never lower it.

    MLX's CPU allocator keeps freed buffers for reuse only up to its cache
    limit (32 MiB by default). Beyond it, freed buffers go back to the C
    allocator, which returns chunks over 32 MiB to the OS, so the next
    reconstruction of that size pays a page fault per page: measured here,
    a gather into 64 MiB outputs ran 5x slower than with a warm cache. Call
    this with the bytes one reconstruction produces.

    Returns:
        The limit in force before the call.
    """
    previous = mx.set_cache_limit(nbytes)
    if previous > nbytes:
        mx.set_cache_limit(previous)
    return previous


# ------------------------------------------------------------------ backends


def _mode() -> str:
    value = os.environ.get(ENV_VAR, "").strip().lower()
    try:
        return _MODES[value]
    except KeyError:
        raise InvalidRequestError(
            f"{ENV_VAR} must be 'reference', 'native', 'auto' or unset, got {os.environ[ENV_VAR]!r}"
        ) from None


def _device_of(stream: StreamLike | mx.DeviceType) -> mx.Device:
    if stream is None:
        return mx.default_device()
    if isinstance(stream, mx.Stream):
        return stream.device
    if isinstance(stream, mx.DeviceType):
        return mx.Device(stream)
    return stream


_lock = threading.Lock()
_self_checked: dict[tuple[str, str], Backend] = {}  # (op, str(device)): mx.Device hashes by identity


def _backend_of(op: str, device: mx.Device) -> Backend:
    mode = _mode()
    if mode == "reference":
        return "reference"
    if device.type == mx.cpu or mode == "native":
        return "native"
    if not native_gpu_kernels:
        return "reference"
    key = (op, str(device))
    found = _self_checked.get(key)
    if found is None:
        with _lock:
            found = _self_checked.get(key)
            if found is None:
                found = _self_checked[key] = self_check(op, device)
    return found


def backend(device: mx.Device | mx.DeviceType | None = None, op: str | None = None) -> Backend:
    """The implementation the block ops use on ``device`` (the default device when None).

    With ``op`` (one of :data:`OPS`), the backend of that op alone; without,
    ``"native"`` only when every op runs natively there. On a GPU this runs
    the self-checks that have not run yet in this process.

    Raises:
        InvalidRequestError: ``op`` is not one of :data:`OPS`, or
            ``BLOCKPOOL_OPS`` holds an unknown value.
    """
    if op is not None and op not in OPS:
        raise InvalidRequestError(f"op must be one of {', '.join(OPS)}; got {op!r}")
    dev = _device_of(device)
    names = OPS if op is None else (op,)
    return "native" if all(_backend_of(name, dev) == "native" for name in names) else "reference"


def _native(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Call a native op function; bad input becomes InvalidRequestError."""
    try:
        return fn(*args, **kwargs)
    except InvalidRequestError:
        raise
    except ValueError as e:
        raise InvalidRequestError(str(e)) from None


def _check_entries(op: str, name: str, entries: Sequence[Any]) -> None:
    """An entry that is itself an array would be iterated into sub-arrays: refuse it."""
    for i, entry in enumerate(entries):
        if isinstance(entry, mx.array):
            raise InvalidRequestError(
                f"{op}: {name}[{i}] is an mx.array; each entry must be a list of block arrays "
                f"({name}=[[b0, b1, ...], ...])"
            )


def _run(
    op: str,
    stream: StreamLike,
    native_args: tuple,
    native_kwargs: dict,
    reference_call: Callable[[], Any],
    reference_only: bool = False,
) -> Any:
    fn = getattr(_ext, op)
    if not reference_only and _backend_of(op, _device_of(stream)) == "native":
        return _native(fn, *native_args, stream=stream, **native_kwargs)
    # The same checks and errors as the native path: the op function
    # validates and builds a CPU node that is dropped, never evaluated.
    _native(fn, *native_args, stream=mx.cpu, **native_kwargs)
    with mx.stream(stream) if stream is not None else nullcontext():
        return reference_call()


# ------------------------------------------------------------------ the ops


def gather_blocks(
    pools: Sequence[mx.array], block_ids: Sequence[BlockIdList], *, stream: StreamLike = None
) -> list[mx.array]:
    """Gather blocks of each pool into contiguous KV arrays, every entry in one graph node.

    Args:
        pools: Arrays ``[num_blocks, H, B, D]``, any dtype. The same array
            may appear in several entries.
        block_ids: For each entry, the block indices to read, in order: a
            list of ints, or an integer ``mx.array`` or numpy array of any
            layout (strided, broadcast, transposed views included).
        stream: Stream or device to run on.

    Returns:
        For each entry, ``[1, H, len(block_ids[i]) * B, D]`` holding block
        ``block_ids[i][j]`` at tokens ``j*B:(j+1)*B``.

    Raises:
        InvalidRequestError: Ids out of range, a pool not of rank 4, or
            list lengths that differ.
    """
    return _run("gather_blocks", stream, (pools, block_ids), {}, lambda: reference.gather_blocks(pools, block_ids))


def scatter_blocks(
    pools: Sequence[mx.array],
    block_ids: Sequence[BlockIdList],
    sources: Sequence[mx.array],
    offsets: Sequence[int] | None = None,
    *,
    stream: StreamLike = None,
) -> list[mx.array]:
    """Write contiguous KV arrays back into blocks of each pool.

    Source token ``t`` of entry ``i`` goes to position ``offsets[i] + t`` of
    the entry's blocks: block ``block_ids[i][(offsets[i] + t) // B]``.
    Positions no source token reaches keep their old contents. Entries that
    pass the same pool array write into one updated copy of it, and each of
    them gets that array back; an unreferenced pool is updated in place
    (see the module's rule for in-place writes).

    Args:
        pools: Arrays ``[num_blocks, H, B, D]``.
        block_ids: For each entry, the block indices to write (as for
            :func:`gather_blocks`). No id may repeat within one pool in one call.
        sources: Arrays ``[1, H, T, D]`` of the pool's dtype, any strides.
        offsets: Position of source token 0 inside the first block, in
            ``[0, B)``; zero for every entry when omitted.
        stream: Stream or device to run on.

    Returns:
        The updated pool for each entry.

    Raises:
        InvalidRequestError: Ids out of range or repeated, shape, dtype or
            rank mismatch, more tokens than the blocks hold, or list lengths
            that differ.
    """
    return _run(
        "scatter_blocks",
        stream,
        (pools, block_ids, sources, offsets),
        {},
        lambda: reference.scatter_blocks(pools, block_ids, sources, offsets),
    )


def gather_dequantize_blocks(
    packed: Sequence[mx.array],
    scales: Sequence[mx.array],
    biases: Sequence[mx.array],
    block_ids: Sequence[BlockIdList],
    *,
    group_size: int = 64,
    bits: int = 4,
    stream: StreamLike = None,
) -> list[mx.array]:
    """Gather blocks of affine-quantized pools and dequantize them in one pass.

    The pools use ``mx.quantize``'s layout along the head dim: ``packed``
    ``[num_blocks, H, B, D * bits / 32]`` (uint32), ``scales`` and
    ``biases`` ``[num_blocks, H, B, D / group_size]``. The result equals
    ``mx.dequantize`` of the gathered planes, bit for bit.

    Args:
        packed: Packed pools, one per entry (the same pool may repeat).
        scales: The matching scales pools (float16, bfloat16 or float32;
            entries may differ).
        biases: The matching biases pools, each of its scales' dtype.
        block_ids: For each entry, the block indices to read, in order.
        group_size: 32, 64 or 128, as given to ``mx.quantize``.
        bits: 2, 4 or 8, as given to ``mx.quantize``.
        stream: Stream or device to run on.

    Returns:
        For each entry, ``[1, H, len(block_ids[i]) * B, D]`` in that
        entry's scales dtype.

    Raises:
        InvalidRequestError: Ids out of range, shapes or dtypes that do not
            match, bits or group_size not supported, or list lengths that differ.
    """
    return _run(
        "gather_dequantize_blocks",
        stream,
        (packed, scales, biases, block_ids),
        {"group_size": group_size, "bits": bits},
        lambda: reference.gather_dequantize_blocks(packed, scales, biases, block_ids, group_size, bits),
    )


def concat_blocks(blocks: Sequence[Sequence[mx.array]], *, stream: StreamLike = None) -> list[mx.array]:
    """Join each entry's block arrays on the token axis, every entry in one graph node.

    Args:
        blocks: For each entry (a layer's K or V plane, say), its blocks
            ``[H, B, D]`` in token order: at least one, all of one shape and
            dtype. The same array may appear several times.
        stream: Stream or device to run on.

    Returns:
        For each entry, a new ``[1, H, len(blocks[i]) * B, D]`` array with
        block ``j`` at tokens ``j*B:(j+1)*B``. An empty ``blocks`` gives ``[]``.

    Raises:
        InvalidRequestError: An entry with no blocks (its shape would be
            unknown), a block not of rank 3, or blocks of one entry that
            differ in shape or dtype.
    """
    _check_entries("concat_blocks", "blocks", blocks)
    return _run("concat_blocks", stream, (blocks,), {}, lambda: reference.concat_blocks(blocks))


def concat_dequantize_blocks(
    packed: Sequence[Sequence[mx.array]],
    scales: Sequence[Sequence[mx.array]],
    biases: Sequence[Sequence[mx.array]],
    *,
    group_size: int = 64,
    bits: int = 4,
    stream: StreamLike = None,
) -> list[mx.array]:
    """Join and dequantize each entry's quantized blocks, bit-identical to ``mx.dequantize``.

    Args:
        packed: For each entry, its packed blocks ``[H, B, D * bits / 32]``
            (uint32), in token order, at least one.
        scales: The matching scales blocks ``[H, B, D / group_size]``
            (float16, bfloat16 or float32: one dtype per entry, entries may differ).
        biases: The matching biases blocks, of the scales' shape and dtype.
        group_size: 32, 64 or 128, as given to ``mx.quantize``.
        bits: 2, 4 or 8, as given to ``mx.quantize``.
        stream: Stream or device to run on.

    Returns:
        For each entry, ``[1, H, n * B, D]`` in that entry's scales dtype.

    Raises:
        InvalidRequestError: An empty entry, shapes or dtypes that do not
            match, bits or group_size not supported, or lengths that differ.
    """
    for name, planes in (("packed", packed), ("scales", scales), ("biases", biases)):
        _check_entries("concat_dequantize_blocks", name, planes)
    return _run(
        "concat_dequantize_blocks",
        stream,
        (packed, scales, biases),
        {"group_size": group_size, "bits": bits},
        lambda: reference.concat_dequantize_blocks(packed, scales, biases, group_size, bits),
    )


def split_blocks(
    sources: Sequence[mx.array],
    offsets: Sequence[int],
    heads: Sequence[mx.array | None],
    *,
    block_tokens: int = 256,
    stream: StreamLike = None,
) -> list[list[mx.array]]:
    """Cut each source into new block arrays: the inverse of :func:`concat_blocks`.

    Entry ``i`` returns ``ceil((offsets[i] + T) / block_tokens)`` new arrays
    ``[H, block_tokens, D]``. Position ``p`` over them (0-based) holds source
    token ``p - offsets[i]`` for ``offsets[i] <= p < offsets[i] + T``;
    positions before ``offsets[i]`` are copied from ``heads[i]`` (zeros when
    it is None); positions after the source are zeros. ``T = 0`` is allowed:
    it gives no block when ``offsets[i]`` is 0, else one block holding the
    head's first ``offsets[i]`` tokens. With ``offsets[i] = 0`` the head is
    checked but unused. Every returned block is a separate array with its
    own buffer, so dropping one frees it.

    Args:
        sources: Arrays ``[1, H, T, D]``, any strides.
        offsets: For each source, the position of its token 0 in the first
            block, in ``[0, block_tokens)``.
        heads: For each source, a block ``[H, block_tokens, D]`` of its
            dtype (an agent's partly filled last block), or None.
        block_tokens: Tokens per block (the pool's B).
        stream: Stream or device to run on.

    Returns:
        For each source, its list of new blocks.

    Raises:
        InvalidRequestError: A source not ``[1, H, T, D]``, an offset out of
            range, a head of the wrong shape or dtype, ``block_tokens < 1``,
            or lengths that differ.
    """
    return _run(
        "split_blocks",
        stream,
        (sources, offsets, heads),
        {"block_tokens": block_tokens},
        lambda: reference.split_blocks(sources, offsets, heads, block_tokens),
    )


QuantizedPlanes = tuple[mx.array, mx.array, mx.array]

#: The widest head dim the GPU kernel of paged attention takes (32 lanes x 8).
GPU_HEAD_DIM = 256


def paged_attention(
    queries: mx.array,
    key_blocks: Sequence[mx.array],
    value_blocks: Sequence[mx.array],
    block_tables: Sequence[Sequence[int]],
    context_lengths: Sequence[int],
    query_starts: Sequence[int] | None = None,
    *,
    scale: float,
    window: int | None = None,
    softcap: float | None = None,
    sinks: mx.array | None = None,
    ring_bases: Sequence[int] | None = None,
    quantized_keys: Sequence[QuantizedPlanes] | None = None,
    quantized_values: Sequence[QuantizedPlanes] | None = None,
    group_size: int = 64,
    bits: int | None = None,
    stream: StreamLike = None,
) -> mx.array:
    """Attention over keys and values stored in blocks, read in place: no copy of the history.

    Row ``b``'s query ``i`` sits at position ``query_starts[b] + i`` and
    attends to the row's positions up to its own (and, with ``window``, to
    the last ``window`` of them), never past ``context_lengths[b] - 1``.
    Position ``p`` of row ``b`` is in block ``block_tables[b][p // B]``: an
    index into ``key_blocks``/``value_blocks`` and then into the quantized
    blocks. The result equals, bit for bit, MLX's
    ``mx.fast.scaled_dot_product_attention`` on the CPU over the same keys
    in the order mlx-lm's cache holds them (:func:`blockpool.reference.paged_attention`).

    Args:
        queries: ``[B, Hq, N, D]`` float32, float16 or bfloat16, any strides.
        key_blocks: Blocks ``[Hkv, B, D]`` of the queries' dtype, contiguous.
        value_blocks: The matching value blocks ``[Hkv, B, Dv]``.
        block_tables: Per row, its blocks in position order; ``-1`` for a
            block it does not hold (before a sliding window), never read.
        context_lengths: Per row, the tokens it holds (the new ones included).
        query_starts: Per row, the position of its first query; by default
            ``context_lengths[b] - N`` (the queries are the row's last tokens).
        scale: The queries' scale (``head_dim ** -0.5`` for most models).
        window: Attend to at most this many positions (a sliding-window layer).
        softcap: Scores become ``softcap * tanh(score / softcap)``.
        sinks: ``[Hq]``: one extra logit per head that takes weight and gives no value.
        ring_bases: For one-token steps of a sliding-window layer: per row,
            its token count after its last multi-token step (0 while that was
            under ``window``), so that sums run in the order of mlx-lm's
            ``RotatingKVCache`` ring; -1 or None for time order.
        quantized_keys: ``(packed, scales, biases)`` per quantized block
            (``mx.quantize``'s layout, scales of the queries' dtype).
        quantized_values: The matching value planes.
        group_size: The quantized blocks' group size.
        bits: The quantized blocks' bits (4 or 8, say).
        stream: Stream or device to run on.

    Returns:
        ``[B, Hq, N, Dv]`` in the queries' dtype.

    Raises:
        InvalidRequestError: Shapes, dtypes or tables that do not match, a
            position a query reads that no block holds, or lists of other lengths.
    """
    n = queries.shape[2] if queries.ndim == 4 else 0
    starts = [length - n for length in context_lengths] if query_starts is None else list(query_starts)
    quantized = bool(quantized_keys)
    native_kwargs = {
        "scale": scale,
        "window": window or 0,
        "softcap": softcap or 0.0,
        "sinks": sinks,
        "ring_bases": ring_bases,
        "quantized_keys": quantized_keys or None,
        "quantized_values": quantized_values or None,
        "group_size": group_size,
        "bits": (bits or 0) if quantized else 0,
    }
    args = (queries, key_blocks, value_blocks, block_tables, context_lengths, starts)
    # The Metal kernel takes head dims up to GPU_HEAD_DIM: wider ones run the reference on a GPU.
    dims = [queries.shape[-1] if queries.ndim else 0] + [b.shape[-1] for b in value_blocks[:1]]
    wide = _device_of(stream).type == mx.gpu and max(dims) > GPU_HEAD_DIM

    def run_reference() -> mx.array:
        return reference.paged_attention(
            *args[:5],
            starts,
            scale,
            window or 0,
            softcap or 0.0,
            sinks,
            ring_bases,
            quantized_keys or (),
            quantized_values or (),
            group_size,
            bits or 0,
        )

    return _run("paged_attention", stream, args, native_kwargs, run_reference, reference_only=wide)


TokenWrite = tuple[int, mx.array | None, int, int, int, int]


def write_tokens(
    sources: Sequence[mx.array], writes: Sequence[TokenWrite], *, block_tokens: int = 256, stream: StreamLike = None
) -> list[mx.array]:
    """Write tokens into blocks: each write gives a new block array, in place when it can.

    Write ``(source, dest, row, source_start, count, offset)`` puts tokens
    ``source_start .. source_start + count - 1`` of row ``row`` of
    ``sources[source]`` (``[R, H, T, D]``, any strides) at rows
    ``offset .. offset + count - 1`` of ``dest`` (``[H, block_tokens, D]``
    of the source's dtype), keeping its other rows; with no ``dest``, of a
    new block of zeros. Each write is its own graph node, so when nothing
    but the write references ``dest`` at evaluation its buffer is reused
    (rebind the name that held it to the result, as for
    :func:`scatter_blocks`); otherwise the block is copied first
    (``blockpool._ext.copied_writes()`` counts those).

    Returns:
        The written blocks, one per write.

    Raises:
        InvalidRequestError: A source not of rank 4, or a write that names
            another source, a row or tokens the source lacks, or rows past
            the block, or a destination of another shape or dtype.
    """
    return _run(
        "write_tokens",
        stream,
        (sources, writes),
        {"block_tokens": block_tokens},
        lambda: reference.write_tokens(sources, writes, block_tokens),
    )


# ------------------------------------------------------------------ self-check


def verify(device: mx.Device | mx.DeviceType | None = None) -> dict[str, str]:
    """Run every op as callers get it (through :func:`backend`'s choice) on a small case and
    compare it with the pure-MLX reference, bit for bit.

    Returns:
        Per op, ``"ok"`` or why it failed. ``blockpool doctor`` prints it.
    """
    dev = _device_of(device)
    results = {}
    for op in OPS:
        try:
            with mx.stream(dev):
                args, kwargs, expected = cases(op)
                got = flatten(globals()[op](*args, stream=dev, **kwargs))
                want = flatten(expected())
                mx.eval(got, want)
            results[op] = "ok" if same(op, got, want, dev) else "differs from the reference"
        except Exception as e:  # a report, not a crash: say what failed
            results[op] = f"{type(e).__name__}: {e}"
    return results
