"""The safetensors container, read and written by hand, safely.

The reader is written here rather than taken from a library so that an
untrusted or damaged file is checked (header size, JSON, dtypes, offsets)
before any byte of it reaches MLX. Files are opened without following
symbolic links and only if they are regular files (a FIFO would block the
reader).

Writes go to a temporary file (``.<name>.<pid>.<monotonic ns>.tmp``) that
is fsynced, renamed over the target, and followed by an fsync of the
directory: after a crash the target is either the old file or the new one.
A write that fails (disk full, read-only directory, a directory in the way,
I/O error) removes its temporary file and raises
:class:`~blockpool.errors.PersistenceError`.

Every byte of tensor data written or read goes through a SHA-256 digest,
which the agent format (:mod:`.format`) seals its checksum with.
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
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from blockpool.errors import CacheCorruptionError, PersistenceError

TEMP_SUFFIX = ".tmp"
#: Temporary files of interrupted saves: ``.<target name>.<pid>.<monotonic ns>.tmp``.
TEMP_PATTERN = re.compile(r"^\.(?P<target>.+)\.(?P<pid>\d+)\.(?P<ns>\d+)\.tmp$")
MAX_HEADER = 64 << 20
_READ_FLAGS = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)

# safetensors dtype names, and how their bytes are viewed in numpy
DTYPES = {
    "float32": ("F32", np.float32),
    "float16": ("F16", np.float16),
    "bfloat16": ("BF16", np.uint16),
    "uint32": ("U32", np.uint32),
    "int32": ("I32", np.int32),
    "int64": ("I64", np.int64),
    "int16": ("I16", np.int16),
    "int8": ("I8", np.int8),
    "uint64": ("U64", np.uint64),
    "uint16": ("U16", np.uint16),
    "bool": ("BOOL", np.bool_),
    "uint8": ("U8", np.uint8),
}
BY_CODE = {code: (name, np_type) for name, (code, np_type) in DTYPES.items()}

Table = dict[str, Any]
"""A safetensors header: tensor name -> ``{"dtype", "shape", "data_offsets"}``."""


def corrupt(path: Path, why: str) -> CacheCorruptionError:
    return CacheCorruptionError(f"{path}: {why}")


def read_error(path: Path, e: OSError, what: str = "read") -> PersistenceError:
    return PersistenceError(e.errno or errno.EIO, f"cannot {what} agent file ({e.strerror or e})", str(path))


# ------------------------------------------------------------------ writing


def layout(tensors: Mapping[str, Any]) -> tuple[Table, list[np.ndarray], Any]:
    """The tensor table, the data as byte runs in file order, and their digest.

    A tensor is an ``mx.array`` or anything with ``shape``, ``dtype`` and
    ``pieces()`` (contiguous numpy runs in file order, e.g. a plane backed
    by block arrays), so nothing is copied to write.
    """
    table: Table = {}
    chunks: list[np.ndarray] = []
    offset = 0
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = tensors[name]
        dtype = str(array.dtype).removeprefix("mlx.core.")
        code, _ = DTYPES[dtype]
        if hasattr(array, "pieces"):
            pieces = list(array.pieces())
        else:
            pieces = [np.ascontiguousarray(np.asarray(array.view(mx.uint16) if dtype == "bfloat16" else array))]
        size = sum(p.nbytes for p in pieces)
        table[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + size]}
        for piece in pieces:
            piece = np.ascontiguousarray(piece)
            digest.update(memoryview(piece).cast("B"))
            chunks.append(piece)
        offset += size
    return table, chunks, digest


def write_atomic(path: Path, table: Table, metadata: Mapping[str, str], chunks: list[np.ndarray]) -> int:
    """Write a safetensors file atomically. Returns the bytes written.

    Raises:
        PersistenceError: The write failed; no temporary file is left and
            the file at ``path`` (if any) is as it was.
    """
    header_bytes = json.dumps({**table, "__metadata__": dict(metadata)}, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}{TEMP_SUFFIX}")
    try:
        fd = os.open(temp, _WRITE_FLAGS, 0o644)
    except OSError as e:
        raise read_error(path, e, "write") from e
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
            raise read_error(path, e, "write") from e
        raise
    return 8 + len(header_bytes) + sum(c.nbytes for c in chunks)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ------------------------------------------------------------------ reading


def open_regular(path: Path) -> tuple[Any, int]:
    """Open a file for reading: never through a symbolic link, only a regular file.

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
            raise corrupt(path, "is a symbolic link (not followed)") from None
        raise read_error(path, e, "open") from e
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise corrupt(path, f"is not a regular file ({file_kind(info.st_mode)})")
        return open(fd, "rb", closefd=True), info.st_size
    except BaseException:
        os.close(fd)
        raise


