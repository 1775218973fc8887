"""Agent files: round trips, safe names, atomic writes, crash safety and a fuzzed loader."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_files import SPEC, synthetic_file, synthetic_file_matches

from blockpool import (
    AgentBlocks,
    BlockPool,
    BlockWrite,
    CacheCorruptionError,
    Geometry,
    IncompatibleCacheError,
    LayerSpec,
    ModelCacheSpec,
)
from blockpool.persistence import (
    agent_file_name,
    export_agent,
    import_agent,
    load_agent_file,
    quarantine,
    read_header,
    save_agent_file,
)

def test_agent_round_trip_through_pool_and_disk(tmp_path):
    pool = BlockPool(SPEC, num_blocks=16)
    total = 600
    blocks = pool.reserve({0: 3, 1: 2}, "a")
    k0, v0 = mx.random.normal((1, 2, total, 8)).astype(mx.bfloat16), mx.random.normal((1, 2, total, 4)).astype(mx.bfloat16)
    k1, v1 = k0[..., 256:, :], v0[..., 256:, :]  # the sliding layer holds blocks 1 and 2
    pool.write([BlockWrite(0, blocks[0], k0, v0), BlockWrite(1, blocks[1], k1, v1)])
    agent = AgentBlocks("a", SPEC, blocks, total, list(range(total)), {1: 7})

    path = tmp_path / agent_file_name("a")
    written = save_agent_file(path, export_agent(pool, agent, "fp"))
    assert written == path.stat().st_size
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # nothing left behind
    loaded = load_agent_file(path, "fp", SPEC)
    assert loaded.token_ids == list(range(total)) and loaded.ring_index == {1: 7}
    assert loaded.first_token == [0, total - 40]
    assert loaded.planes[1]["k"].shape == (1, 2, 40, 8)  # only the window's valid tokens are stored

    pool.release(agent)
    back = import_agent(pool, loaded)
    data = pool.read(back.blocks)
    assert mx.array_equal(data[0][0][..., :total, :], k0).item()
    assert mx.array_equal(data[1][1][..., total - 40 - 512 : total - 512, :], v0[..., total - 40 :, :]).item()
    pool.release(back)
    assert pool.available_blocks() == 16


def test_wrong_model_or_layout_is_incompatible(tmp_path):
    path = tmp_path / "a.safetensors"
    save_agent_file(path, synthetic_file())
    with pytest.raises(IncompatibleCacheError, match="another model"):
        load_agent_file(path, "other-fingerprint", SPEC)
    other = ModelCacheSpec((LayerSpec(Geometry(2, 8, 4, "bfloat16")),) * 2)
    with pytest.raises(IncompatibleCacheError, match="layout"):
        load_agent_file(path, "fp", other)
    assert path.exists()  # an incompatible file is left where it is


@pytest.mark.parametrize("agent_id", ["../x", "/etc/passwd", "a/../../b", "nul\x00byte", "x" * 10_000, "..", ".", "é中文", " "])
def test_agent_ids_cannot_escape_the_directory(tmp_path, agent_id):
    name = agent_file_name(agent_id)
    assert "/" not in name and "\x00" not in name and not name.startswith(".") and len(name) < 100
    path = tmp_path / name
    assert path.resolve().parent == tmp_path.resolve()
    file = synthetic_file(10)
    file.agent_id = agent_id
    save_agent_file(path, file)
    assert load_agent_file(path).agent_id == agent_id
    assert agent_file_name(agent_id + "!") != name


def test_quarantine_moves_aside_never_deletes(tmp_path):
    path = tmp_path / "a.safetensors"
    path.write_bytes(b"junk")
    moved = quarantine(path)
    assert not path.exists() and moved.read_bytes() == b"junk" and ".corrupt-" in moved.name


# ------------------------------------------------------------------ fuzzing


@pytest.fixture(scope="module")
def valid_bytes(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("valid") / "a.safetensors"
    save_agent_file(path, synthetic_file(300, marker=3))
    return path.read_bytes()


def _load_bytes(tmp_path: Path, data: bytes):
    path = tmp_path / f"f{random.getrandbits(32)}.safetensors"
    path.write_bytes(data)
    return load_agent_file(path, "fp", SPEC)


def test_every_truncation_is_detected(tmp_path, valid_bytes):
    for cut in sorted({0, 1, 7, 8, 9, 100, len(valid_bytes) // 2, len(valid_bytes) - 1} | set(range(0, len(valid_bytes), 997))):
        with pytest.raises(CacheCorruptionError):
            _load_bytes(tmp_path, valid_bytes[:cut])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=4))
def test_bit_flips_never_load_wrong_data(tmp_path, valid_bytes, flips):
    data = bytearray(valid_bytes)
    for position, bit in {(p % len(data), b) for p, b in flips}:
        data[position] ^= 1 << bit
    try:
        loaded = _load_bytes(tmp_path, bytes(data))
    except CacheCorruptionError:
        return  # detected
    # Undetected only if the flips hit bytes that carry no data (JSON padding):
    # then what loads must be exactly what was written.
    synthetic_file_matches(loaded, 3)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.binary(max_size=4096))
def test_random_bytes_are_detected(tmp_path, data):
    with pytest.raises(CacheCorruptionError):
        _load_bytes(tmp_path, data)


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(length=st.integers(0, 2**64 - 1), body=st.binary(max_size=200))
def test_hostile_headers_are_detected_quickly(tmp_path, length, body):
    start = time.perf_counter()
    with pytest.raises(CacheCorruptionError):
        _load_bytes(tmp_path, length.to_bytes(8, "little") + body)
    assert time.perf_counter() - start < 1.0


def test_header_can_be_read_without_data(tmp_path):
    path = tmp_path / "a.safetensors"
    save_agent_file(path, synthetic_file(50, marker=2))
    tensors, metadata, _ = read_header(path)
    assert metadata["fingerprint"] == "fp" and "layers.0.k" in tensors and len(metadata["checksum"]) == 64


# ------------------------------------------------------------------ crash safety

_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from agent_files import synthetic_file
    from blockpool.persistence import save_agent_file
    out = Path(sys.argv[1])
    marker = int(sys.argv[2])
    print("ready", flush=True)
    while True:
        marker += 1
        for name in ("a", "b"):
            save_agent_file(out / f"{{name}}.safetensors", synthetic_file(200 + marker % 300, marker))
    """
)


def test_sigkill_while_saving_never_leaves_a_wrong_file(tmp_path):
    """A child saves in a loop and is killed with SIGKILL at random moments, many times."""
    script = tmp_path / "writer.py"
    script.write_text(_WRITER.format(tests=str(Path(__file__).resolve().parent.parent)))
    out = tmp_path / "cache"
    out.mkdir()
    rng = random.Random(1)
    checked = 0
    for round_ in range(12):
        child = subprocess.Popen([sys.executable, str(script), str(out), str(round_ * 10_000)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"  # imports done: writing starts now
        time.sleep(rng.uniform(0.01, 0.3))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        for path in out.iterdir():
            if path.name.endswith(".tmp"):
                continue  # an interrupted write: never read as an agent file
            try:
                file = load_agent_file(path, "fp", SPEC)
            except CacheCorruptionError:
                quarantine(path)  # detected and set aside
                continue
            synthetic_file_matches(file, int(file.agent_id.split("-")[1]))  # never wrong data
            checked += 1
    assert checked >= 8  # most rounds left complete files behind
