"""Agent cache files: one safetensors file per agent, written atomically, verified on load.

A file holds, per layer, the tokens the agent's blocks hold (only valid
tokens, not whole blocks) in the pool's storage planes (K and V, or packed
K and V with their scales and biases when the pool is quantized: stored as
they are, so a 4-bit agent takes about a quarter of the disk), the token
ids, and metadata: the format version, the agent id, the model
fingerprint, the cache layout, the quantization, and a SHA-256 checksum
over the data and the metadata.

The reader is written here rather than taken from a library so that an
untrusted or damaged file is checked (header size, JSON, dtypes, offsets,
checksum, then the structure against its own metadata) before any byte of
it reaches MLX or the pool. Files are opened without following symbolic
links and only if they are regular files (a FIFO would block the reader).

Writes go to a temporary file that is fsynced, renamed over the target,
and followed by an fsync of the directory: after a crash the target is
either the old file or the new one. A write that fails (disk full,
read-only directory, a directory in the way, I/O error) removes its
temporary file and raises :class:`PersistenceError`; temporary files left
by a crash are removed by :func:`remove_stale_temp_files`.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import math
import os
import re
import stat
import struct
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from blockpool.block import AgentBlocks
from blockpool.errors import (
    CacheCorruptionError,
    IncompatibleCacheError,
    PersistenceError,
)
from blockpool.pool import BlockPool
from blockpool.spec import ModelCacheSpec

FORMAT_VERSION = 1
SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
#: Temporary files of interrupted saves: ``.<target name>.<pid>.<monotonic ns>.tmp``.
TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.(?P<ns>\d+)\.tmp$")
#: What ``quarantine`` appends to a bad file's name.
QUARANTINE_MARK = ".corrupt-"
_MAX_HEADER = 64 << 20
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
_METADATA_KEYS = ("format", "format_version", "agent_id", "fingerprint", "spec", "first_token", "ring_index", "kv_bits", "kv_group_size", "checksum")


# safetensors dtype names, and how their bytes are viewed in numpy
_DTYPES = {
    "float32": ("F32", np.float32),
    "float16": ("F16", np.float16),
    "bfloat16": ("BF16", np.uint16),
    "uint32": ("U32", np.uint32),
    "int32": ("I32", np.int32),
    "uint8": ("U8", np.uint8),
}
_BY_CODE = {code: (name, np_type) for name, (code, np_type) in _DTYPES.items()}


class BlockRows:
    """One plane of one layer of an agent's history, as the pool holds it: block arrays, not a copy.

    It has the shape of the file's tensor, ``[1, H, tokens, d]``: token ``t``
    is row ``first + t`` of the blocks laid end to end. Written to a file
    piece by piece (:meth:`pieces`, numpy views of the blocks, in the file's
    order), so saving an agent needs no second copy of it in memory.
    """

    def __init__(self, blocks: Sequence[mx.array], first: int, tokens: int):
        self.blocks, self.first, self.tokens = list(blocks), first, tokens
        heads, block_tokens, dim = self.blocks[0].shape
        self.block_tokens = block_tokens
        self.shape = (1, heads, tokens, dim)
        self.dtype = self.blocks[0].dtype
        self.nbytes = heads * tokens * dim * self.dtype.size
        # numpy views, made on this (the engine's) thread: a writer thread only reads memory
        viewable = [b.view(mx.uint16) if self.dtype == mx.bfloat16 else b for b in self.blocks]
        mx.eval(viewable)
        self._views = [np.asarray(v) for v in viewable]

    def pieces(self) -> Iterator[np.ndarray]:
        """Contiguous byte runs in the file's order: head by head, token by token."""
        b = self.block_tokens
        for h in range(self.shape[1]):
            t = 0
            while t < self.tokens:
                row = self.first + t
                j, r = divmod(row, b)
                n = min(b - r, self.tokens - t)
                yield self._views[j][h, r : r + n, :]
                t += n

    def array(self) -> mx.array:
        """The plane as one ``[1, H, tokens, d]`` array (a copy)."""
        if not self.tokens:
            return mx.zeros(self.shape, dtype=self.dtype)
        joined = mx.concatenate(self.blocks, axis=1)[None]
        return joined[..., self.first : self.first + self.tokens, :]


