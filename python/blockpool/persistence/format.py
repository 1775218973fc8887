"""The agent file format: one safetensors file per agent, verified on load.

A file holds, per layer, the tokens the agent's blocks hold (only valid
tokens, not whole blocks) in the pool's storage planes (K and V, or packed
K and V with their scales and biases when the pool is quantized: stored as
they are, so a 4-bit agent takes about a quarter of the disk), the token
ids, and metadata: the format version, the agent id, the model
fingerprint, the cache layout, the quantization, and a SHA-256 checksum
over the data and the metadata.

Loading checks, in order: the container (:mod:`.safetensors_io`), the
checksum, the format version, then the structure against its own metadata
(each layer's stored span against what its cache kind needs), before any
array reaches the pool.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx.utils import tree_flatten

from blockpool.errors import IncompatibleCacheError
from blockpool.persistence.safetensors_io import (
    Described,
    check_table,
    corrupt,
    digest_data,
    layout,
    open_regular,
    parse_header,
    read_arrays,
    read_tensor,
    write_atomic,
)
from blockpool.spec import ModelCacheSpec

#: 2 adds recurrent-state snapshots (``positions``); files of version 1 (attention only) still load.
FORMAT_VERSION = 2
READABLE_VERSIONS = ("1", "2")
SUFFIX = ".safetensors"
METADATA_KEYS = (
    "format",
    "format_version",
    "agent_id",
    "fingerprint",
    "spec",
    "first_token",
    "ring_index",
    "kv_bits",
    "kv_group_size",
    "checksum",
)


@dataclass
class AgentFile:
    """The contents of one agent file, as plain arrays."""

    agent_id: str
    fingerprint: str
    spec: ModelCacheSpec
    token_ids: list[int]
    first_token: list[int]  # per layer: position of the first stored token
    # per layer: a token layer's plane name -> [1, H, T_layer, d] (an mx.array, or block-backed rows);
    # a state layer's "<snapshot>.s<slot>" -> the slot's array, one snapshot per position in ``positions``
    planes: list[dict[str, Any]]
    ring_index: dict[int, int]
    kv_bits: int | None = None
    kv_group_size: int = 64
    positions: dict[int, list[int]] = field(default_factory=dict)  # per state layer: its snapshots' positions
    has_data: bool = True  # False: read with load_agent_header, its K/V and states still on disk

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for layer in self.planes for a in layer.values())

    def valid_start(self, layer_id: int) -> int:
        """The first position a token layer's stored tokens hold."""
        return self.first_token[layer_id]

    def state_at(self, layer_id: int, position: int) -> list[mx.array | None]:
        """A state layer's snapshot at ``position`` (``KeyError`` if it has none there)."""
        j = self.positions[layer_id].index(position)
        shapes = self.spec.layers[layer_id].geometry.shapes
        return [self.planes[layer_id][f"{j}.s{k}"] if shape else None for k, shape in enumerate(shapes)]


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


def file_tensors(file: AgentFile) -> dict[str, Any]:
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
        "positions": json.dumps({str(k): v for k, v in file.positions.items()}),
    }


def save_agent_file(path: Path, file: AgentFile) -> int:
    """Write ``file`` to ``path`` atomically. Returns the bytes written.

    Raises:
        PersistenceError: The write failed; no temporary file is left and
            the file at ``path`` (if any) is as it was.
    """
    table, chunks, digest = layout(file_tensors(file))
    metadata = file_metadata(file)
    metadata["checksum"] = _checksum(digest, metadata)
    return write_atomic(path, table, metadata, chunks)


