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
checksum) before any byte of it reaches MLX. Writes go to a temporary file
that is fsynced, renamed over the target, and followed by an fsync of the
directory: after a crash the target is either the old file or the new one.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import struct
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from blockpool.block import AgentBlocks
from blockpool.errors import CacheCorruptionError, IncompatibleCacheError
from blockpool.pool import BlockPool, BlockWrite
from blockpool.spec import ModelCacheSpec

FORMAT_VERSION = 1
SUFFIX = ".safetensors"
TEMP_SUFFIX = ".tmp"
_MAX_HEADER = 64 << 20

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


@dataclass
class AgentFile:
    """The contents of one agent file, as plain arrays."""

    agent_id: str
    fingerprint: str
    spec: ModelCacheSpec
    token_ids: list[int]
    first_token: list[int]  # per layer: position of the first stored token
    planes: list[dict[str, mx.array]]  # per layer: plane name -> [1, H, T_layer, d]
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
    """Read an agent's valid tokens out of the pool as stored (every plane in one gather)."""
    spec, b, total = agent.spec, agent.spec.block_tokens, agent.total_tokens
    data = pool.read_planes({layer: blocks for layer, blocks in agent.blocks.items() if blocks}) if total else {}
    first, planes = [], []
    for layer_id, layer in enumerate(spec.layers):
        start = agent.valid_start(layer_id)
        if total:
            offset = agent.first_block(layer_id) * b
            stored = {name: a[..., start - offset : total - offset, :] for name, a in data[layer_id].items()}
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
        IncompatibleCacheError: The file's quantization is not the pool's.
    """
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
            (layer_id, reserved[layer_id], file.planes[layer_id], file.first_token[layer_id] - starts[layer_id])
            for layer_id in range(spec.num_layers)
            if total > file.first_token[layer_id]
        ]
        pool.write_planes(writes)
        valid_from = {i: file.first_token[i] for i, layer in enumerate(spec.layers) if layer.window is not None}
        return AgentBlocks(file.agent_id, spec, reserved, total, list(file.token_ids), dict(file.ring_index), valid_from)
    except Exception:
        pool.free([blk for blocks in reserved.values() for blk in blocks], file.agent_id)
        raise


# ------------------------------------------------------------------ writing


def save_agent_file(path: Path, file: AgentFile) -> int:
    """Write ``file`` to ``path`` atomically. Returns the bytes written."""
    tensors: dict[str, mx.array] = {"token_ids": mx.array(file.token_ids, dtype=mx.int32)}
    for i, layer in enumerate(file.planes):
        for name, array in layer.items():
            tensors[f"layers.{i}.{name}"] = array
    header: dict[str, Any] = {}
    chunks: list[bytes] = []
    offset = 0
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = tensors[name]
        dtype = str(array.dtype).removeprefix("mlx.core.")
        code, np_type = _DTYPES[dtype]
        raw = np.ascontiguousarray(np.asarray(array.view(mx.uint16) if dtype == "bfloat16" else array)).tobytes()
        header[name] = {"dtype": code, "shape": list(array.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        digest.update(raw)
        offset += len(raw)
    metadata = {
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
    metadata["checksum"] = _checksum(digest, metadata)
    header["__metadata__"] = metadata
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)

    path = Path(path)
    temp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}{TEMP_SUFFIX}")
    with open(temp, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)))
        f.write(header_bytes)
        for chunk in chunks:
            f.write(chunk)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temp, path)
    _fsync_dir(path.parent)
    return 8 + len(header_bytes) + offset


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


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """Parse and check a file's header without reading its data.

    Returns:
        The tensor table, the metadata, and where the data starts.

    Raises:
        CacheCorruptionError: Not a well-formed blockpool agent file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
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
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise _corrupt(path, f"unreadable header ({e})") from e
    if not isinstance(header, dict) or not isinstance(header.get("__metadata__"), dict):
        raise _corrupt(path, "no metadata")
    metadata = header.pop("__metadata__")
    if metadata.get("format") != "blockpool-agent" or not all(isinstance(v, str) for v in metadata.values()):
        raise _corrupt(path, "not a blockpool agent file")
    data_size = size - 8 - length
    end = 0
    for name, entry in sorted(header.items(), key=lambda kv: _offsets(path, kv)[0]):
        start, stop = _offsets(path, (name, entry))
        code, shape = entry.get("dtype"), entry.get("shape")
        if code not in _BY_CODE or not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
            raise _corrupt(path, f"bad entry for {name!r}")
        itemsize = np.dtype(_BY_CODE[code][1]).itemsize
        if start != end or stop - start != int(np.prod(shape, dtype=np.int64)) * itemsize:
            raise _corrupt(path, f"offsets of {name!r} do not match its shape")
        end = stop
    if end != data_size:
        raise _corrupt(path, f"data is {data_size} bytes, the header describes {end}")
    return header, metadata, 8 + length