def as_array(plane: mx.array | BlockRows) -> mx.array:
    """A file plane as an array (block-backed planes are copied)."""
    return plane.array() if isinstance(plane, BlockRows) else plane


@dataclass
class AgentFile:
    """The contents of one agent file, as plain arrays."""

    agent_id: str
    fingerprint: str
    spec: ModelCacheSpec
    token_ids: list[int]
    first_token: list[int]  # per layer: position of the first stored token
    planes: list[dict[str, mx.array | BlockRows]]  # per layer: plane name -> [1, H, T_layer, d]
    ring_index: dict[int, int]
    kv_bits: int | None = None
    kv_group_size: int = 64

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.planes for a in layer.values())


def agent_file_name(agent_id: str) -> str:
    """A file name for an agent id that cannot leave the cache directory.

    Readable characters of the id are kept (at most 48), and a hash of the
    whole id makes the name unique: ``../x`` becomes ``x-<hash>``, a NUL byte
    or a 10,000-character id a short safe name.
    """
    slug = re.sub(r"[^A-Za-z0-9_-]+", "_", agent_id).strip("_")[:48] or "agent"
    digest = hashlib.sha256(agent_id.encode("utf-8", "surrogatepass")).hexdigest()[:20]
    return f"{slug}-{digest}{SUFFIX}"