def parse_header(f: Any, size: int, path: Path) -> tuple[dict[str, Any], int]:
    """The JSON header of a safetensors file (any safetensors file) and its length."""
    try:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise corrupt(path, "shorter than a safetensors header")
        (length,) = struct.unpack("<Q", prefix)
        if length > min(MAX_HEADER, size - 8):
            raise corrupt(path, f"header length {length} does not fit the file ({size} bytes)")
        header = json.loads(f.read(length))
    except CacheCorruptionError:
        raise
    except OSError as e:
        raise read_error(path, e) from e
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        raise corrupt(path, f"unreadable header ({e})") from e
    if not isinstance(header, dict):
        raise corrupt(path, "the header is not a JSON object")
    return header, length


def check_table(table: Table, data_size: int, path: Path) -> None:
    """Every entry's dtype, shape and offsets are well-formed, contiguous and cover exactly the data."""
    end = 0
    for name, entry in sorted(table.items(), key=lambda kv: _offsets(path, kv)[0]):
        start, stop = _offsets(path, (name, entry))
        code, shape = entry.get("dtype"), entry.get("shape")
        if code not in BY_CODE or not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise corrupt(path, f"bad entry for {name!r}")
        itemsize = np.dtype(BY_CODE[code][1]).itemsize
        # math.prod on Python ints: a hostile shape cannot overflow into a small size.
        if start != end or stop - start != math.prod(shape) * itemsize:
            raise corrupt(path, f"offsets of {name!r} do not match its shape")
        end = stop
    if end != data_size:
        raise corrupt(path, f"data is {data_size} bytes, the header describes {end}")


def read_arrays(f: Any, table: Table, data_start: int, path: Path) -> tuple[dict[str, mx.array], Any]:
    """Read every tensor of a checked table, in file order, and the digest of the data."""
    digest = hashlib.sha256()
    arrays: dict[str, mx.array] = {}
    try:
        f.seek(data_start)
        for name, entry in sorted(table.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, stop = entry["data_offsets"]
            raw = f.read(stop - start)
            if len(raw) != stop - start:
                raise corrupt(path, "truncated data")
            digest.update(raw)
            dtype_name, np_type = BY_CODE[entry["dtype"]]
            array = mx.array(np.frombuffer(raw, dtype=np_type).reshape(entry["shape"]))
            arrays[name] = array.view(mx.bfloat16) if dtype_name == "bfloat16" else array
    except OSError as e:
        raise read_error(path, e) from e
    return arrays, digest


def digest_data(f: Any, table: Table, data_start: int, path: Path, chunk: int = 1 << 20) -> Any:
    """The digest :func:`read_arrays` computes, streamed in pieces of ``chunk`` bytes: no tensor is kept."""
    digest = hashlib.sha256()
    try:
        for _, entry in sorted(table.items(), key=lambda kv: kv[1]["data_offsets"][0]):
            start, stop = entry["data_offsets"]
            f.seek(data_start + start)
            left = stop - start
            while left:
                raw = f.read(min(chunk, left))
                if not raw:
                    raise corrupt(path, "truncated data")
                digest.update(raw)
                left -= len(raw)
    except OSError as e:
        raise read_error(path, e) from e
    return digest


def read_tensor(f: Any, table: Table, data_start: int, name: str, path: Path) -> mx.array:
    """Read one tensor of a checked table (no digest: the caller reads the rest later, or never)."""
    entry = table.get(name)
    if entry is None:
        raise corrupt(path, f"no tensor {name}")
    start, stop = entry["data_offsets"]
    try:
        f.seek(data_start + start)
        raw = f.read(stop - start)
    except OSError as e:
        raise read_error(path, e) from e
    if len(raw) != stop - start:
        raise corrupt(path, "truncated data")
    dtype_name, np_type = BY_CODE[entry["dtype"]]
    array = mx.array(np.frombuffer(raw, dtype=np_type).reshape(entry["shape"]))
    return array.view(mx.bfloat16) if dtype_name == "bfloat16" else array


class Described:
    """A tensor as its table entry describes it (shape, dtype), its data left on disk."""

    def __init__(self, entry: dict[str, Any]):
        self.shape = tuple(entry["shape"])
        self.ndim = len(self.shape)
        self.dtype = getattr(mx, BY_CODE[entry["dtype"]][0])


def file_kind(mode: int) -> str:
    """What a non-regular file is, for messages."""
    for test, name in (
        (stat.S_ISFIFO, "a FIFO"),
        (stat.S_ISDIR, "a directory"),
        (stat.S_ISLNK, "a symbolic link"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
    ):
        if test(mode):
            return name
    return "not a regular file"


def _offsets(path: Path, item: tuple[str, Any]) -> tuple[int, int]:
    name, entry = item
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    well_formed = isinstance(offsets, list) and len(offsets) == 2 and all(type(o) is int for o in offsets)
    if not well_formed or offsets[0] > offsets[1] or offsets[0] < 0:
        raise corrupt(path, f"bad offsets for {name!r}")
    return offsets[0], offsets[1]