def load_agent_file(path: Path, fingerprint: str | None = None, spec: ModelCacheSpec | None = None) -> AgentFile:
    """Read and verify an agent file.

    Raises:
        CacheCorruptionError: The file is truncated, damaged or not an agent file.
        IncompatibleCacheError: It was written for another model or cache layout.
    """
    header, metadata, data_start = read_header(path)
    digest = hashlib.sha256()
    arrays: dict[str, mx.array] = {}
    try:
        with open(path, "rb") as f:
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
        raise _corrupt(path, f"unreadable data ({e})") from e
    if _checksum(digest, metadata) != metadata.get("checksum"):
        raise _corrupt(path, "checksum mismatch")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise IncompatibleCacheError(f"{path}: format version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}")
    try:
        file_spec = ModelCacheSpec.from_dict(json.loads(metadata["spec"]))
        agent_id = json.loads(metadata["agent_id"])
        first_token = json.loads(metadata["first_token"])
        ring_index = {int(k): v for k, v in json.loads(metadata["ring_index"]).items()}
        token_ids = arrays["token_ids"].tolist()
        kv_bits, kv_group_size = json.loads(metadata["kv_bits"]), json.loads(metadata["kv_group_size"])
        planes = []
        for i, layer in enumerate(file_spec.layers):
            names = layer.geometry.planes(kv_bits, kv_group_size)
            planes.append({name: arrays[f"layers.{i}.{name}"] for name in names})
        _check_consistent(file_spec, token_ids, first_token, planes, kv_bits, kv_group_size)
    except (KeyError, ValueError, TypeError, AttributeError) as e:  # checksummed, yet inconsistent
        raise _corrupt(path, f"inconsistent contents ({e})") from e
    if fingerprint is not None and metadata["fingerprint"] != fingerprint:
        raise IncompatibleCacheError(f"{path} was written for another model (fingerprint {metadata['fingerprint']})")
    if spec is not None and file_spec != spec:
        raise IncompatibleCacheError(f"{path} was written for another cache layout")
    return AgentFile(agent_id, metadata["fingerprint"], file_spec, token_ids, first_token, planes, ring_index, kv_bits, kv_group_size)


def _check_consistent(spec: ModelCacheSpec, token_ids, first_token, planes, kv_bits, kv_group_size) -> None:
    if len(first_token) != spec.num_layers:
        raise ValueError("one first-token position per layer expected")
    if kv_bits not in (None, 4, 8) or kv_group_size not in (32, 64, 128):
        raise ValueError(f"unknown quantization kv_bits={kv_bits}, kv_group_size={kv_group_size}")
    total = len(token_ids)
    for i, layer in enumerate(spec.layers):
        g = layer.geometry
        tokens = total - first_token[i]
        if not 0 <= first_token[i] <= total:
            raise ValueError(f"layer {i} starts at token {first_token[i]} of {total}")
        for name, (dim, dtype) in g.planes(kv_bits, kv_group_size).items():
            array = planes[i][name]
            if array.shape != (1, g.kv_heads, tokens, dim) or str(array.dtype) != f"mlx.core.{dtype}":
                raise ValueError(f"layer {i} plane {name} is {array.dtype} {array.shape}")


def quarantine(path: Path) -> Path:
    """Move a bad file aside (never delete it) and return where it went."""
    path = Path(path)
    target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{time.monotonic_ns() % 10**6}")
    os.replace(path, target)
    return target


def _offsets(path: Path, item: tuple[str, Any]) -> tuple[int, int]:
    name, entry = item
    offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets)) or offsets[0] > offsets[1] or offsets[0] < 0:
        raise _corrupt(path, f"bad offsets for {name!r}")
    return offsets[0], offsets[1]


def _corrupt(path: Path, why: str) -> CacheCorruptionError:
    return CacheCorruptionError(f"{path}: {why}")


@dataclass
class FileReport:
    """What ``blockpool inspect`` shows for one file in a cache directory."""

    name: str
    status: str  # "ok", "corrupt: <why>", "partial write", or "incompatible: <why>"
    agent_id: str | None = None
    tokens: int | None = None
    size_bytes: int = 0
    fingerprint: str | None = None
    format_version: str | None = None
    kv_bits: int | None = None


def describe_cache_dir(directory: Path) -> list[FileReport]:
    """Verify every file in a cache directory (checksums included) without changing anything."""
    reports = []
    for path in sorted(Path(directory).iterdir()):
        if not path.is_file():
            continue
        size = path.stat().st_size
        if path.name.endswith(TEMP_SUFFIX):
            reports.append(FileReport(path.name, "partial write (interrupted; ignored)", size_bytes=size))
            continue
        try:
            file = load_agent_file(path)
        except (CacheCorruptionError, IncompatibleCacheError) as e:
            kind = "corrupt" if isinstance(e, CacheCorruptionError) else "incompatible"
            reports.append(FileReport(path.name, f"{kind}: {str(e).removeprefix(str(path) + ': ')}", size_bytes=size))
            continue
        _, metadata, _ = read_header(path)
        reports.append(
            FileReport(
                path.name,
                "ok",
                file.agent_id,
                len(file.token_ids),
                size,
                file.fingerprint,
                metadata.get("format_version"),
                file.kv_bits,
            )
        )
    return reports