def model_fingerprint(model: nn.Module, spec: ModelCacheSpec) -> str:
    """A stable hash of a model's parameters and cache layout.

    It covers every parameter's name, shape and dtype, and up to 4,096
    evenly spaced values of each (hashing every weight of a large model
    would take seconds): the same weights always give the same fingerprint,
    and other weights almost surely another.
    """
    h = hashlib.sha256(json.dumps(spec.to_dict(), sort_keys=True).encode())
    for name, value in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        flat = value.reshape(-1)
        step = max(1, flat.size // 4096)
        sample = flat[::step].astype(mx.float32) if mx.issubdtype(flat.dtype, mx.floating) else flat[::step]
        h.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        h.update(np.asarray(sample).tobytes())
    return h.hexdigest()[:32]


# ------------------------------------------------------------------ pool <-> file


def export_agent(pool: BlockPool, agent: AgentBlocks, fingerprint: str) -> AgentFile:
    """An agent's valid tokens as stored, for writing: planes backed by its blocks' own arrays (no copy).

    The returned file keeps those arrays alive, even once the blocks are
    freed, until it is dropped.
    """
    spec, b, total = agent.spec, agent.spec.block_tokens, agent.total_tokens
    data = pool.block_arrays({layer: blocks for layer, blocks in agent.blocks.items() if blocks}) if total else {}
    first, planes = [], []
    for layer_id, layer in enumerate(spec.layers):
        start = agent.valid_start(layer_id)
        if total:
            offset = agent.first_block(layer_id) * b
            blocks = data[layer_id]
            stored = {name: BlockRows([blk[name] for blk in blocks], start - offset, total - start) for name in blocks[0]}
        else:
            g = layer.geometry
            stored = {
                name: mx.zeros((1, g.kv_heads, 0, dim), dtype=getattr(mx, dtype))
                for name, (dim, dtype) in g.planes(pool.kv_bits, pool.kv_group_size).items()
            }
        first.append(start)
        planes.append(stored)
    return AgentFile(
        agent.agent_id, fingerprint, spec, list(agent.token_ids), first, planes, dict(agent.ring_index), pool.kv_bits, pool.kv_group_size
    )


def import_agent(pool: BlockPool, file: AgentFile) -> AgentBlocks:
    """Allocate blocks for a loaded agent and write its tokens into them, all or nothing.

    Raises:
        IncompatibleCacheError: The file's cache layout or quantization is not the pool's.
        PoolExhaustedError: Its blocks do not fit; nothing was allocated.
    """
    if file.spec != pool.spec:
        raise IncompatibleCacheError(f"agent {file.agent_id!r} was stored for another cache layout")
    if (file.kv_bits, file.kv_group_size if file.kv_bits else None) != (pool.kv_bits, pool.kv_group_size if pool.kv_bits else None):
        raise IncompatibleCacheError(
            f"agent {file.agent_id!r} was stored with kv_bits={file.kv_bits}, the pool uses kv_bits={pool.kv_bits}"
        )
    spec, b, total = file.spec, file.spec.block_tokens, len(file.token_ids)
    counts, starts = {}, {}
    for layer_id in range(spec.num_layers):
        lo = file.first_token[layer_id] // b
        hi = -(-total // b)
        counts[layer_id], starts[layer_id] = hi - lo, lo * b
    reserved = pool.reserve(counts, file.agent_id)
    try:
        writes = [
            (layer_id, reserved[layer_id], {n: as_array(p) for n, p in file.planes[layer_id].items()},
             file.first_token[layer_id] - starts[layer_id])
            for layer_id in range(spec.num_layers)
            if total > file.first_token[layer_id]
        ]
        pool.write_planes(writes)
        valid_from = {i: file.first_token[i] for i, layer in enumerate(spec.layers) if layer.window is not None}
        return AgentBlocks(
            file.agent_id, spec, reserved, total, list(file.token_ids), dict(file.ring_index), valid_from,
            pool_id=pool.id, generation=pool.new_handle_generation(),
        )
    except Exception:
        pool.free([blk for blocks in reserved.values() for blk in blocks], file.agent_id)
        raise


# ------------------------------------------------------------------ writing


def file_tensors(file: AgentFile) -> dict[str, mx.array | BlockRows]:
    """The tensors an agent file holds, by name: ``token_ids`` and ``layers.{i}.{plane}``."""
    tensors: dict[str, mx.array] = {"token_ids": mx.array(file.token_ids, dtype=mx.int32)}
    for i, layer in enumerate(file.planes):
        for name, array in layer.items():
            tensors[f"layers.{i}.{name}"] = array
    return tensors


def file_metadata(file: AgentFile) -> dict[str, str]:
    """The metadata an agent file holds, every value a string, without the checksum."""
    return {
        "format": "blockpool-agent",
        "format_version": str(FORMAT_VERSION),
        "agent_id": json.dumps(file.agent_id),
        "fingerprint": file.fingerprint,
        "spec": json.dumps(file.spec.to_dict(), sort_keys=True),
        "first_token": json.dumps(file.first_token),
        "ring_index": json.dumps({str(k): v for k, v in file.ring_index.items()}),
        "kv_bits": json.dumps(file.kv_bits),
        "kv_group_size": json.dumps(file.kv_group_size),
    }


def save_agent_file(path: Path, file: AgentFile) -> int:
    """Write ``file`` to ``path`` atomically. Returns the bytes written.

    Raises:
        PersistenceError: The write failed; no temporary file is left and
            the file at ``path`` (if any) is as it was.
    """
    tensors = file_tensors(file)
    header: dict[str, Any] = {}
    chunks: list[np.ndarray] = []  # views, in file order: nothing is copied to write
    offset = 0
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = tensors[name]
        dtype = str(array.dtype).removeprefix("mlx.core.")
        code, np_type = _DTYPES[dtype]
        if isinstance(array, BlockRows):
            pieces = list(array.pieces())
        else:
            pieces = [np.ascontiguousarray(np.asarray(array.view(mx.uint16) if dtype == "bfloat16" else array))]
        size = sum(p.nbytes for p in pieces)
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + size]}
        for piece in pieces:
            piece = np.ascontiguousarray(piece)
            digest.update(memoryview(piece).cast("B"))
            chunks.append(piece)
        offset += size
    metadata = file_metadata(file)
    metadata["checksum"] = _checksum(digest, metadata)
    header["__metadata__"] = metadata
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}{TEMP_SUFFIX}")
    try:
        fd = os.open(temp, _WRITE_FLAGS, 0o644)
    except OSError as e:
        raise _write_error(path, e) from e
    replaced = False
    try:
        with open(fd, "wb") as f:
            f.write(struct.pack("<Q", len(header_bytes)))
            f.write(header_bytes)
            for chunk in chunks:
                f.write(memoryview(chunk).cast("B"))
            f.flush()
            os.fsync(f.fileno())
        if os.path.isdir(path) and not os.path.islink(path):  # rename would give a confusing error
            raise IsADirectoryError(errno.EISDIR, "a directory is in the way", str(path))
        os.replace(temp, path)
        replaced = True
        _fsync_dir(path.parent)
    except BaseException as e:
        if not replaced:
            with contextlib.suppress(OSError):
                os.unlink(temp)
        if isinstance(e, OSError):
            raise _write_error(path, e) from e
        raise
    return 8 + len(header_bytes) + offset


