"""Agent files for persistence tests: synthetic ones whose every value encodes a marker, and crafted raw ones."""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import shutil
import struct
import subprocess
import threading
from pathlib import Path

import mlx.core as mx
import numpy as np

from blockpool import Geometry, LayerSpec, ModelCacheSpec
from blockpool.persistence import AgentFile, file_metadata, file_tensors

SPEC = ModelCacheSpec((LayerSpec(Geometry(2, 8, 4, "bfloat16")), LayerSpec(Geometry(2, 8, 4, "bfloat16"), window=40)))


def synthetic_file(total: int = 300, marker: int = 0) -> AgentFile:
    """An agent file whose every value encodes ``marker``, to spot mixed-up data."""
    tokens = [(marker * 7 + i) % 500 for i in range(total)]
    first = [0, max(0, total - 40)]
    planes = [
        {
            "k": mx.full((1, 2, total - f, 8), float(marker), dtype=mx.bfloat16),
            "v": mx.full((1, 2, total - f, 4), float(-marker), dtype=mx.bfloat16),
        }
        for f in first
    ]
    return AgentFile(f"agent-{marker}", "fp", SPEC, tokens, first, planes, {})


def synthetic_file_matches(file: AgentFile, marker: int) -> AgentFile:
    """Return ``file`` if every value in it is what ``synthetic_file`` makes for ``marker``."""
    expected = synthetic_file(len(file.token_ids), marker)
    assert file.agent_id == expected.agent_id
    assert file.token_ids == expected.token_ids and file.first_token == expected.first_token
    for got, want in zip(file.planes, expected.planes):
        assert got.keys() == want.keys()
        for name in got:
            assert got[name].shape == want[name].shape and mx.array_equal(got[name], want[name]).item()
    return file


def write_raw_agent_file(path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """Write a safetensors file with a valid blockpool checksum over whatever it is given.

    This is the format written out independently of ``save_agent_file``:
    tensors laid out in name order, the checksum a SHA-256 over their bytes
    and then over the JSON (sorted keys) of the other metadata. It lets tests
    craft files that pass every check up to the structure.
    """
    codes = {
        np.dtype(np.float32): "F32",
        np.dtype(np.float16): "F16",
        np.dtype(np.uint16): "BF16",
        np.dtype(np.uint32): "U32",
        np.dtype(np.int32): "I32",
        np.dtype(np.uint8): "U8",
    }
    header, chunks, offset = {}, [], 0
    digest = hashlib.sha256()
    for name in sorted(tensors):
        array = np.ascontiguousarray(tensors[name])
        raw = array.tobytes()
        header[name] = {
            "dtype": codes[array.dtype],
            "shape": list(array.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        digest.update(raw)
        chunks.append(raw)
        offset += len(raw)
    meta = {k: v for k, v in metadata.items() if k != "checksum"}
    digest.update(json.dumps(meta, sort_keys=True).encode())
    header["__metadata__"] = {**meta, "checksum": digest.hexdigest()}
    header_bytes = json.dumps(header).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)
    Path(path).write_bytes(struct.pack("<Q", len(header_bytes)) + header_bytes + b"".join(chunks))


def raw_parts(file: AgentFile) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors (as numpy, bfloat16 as its uint16 bits) and metadata ``save_agent_file`` writes for ``file``,
    to alter before ``write_raw_agent_file``."""
    tensors = {
        name: np.array(array.view(mx.uint16) if array.dtype == mx.bfloat16 else array)
        for name, array in file_tensors(file).items()
    }
    return tensors, file_metadata(file)


def mount_namespace_available() -> bool:
    """Whether this process may make a private mount namespace (Linux ``unshare -rm``), to mount a tmpfs."""
    if shutil.which("unshare") is None:
        return False
    return subprocess.run(["unshare", "-rm", "true"], capture_output=True).returncode == 0


def run_on_tmpfs(mount_point: Path, size: str, command: list[str], *, then_read_only: list[str] | None = None) -> dict:
    """Run ``command`` in a private mount namespace where ``mount_point`` is a fresh tmpfs of ``size``.

    With ``then_read_only``, that command runs first and the tmpfs is then
    remounted read-only. Nothing outside the namespace sees the mount. The
    command prints a JSON object as its last line; it is returned.
    """
    steps = [f"mount -t tmpfs -o size={size} tmpfs {shlex.quote(str(mount_point))}"]
    if then_read_only is not None:
        steps += [shlex.join(then_read_only), f"mount -o remount,ro {shlex.quote(str(mount_point))}"]
    steps.append("exec " + shlex.join(command))
    result = subprocess.run(
        ["unshare", "-rm", "sh", "-c", " && ".join(steps)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def call_with_timeout(fn, seconds: float, fifo: Path | None = None) -> tuple[bool, dict]:
    """Run ``fn`` in a thread: ``(hung, {"result": ...} or {"error": ...})``.

    A path that is a FIFO can block a reader (or writer) forever; a test uses
    this to fail instead of hanging. If it hung on ``fifo``, the other end is
    opened once so that the blocked thread can finish.
    """
    box: dict = {}

    def target():
        try:
            box["result"] = fn()
        except BaseException as e:  # noqa: BLE001 - handed back to the test
            box["error"] = e

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    hung = thread.is_alive()
    if hung and fifo is not None:
        for flags in (os.O_WRONLY | os.O_NONBLOCK, os.O_RDONLY | os.O_NONBLOCK):
            try:
                os.close(os.open(fifo, flags))
            except OSError:
                pass
        thread.join(5)
    return hung, box