def _checksum(data_digest: Any, metadata: dict[str, str]) -> str:
    """The data's digest sealed with the metadata (all but the checksum itself)."""
    digest = data_digest.copy()
    digest.update(json.dumps({k: v for k, v in metadata.items() if k != "checksum"}, sort_keys=True).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------ reading


def read_header(path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    """Parse and check a file's header without reading its data.

    Returns:
        The tensor table, the metadata, and where the data starts.

    Raises:
        CacheCorruptionError: Not a well-formed blockpool agent file.
        PersistenceError: The file cannot be read.
    """
    f, size = open_regular(Path(path))
    with f:
        return _read_header(f, size, Path(path))


def _read_header(f: Any, size: int, path: Path) -> tuple[dict[str, Any], dict[str, str], int]:
    header, length = parse_header(f, size, path)
    if not isinstance(header.get("__metadata__"), dict):
        raise corrupt(path, "no metadata")
    metadata = header.pop("__metadata__")
    if metadata.get("format") != "blockpool-agent" or not all(isinstance(v, str) for v in metadata.values()):
        raise corrupt(path, "not a blockpool agent file")
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise corrupt(path, f"metadata lacks {missing}")
    check_table(header, size - 8 - length, path)
    return header, metadata, 8 + length


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
    f, size = open_regular(path)
    with f:
        table, metadata, data_start = _read_header(f, size, path)
        arrays, digest = read_arrays(f, table, data_start, path)
    if _checksum(digest, metadata) != metadata.get("checksum"):
        raise corrupt(path, "checksum mismatch")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise IncompatibleCacheError(
            f"{path}: format version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    try:
        file = _structure(metadata, arrays)
    except (
        KeyError,
        ValueError,
        TypeError,
        AttributeError,
        IndexError,
        RecursionError,
    ) as e:  # checksummed, yet inconsistent
        raise corrupt(path, f"inconsistent contents ({e})") from e
    _check_model(file, path, fingerprint, spec)
    return file


def load_agent_header(path: Path, fingerprint: str | None = None, spec: ModelCacheSpec | None = None) -> AgentFile:
    """Verify a file as :func:`load_agent_file` does (the checksum over its data, streamed: nothing of
    it is kept), and return its header and token ids without its K/V data: what a store needs to
    choose how much of an agent to resume before there is room to hold the rest. The result has
    ``has_data=False`` and no planes.

    Raises:
        CacheCorruptionError, IncompatibleCacheError, PersistenceError: As :func:`load_agent_file`.
    """
    path = Path(path)
    f, size = open_regular(path)
    with f:
        table, metadata, data_start = _read_header(f, size, path)
        digest = digest_data(f, table, data_start, path)
        ids = read_tensor(f, table, data_start, "token_ids", path)
    if _checksum(digest, metadata) != metadata.get("checksum"):
        raise corrupt(path, "checksum mismatch")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise IncompatibleCacheError(
            f"{path}: format version {metadata.get('format_version')!r}, expected {FORMAT_VERSION}"
        )
    described: dict[str, Any] = {name: Described(entry) for name, entry in table.items()}
    described["token_ids"] = ids
    try:
        file = _structure(metadata, described)
    except (KeyError, ValueError, TypeError, AttributeError, IndexError, RecursionError) as e:
        raise corrupt(path, f"inconsistent contents ({e})") from e
    _check_model(file, path, fingerprint, spec)
    file.planes = [{} for _ in file.planes]
    file.has_data = False
    return file


def _check_model(file: AgentFile, path: Path, fingerprint: str | None, spec: ModelCacheSpec | None) -> None:
    if fingerprint is not None and file.fingerprint != fingerprint:
        raise IncompatibleCacheError(f"{path} was written for another model (fingerprint {file.fingerprint})")
    if spec is not None and file.spec != spec:
        raise IncompatibleCacheError(f"{path} was written for another cache layout")


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
    if (
        kv_bits not in (None, 4, 8)
        or isinstance(kv_bits, bool)
        or kv_group_size not in (32, 64, 128)
        or isinstance(kv_group_size, bool)
    ):
        raise ValueError(f"unknown quantization kv_bits={kv_bits!r}, kv_group_size={kv_group_size!r}")

    ids = arrays["token_ids"]
    if ids.ndim != 1 or ids.dtype != mx.int32:
        raise ValueError(f"token_ids is {ids.dtype} {tuple(ids.shape)}, expected 1-D int32")
    token_ids = ids.tolist()
    if any(t < 0 for t in token_ids):
        raise ValueError("negative token ids")
    total = len(token_ids)

    first_token = json.loads(metadata["first_token"])
    if (
        not isinstance(first_token, list)
        or len(first_token) != spec.num_layers
        or not all(type(t) is int for t in first_token)
    ):
        raise ValueError(f"first_token must list one integer position per layer ({spec.num_layers})")
    for i in range(spec.num_layers):
        # A token layer's stored tokens must start at or before the first position its kind needs.
        kind = spec.kind(i)
        needed = kind.first_needed(total) if kind.storage == "tokens" else 0
        if not 0 <= first_token[i] <= needed:
            raise ValueError(
                f"{kind.label} layer {i} starts at token {first_token[i]}; "
                f"with {total} tokens it must hold those from {needed} on"
            )
    positions = _positions(metadata, spec, total)

    ring_raw = json.loads(metadata["ring_index"])
    if not isinstance(ring_raw, dict):
        raise ValueError("ring_index is not a JSON object")
    ring_index = {}
    for key, value in ring_raw.items():
        if not re.fullmatch(r"\d+", key) or int(key) >= spec.num_layers:
            raise ValueError(f"ring_index names layer {key!r}, the layout has {spec.num_layers}")
        layer_id = int(key)
        kind = spec.kind(layer_id)
        try:
            kind.check_ring_index(value, total)
        except ValueError as e:
            raise ValueError(f"ring_index of {kind.label} layer {layer_id}: {e}") from None
        ring_index[layer_id] = value

    expected = {"token_ids"}
    planes = []
    for i, layer in enumerate(spec.layers):
        g, layer_planes = layer.geometry, {}
        if layer.kind.storage == "state":
            wanted = {
                f"{j}.{name}": (tuple(shape), dtype)
                for j in range(len(positions[i]))
                for name, (shape, dtype) in g.planes().items()
            }
        else:
            tokens = total - first_token[i]
            wanted = {
                n: ((1, g.kv_heads, tokens, dim), dtype) for n, (dim, dtype) in g.planes(kv_bits, kv_group_size).items()
            }
        for name, (shape, dtype) in wanted.items():
            array = arrays[f"layers.{i}.{name}"]
            expected.add(f"layers.{i}.{name}")
            state = layer.kind.storage == "state"  # a state slot may be below its full size
            if state:
                fits = array.ndim == len(shape) and all(a <= b for a, b in zip(array.shape, shape))
            else:
                fits = tuple(array.shape) == shape
            if not fits or array.dtype != getattr(mx, dtype):
                raise ValueError(
                    f"layer {i} plane {name} is {array.dtype} {tuple(array.shape)}, expected {dtype} {shape}"
                )
            layer_planes[name] = array
        planes.append(layer_planes)
    extra = sorted(set(arrays) - expected)
    if extra:
        raise ValueError(f"tensors the layout does not have: {extra[:5]}")
    return AgentFile(
        agent_id,
        metadata["fingerprint"],
        spec,
        token_ids,
        first_token,
        planes,
        ring_index,
        kv_bits,
        kv_group_size,
        positions,
    )


def _positions(metadata: dict[str, str], spec: ModelCacheSpec, total: int) -> dict[int, list[int]]:
    """Each state layer's snapshot positions: increasing, within the history, the last at its end."""
    raw = json.loads(metadata.get("positions", "{}"))
    if not isinstance(raw, dict) or set(raw) != {str(i) for i in spec.state_layers}:
        raise ValueError(f"positions must name exactly the recurrent layers {spec.state_layers}")
    positions = {}
    for key, value in raw.items():
        if not isinstance(value, list) or not all(type(p) is int for p in value):
            raise ValueError(f"positions of layer {key} are not a list of integers")
        if any(b <= a for a, b in zip(value, value[1:])) or any(p < 1 or p > total for p in value):
            raise ValueError(f"positions of layer {key} are not increasing within {total} tokens")
        if total and (not value or value[-1] != total) or not total and value:
            raise ValueError(f"layer {key} has no snapshot at its last token ({total})")
        positions[int(key)] = value
    return positions