def _write_error(path: Path, e: OSError) -> PersistenceError:
    why = e.strerror or str(e)
    return PersistenceError(e.errno or errno.EIO, f"cannot write agent file ({why})", str(path))


def _checksum(data_digest: "hashlib._Hash", metadata: dict[str, str]) -> str:
    digest = data_digest.copy()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    return digest.hexdigest()


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ reading


def open_agent_file(path: Path) -> tuple[Any, int]:
    """Open an agent file for reading: never through a symbolic link, only a regular file.

    Returns:
        The open binary file (the caller closes it) and its size.

    Raises:
        CacheCorruptionError: The path is a symbolic link, a FIFO, a directory
            or another non-regular file.
        PersistenceError: It cannot be opened (missing, permission, I/O error).
    """
    try:
        fd = os.open(path, _READ_FLAGS)  # O_NONBLOCK: opening a FIFO must not wait for a writer
    except OSError as e:
        if e.errno == errno.ELOOP or (e.errno == errno.EMLINK and os.path.islink(path)):
            raise _corrupt(path, "is a symbolic link (not followed)") from None
        raise PersistenceError(e.errno or errno.EIO, f"cannot open agent file ({e.strerror or e})", str(path)) from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _corrupt(path, f"is not a regular file ({_kind(info.st_mode)})")
        return open(fd, "rb", closefd=True), info.st_size
    except BaseException:
        os.close(fd)
        raise


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """Parse and check a file's header without reading its data.

    Returns:
        The tensor table, the metadata, and where the data starts.

    Raises:
        CacheCorruptionError: Not a well-formed blockpool agent file.
        PersistenceError: The file cannot be read.
    """
    f, size = open_agent_file(Path(path))
    with f:
        return _read_header(f, size, Path(path))


def _read_header(f: Any, size: int, path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    header, length = _parse_safetensors_header(f, size, path)
    if not isinstance(header.get("__metadata__"), dict):
        raise _corrupt(path, "no metadata")
    metadata = header.pop("__metadata__")
    if metadata.get("format") != "blockpool-agent" or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "not a blockpool agent file")
    missing = [k for k in _METADATA_KEYS if k not in metadata]
    if missing:
        raise _corrupt(path, f"metadata lacks {missing}")
    data_size = size - 8 - length
    end = 0
    for name, entry in sorted(header.items(), key=lambda kv: _offsets(path, kv)[0]):
        start, stop = _offsets(path, (name, entry))
        code, shape = entry.get("dtype"), entry.get("shape")
        if code not in _BY_CODE or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise _corrupt(path, f"bad entry for {name!r}")
        itemsize = np.dtype(_BY_CODE[code][1]).itemsize
        # math.prod on Python ints: a hostile shape cannot overflow into a small size.
        if start != end or stop - start != math.prod(shape) * itemsize:
            raise _corrupt(path, f"offsets of {name!r} do not match its shape")
        end = stop
    if end != data_size:
        raise _corrupt(path, f"data is {data_size} bytes, the header describes {end}")
    return header, metadata, 8 + length


def _parse_safetensors_header(f: Any, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (any safetensors file, not only agent files)."""
    try:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise _corrupt(path, "shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(_MAX_HEADER, size - 8):
            raise _corrupt(path, f"header length {length} does not fit the file ({size} bytes)")
        raw = f.read(length)
        header = json.loads(raw)
    except CacheCorruptionError:
        raise
    except OSError as e:
        raise PersistenceError(e.errno or errno.EIO, f"cannot read agent file ({e.strerror or e})", str(path)) from e
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise _corrupt(path, f"unreadable header ({e})") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "the header is not a JSON object")
    return header, length


def load_agent_file(path: Path, fingerprint: str | None = None, spec: ModelCacheSpec | None = None) -> AgentFile:
    """Read and verify an agent file: format, checksum, then its structure against its metadata.

    Raises:
        CacheCorruptionError: The file is truncated, damaged, inconsistent
            with its own metadata, not an agent file, or not a regular file
            (a symbolic link, a FIFO, a directory).
        IncompatibleCacheError: It was written for another model or cache layout.
        PersistenceError: It cannot be read (permission, I/O error).
    """
    path = Path(path)
    f, size = open_agent_file(path)
    digest = hashlib.sha256()
    arrays: dict[str, mx.array] = {}
    with f:
        header, metadata, data_start = _read_header(f, size, path)
        try:
            f.seek(data_start)
            for name, entry in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
                start, stop = entry["data_offsets"]
                raw = f.read(stop - start)
                if len(raw) != stop - start:
                    raise _corrupt(path, "truncated data")
                digest.update(raw)
                dtype_name, np_type = _BY_CODE[entry["dtype"]]
                array = mx.array(np.frombuffer(raw, dtype=np_type).reshape(entry["shape"]))
                arrays[name] = array.view(mx.bfloat16) if dtype_name == "bfloat16" else array
        except OSError as e:
            raise PersistenceError(e.errno or errno.EIO, f"cannot read agent file ({e.strerror or e})", str(path)) from e
    if _checksum(digest, metadata) != metadata.get("checksum"):
        raise _corrupt(path, "checksum mismatch")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise IncompatibleCacheError(f"{path}: format version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        file = _structure(metadata, arrays)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RecursionError) as e:  # checksummed, yet inconsistent
        raise _corrupt(path, f"inconsistent contents ({e})") from e
    if fingerprint is not None and file.fingerprint != fingerprint:
        raise IncompatibleCacheError(f"{path} was written for another model (fingerprint {file.fingerprint})")
    if spec is not None and file.spec != spec:
        raise IncompatibleCacheError(f"{path} was written for another cache layout")
    return file


def _structure(metadata: dict[str, str], arrays: dict[str, mx.array]) -> AgentFile:
    """Decode the metadata and check every part of the file against the rest; ``ValueError`` if any disagrees."""
    spec_dict = json.loads(metadata["spec"])
    if not isinstance(spec_dict, dict):
        raise ValueError("the cache layout is not a JSON object")
    spec = ModelCacheSpec.from_dict(spec_dict)
    agent_id = json.loads(metadata["agent_id"])
    if not isinstance(agent_id, str) or not agent_id:
        raise ValueError(f"agent id {agent_id!r} is not a non-empty string")
    kv_bits, kv_group_size = json.loads(metadata["kv_bits"]), json.loads(metadata["kv_group_size"])
    if kv_bits not in (None, 4, 8) or isinstance(kv_bits, bool) or kv_group_size not in (32, 64, 128) or isinstance(kv_group_size, bool):
        raise ValueError(f"unknown quantization kv_bits={kv_bits!r}, kv_group_size={kv_group_size!r}")

    ids = arrays["token_ids"]
    if ids.ndim != 1 or ids.dtype != mx.int32:
        raise ValueError(f"token_ids is {ids.dtype} {tuple(ids.shape)}, expected 1-D int32")
    token_ids = ids.tolist()
    if any(t < 0 for t in token_ids):
        raise ValueError("negative token ids")
    total = len(token_ids)

    first_token = json.loads(metadata["first_token"])
    if not isinstance(first_token, list) or len(first_token) != spec.num_layers or not all(type(t) is int for t in first_token):
        raise ValueError(f"first_token must list one integer position per layer ({spec.num_layers})")
    for i, layer in enumerate(spec.layers):
        # What a layer's blocks must hold: a full layer every token, a sliding one at least its window.
        needed = 0 if layer.window is None else max(0, total - layer.window)
        if layer.window is None and first_token[i] != 0:
            raise ValueError(f"full-attention layer {i} starts at token {first_token[i]}, not 0")
        if not 0 <= first_token[i] <= needed:
            raise ValueError(f"layer {i} starts at token {first_token[i]}; with {total} tokens it must hold those from {needed} on")

    ring_raw = json.loads(metadata["ring_index"])
    if not isinstance(ring_raw, dict):
        raise ValueError("ring_index is not a JSON object")
    ring_index = {}
    for key, value in ring_raw.items():
        if not re.fullmatch(r"\d+", key) or int(key) >= spec.num_layers:
            raise ValueError(f"ring_index names layer {key!r}, the layout has {spec.num_layers}")
        layer_id, window = int(key), spec.layers[int(key)].window
        if window is None:
            raise ValueError(f"ring_index names full-attention layer {layer_id}")
        # As mlx-lm's RotatingKVCache: a rotated ring only exists once the window is full.
        if type(value) is not int or not 0 < value < window or total <= window:
            raise ValueError(f"ring index {value!r} of layer {layer_id} is out of range for window {window} and {total} tokens")
        ring_index[layer_id] = value

    expected = {"token_ids"}
    planes = []
    for i, layer in enumerate(spec.layers):
        g, tokens = layer.geometry, total - first_token[i]
        names = g.planes(kv_bits, kv_group_size)
        layer_planes = {}
        for name, (dim, dtype) in names.items():
            array = arrays[f"layers.{i}.{name}"]
            expected.add(f"layers.{i}.{name}")
            if array.shape != (1, g.kv_heads, tokens, dim) or array.dtype != getattr(mx, dtype):
                raise ValueError(f"layer {i} plane {name} is {array.dtype} {tuple(array.shape)}, expected {dtype} {(1, g.kv_heads, tokens, dim)}")
            layer_planes[name] = array
        planes.append(layer_planes)
    extra = sorted(set(arrays) - expected)
    if extra:
        raise ValueError(f"tensors the layout does not have: {extra[:5]}")
    return AgentFile(agent_id, metadata["fingerprint"], spec, token_ids, first_token, planes, ring_index, kv_bits, kv_group_size)


def quarantine(path: Path) -> Path:
    """Move a bad file aside (never delete it; a symbolic link is moved, not followed) and return where it went."""
    path = Path(path)
    target = path.with_name(f"{path.name}{QUARANTINE_MARK}{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}")
    os.replace(path, target)
    return target


def remove_stale_temp_files(directory: Path, *, max_age: float = 3600.0) -> list[str]:
    """Remove the temporary files that interrupted saves left in ``directory``.

    Only names of the form ``.<name>.<pid>.<ns>.tmp`` are touched, only
    regular files (symbolic links and anything else are left alone and never
    followed), and only stale ones: written by a process that no longer runs
    on this machine, or not modified for ``max_age`` seconds (a save takes
    seconds; this also covers files of other machines on a shared disk).
    A save in progress in a live process is never removed.

    Returns:
        The names removed.

    Raises:
        PersistenceError: The directory cannot be listed.
    """
    try:
        dir_fd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError as e:
        raise PersistenceError(e.errno or errno.EIO, f"cannot list cache directory ({e.strerror or e})", str(directory)) from e
    removed = []
    try:
        now = time.time()
        for name in os.listdir(dir_fd):
            match = TEMP_PATTERN.match(name)
            if match is None:
                continue
            try:
                info = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
                if not stat.S_ISREG(info.st_mode):
                    continue
                if _process_alive(int(match["pid"])) and now - info.st_mtime < max_age:
                    continue
                os.unlink(name, dir_fd=dir_fd)
                removed.append(name)
            except FileNotFoundError:  # its writer finished (renamed it) or another cleaner got there first
                continue
    finally:
        os.close(dir_fd)
    return removed


def _process_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return pid < 2**22  # exists but is someone else's; an absurd pid is no process
    return True


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISDIR, "a directory"), (stat.S_ISLNK, "a symbolic link"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _offsets(path: Path, item: tuple[str, Any]) -> tuple[int, int]:
    name, entry = item
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)) or offsets[0] > offsets[1] or offsets[0] < 0:
        raise _corrupt(path, f"bad offsets for {name!r}")
    return offsets[0], offsets[1]


def _corrupt(path: Path, why: str) -> CacheCorruptionError:
    return CacheCorruptionError(f"{path}: {why}")


# ------------------------------------------------------------------ inspection


@dataclass
class FileReport:
    """What ``blockpool inspect`` shows for one entry of a cache directory.

    ``kind`` says how a script should count it: ``"ok"``, ``"corrupt"``
    (the store would set it aside), ``"incompatible"`` (another format
    version), ``"partial"`` (an interrupted save: ignored, removed when a
    store starts), ``"quarantined"`` (already set aside by a store) or
    ``"other"`` (not an agent file: ignored).
    """

    name: str
    status: str
    kind: str = "ok"
    agent_id: str | None = None
    tokens: int | None = None
    size_bytes: int = 0
    fingerprint: str | None = None
    format_version: str | None = None
    kv_bits: int | None = None
    bits: int | None = None  # bits per stored K/V value: kv_bits when quantized, else the layers' dtype size


def describe_cache_dir(directory: Path) -> list[FileReport]:
    """Verify every entry of a cache directory (checksums included) without changing anything.

    Nothing is followed or opened that is not a regular file, so symbolic
    links and FIFOs are reported, never read. Subdirectories are skipped.

    Raises:
        PersistenceError: The directory cannot be listed.
    """
    try:
        entries = sorted(os.scandir(directory), key=lambda e: e.name)
    except OSError as e:
        raise PersistenceError(e.errno or errno.EIO, f"cannot list cache directory ({e.strerror or e})", str(directory)) from e
    return [r for entry in entries if (r := _describe(Path(directory) / entry.name)) is not None]


def _describe(path: Path) -> FileReport | None:
    try:
        info = os.lstat(path)
    except OSError:
        return None  # gone meanwhile
    name, size = path.name, info.st_size
    if stat.S_ISDIR(info.st_mode):
        return None
    if QUARANTINE_MARK in name:
        return FileReport(name, "set aside by a store (quarantined)", "quarantined", size_bytes=size)
    if TEMP_PATTERN.match(name):
        return FileReport(name, "partial write (interrupted; ignored)", "partial", size_bytes=size)
    if not name.endswith(SUFFIX):
        return FileReport(name, "not an agent file", "other", size_bytes=size)
    if not stat.S_ISREG(info.st_mode):
        return FileReport(name, f"corrupt: not a regular file ({_kind(info.st_mode)})", "corrupt", size_bytes=size)
    try:
        file = load_agent_file(path)
        _, metadata, _ = read_header(path)
    except CacheCorruptionError as e:
        if not _is_agent_file(path):
            return FileReport(name, "not an agent file", "other", size_bytes=size)
        return FileReport(name, f"corrupt: {str(e).removeprefix(str(path) + ': ')}", "corrupt", size_bytes=size)
    except IncompatibleCacheError as e:
        return FileReport(name, f"incompatible: {str(e).removeprefix(str(path) + ': ')}", "incompatible", size_bytes=size)
    except PersistenceError as e:
        return FileReport(name, f"unreadable: {e.strerror}", "corrupt", size_bytes=size)
    sizes = {getattr(mx, layer.geometry.dtype).size * 8 for layer in file.spec.layers}
    bits = file.kv_bits or (sizes.pop() if len(sizes) == 1 else max(sizes))
    return FileReport(
        name, "ok", "ok", file.agent_id, len(file.token_ids), size, file.fingerprint, metadata.get("format_version"), file.kv_bits, bits
    )


def _is_agent_file(path: Path) -> bool:
    """Whether a file that failed to load claims to be an agent file (else it is some other safetensors file).

    A file whose header does not even parse may be a damaged agent file, so it counts as one.
    """
    try:
        f, size = open_agent_file(path)
        with f:
            header, _ = _parse_safetensors_header(f, size, path)
    except (CacheCorruptionError, PersistenceError):
        return True
    metadata = header.get("__metadata__")
    if not isinstance(metadata, dict):
        return not header or any(not isinstance(v, dict) for v in header.values())  # a bare tensor table is not ours
    return metadata.get("format") == "blockpool-agent" or "checksum" in metadata
