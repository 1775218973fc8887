"""Agent files: round trips, safe names, atomic writes, crash safety, a fuzzed loader, structure checks,
unsafe paths (links, FIFOs, directories), real write failures and the cleanup of interrupted saves."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent_files import (
    SPEC,
    call_with_timeout,
    mount_namespace_available,
    raw_parts,
    run_on_tmpfs,
    synthetic_file,
    synthetic_file_matches,
    write_raw_agent_file,
)
from blockpool import (
    AgentBlocks,
    BlockPool,
    BlockPoolError,
    BlockWrite,
    CacheCorruptionError,
    Geometry,
    IncompatibleCacheError,
    LayerSpec,
    ModelCacheSpec,
)
from blockpool.persistence import (
    AgentFile,
    PersistenceError,
    agent_file_name,
    as_array,
    export_agent,
    import_agent,
    load_agent_file,
    load_agent_header,
    quarantine,
    read_header,
    remove_stale_temp_files,
    save_agent_file,
)

TESTS_DIR = Path(__file__).resolve().parent.parent


def test_agent_round_trip_through_pool_and_disk(tmp_path):
    pool = BlockPool(SPEC, num_blocks=16)
    total = 600
    blocks = pool.reserve({0: 3, 1: 2}, "a")
    k0, v0 = (
        mx.random.normal((1, 2, total, 8)).astype(mx.bfloat16),
        mx.random.normal((1, 2, total, 4)).astype(mx.bfloat16),
    )
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


@pytest.mark.parametrize(
    "agent_id", ["../x", "/etc/passwd", "a/../../b", "nul\x00byte", "x" * 10_000, "..", ".", "é中文", " "]
)
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


def _flipped(data: bytes, flips: list[tuple[int, int]]) -> bytes:
    """``data`` with bit ``b`` of byte ``p`` (modulo its length) flipped, for each ``(p, b)``."""
    flipped = bytearray(data)
    for position, bit in {(p % len(data), b) for p, b in flips}:
        flipped[position] ^= 1 << bit
    return bytes(flipped)


def test_every_truncation_is_detected(tmp_path, valid_bytes):
    for cut in sorted(
        {0, 1, 7, 8, 9, 100, len(valid_bytes) // 2, len(valid_bytes) - 1} | set(range(0, len(valid_bytes), 997))
    ):
        with pytest.raises(CacheCorruptionError):
            _load_bytes(tmp_path, valid_bytes[:cut])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=4))
def test_bit_flips_never_load_wrong_data(tmp_path, valid_bytes, flips):
    try:
        loaded = _load_bytes(tmp_path, _flipped(valid_bytes, flips))
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


def test_a_header_read_verifies_the_data_and_keeps_none_of_it(tmp_path, valid_bytes):
    path = tmp_path / "a.safetensors"
    path.write_bytes(valid_bytes)
    full, header = load_agent_file(path, "fp", SPEC), load_agent_header(path, "fp", SPEC)
    assert full.has_data and not header.has_data and header.nbytes == 0
    assert all(planes == {} for planes in header.planes) and len(header.planes) == len(full.planes)
    for name in ("agent_id", "fingerprint", "spec", "token_ids", "first_token", "ring_index", "kv_bits", "positions"):
        assert getattr(header, name) == getattr(full, name), name
    data = bytearray(valid_bytes)
    data[-3] ^= 0x10  # in the last tensor's bytes, far from the header: only the streamed checksum sees it
    path.write_bytes(bytes(data))
    with pytest.raises(CacheCorruptionError, match="checksum"):
        load_agent_header(path)
    with pytest.raises(IncompatibleCacheError):
        path.write_bytes(valid_bytes)
        load_agent_header(path, "another model")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10**9), st.integers(0, 7)), min_size=1, max_size=3))
def test_a_header_read_refuses_exactly_what_a_full_read_refuses(tmp_path, valid_bytes, flips):
    path = tmp_path / f"f{random.getrandbits(32)}.safetensors"
    path.write_bytes(_flipped(valid_bytes, flips))
    outcomes = []
    for read in (load_agent_file, load_agent_header):
        try:
            outcomes.append(read(path, "fp", SPEC).token_ids)
        except CacheCorruptionError:
            outcomes.append("corrupt")
    assert outcomes[0] == outcomes[1]


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
        child = subprocess.Popen(
            [sys.executable, str(script), str(out), str(round_ * 10_000)], stdout=subprocess.PIPE, text=True
        )
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
    # The writers are dead: what they left half-written is stale and is removed; the agent files stay.
    left = [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert sorted(remove_stale_temp_files(out)) == sorted(left)
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]
    for path in out.glob("*.safetensors"):
        load_agent_file(path, "fp", SPEC)


# ------------------------------------------------------------------ structure: checksum-valid, yet inconsistent


def crafted(tmp_path: Path, change, file: AgentFile | None = None) -> Path:
    """A file with a valid checksum whose tensors or metadata ``change(tensors, metadata)`` altered."""
    tensors, metadata = raw_parts(file or synthetic_file(300, marker=4))
    change(tensors, metadata)
    path = tmp_path / f"crafted-{random.getrandbits(32)}.safetensors"
    write_raw_agent_file(path, tensors, metadata)
    return path


def test_the_raw_writer_writes_what_save_writes(tmp_path):
    path = crafted(tmp_path, lambda tensors, metadata: None)
    synthetic_file_matches(load_agent_file(path, "fp", SPEC), 4)


def _set(key, value):
    def change(tensors, metadata):
        metadata[key] = value if isinstance(value, str) else json.dumps(value)

    return change


def _tensor(name, make):
    def change(tensors, metadata):
        tensors[name] = make(tensors.get(name))

    return change


def _drop(name):
    def change(tensors, metadata):
        tensors.pop(name, None) if name in tensors else metadata.pop(name)

    return change


def _ring(value, total=None):
    """A ring index on the sliding layer; with ``total``, a history of that many tokens."""

    def change(tensors, metadata):
        metadata["ring_index"] = json.dumps({"1": value})

    return change


CRAFTED = {
    # the example: a full-attention layer whose first stored token is not 0
    "full layer starts late": (_set("first_token", [4, 260]), "full-attention layer 0 starts at token 4"),
    "one first_token for two layers": (_set("first_token", [0]), "one integer position per layer"),
    "first_token not a list": (_set("first_token", {"0": 0}), "one integer position per layer"),
    "first_token float": (_set("first_token", [0.0, 260]), "one integer position per layer"),
    "first_token bool": (_set("first_token", [False, 260]), "one integer position per layer"),
    "first_token not JSON": (_set("first_token", "[0, 2"), "inconsistent"),
    "sliding layer misses its window": (_set("first_token", [0, 261]), "must hold those from 260 on"),
    "negative first token": (_set("first_token", [0, -1]), "starts at token -1"),
    "token count disagrees with the planes": (
        _tensor("token_ids", lambda ids: np.concatenate([ids, ids[:1]])),
        "layer 0 plane k is",
    ),
    "token_ids 2-D": (_tensor("token_ids", lambda ids: ids.reshape(1, -1)), "expected 1-D int32"),
    "token_ids float": (_tensor("token_ids", lambda ids: ids.astype(np.float32)), "expected 1-D int32"),
    "negative token id": (
        _tensor("token_ids", lambda ids: np.where(np.arange(ids.size) == 5, -3, ids).astype(np.int32)),
        "negative token ids",
    ),
    "ring index on a full layer": (_set("ring_index", {"0": 3}), "full-attention layer 0"),
    "ring index past the window": (_ring(40), "out of range for window 40"),
    "ring index zero": (_ring(0), "out of range"),
    "ring index not an int": (_ring(2.5), "out of range"),
    "ring index of a missing layer": (_set("ring_index", {"7": 3}), "names layer '7'"),
    "ring index key not a number": (_set("ring_index", {"one": 3}), "names layer 'one'"),
    "ring_index not an object": (_set("ring_index", [3]), "not a JSON object"),
    "plane of another dtype": (_tensor("layers.0.k", lambda k: k.view(np.float16)), "plane k is"),
    "plane with another head count": (_tensor("layers.1.v", lambda v: np.concatenate([v, v], axis=1)), "plane v is"),
    "a missing plane": (_drop("layers.1.v"), "inconsistent"),
    "an extra tensor": (
        _tensor("layers.2.k", lambda _: np.zeros((1, 2, 3, 8), np.uint16)),
        "tensors the layout does not have",
    ),
    "unknown bits": (_set("kv_bits", 3), "unknown quantization"),
    "bits as a bool": (_set("kv_bits", True), "unknown quantization"),
    "unknown group size": (_set("kv_group_size", 48), "unknown quantization"),
    "agent id not a string": (_set("agent_id", 17), "not a non-empty string"),
    "empty agent id": (_set("agent_id", '""'), "not a non-empty string"),
    "layout not an object": (_set("spec", [1, 2]), "not a JSON object"),
    "layout malformed": (_set("spec", {"layers": [{"kv_heads": 2}]}), "inconsistent"),
    "metadata key missing": (_drop("first_token"), "metadata lacks"),
}


@pytest.mark.parametrize("case", sorted(CRAFTED))
def test_checksum_valid_files_that_disagree_with_their_metadata_are_corrupt(tmp_path, case):
    change, message = CRAFTED[case]
    path = crafted(tmp_path, change)
    with pytest.raises(CacheCorruptionError, match=message):
        load_agent_file(path, "fp", SPEC)


def test_a_ring_index_needs_a_full_window(tmp_path):
    short = synthetic_file(30, marker=5)  # 30 tokens: the 40-token window is not full, so no ring
    path = crafted(tmp_path, _ring(3), short)
    with pytest.raises(CacheCorruptionError, match="out of range for window 40 and 30 tokens"):
        load_agent_file(path, "fp", SPEC)
    assert load_agent_file(crafted(tmp_path, _ring(39)), "fp", SPEC).ring_index == {1: 39}  # 300 tokens: valid


def test_a_shape_whose_size_overflows_64_bits_is_corrupt(tmp_path):
    """2**32 x 2**32 elements wrap to 0 in int64: the size check must not be fooled."""
    header = {
        "token_ids": {"dtype": "I32", "shape": [2**32, 2**32], "data_offsets": [0, 0]},
        "__metadata__": {"format": "blockpool-agent"},
    }
    raw = json.dumps(header).encode()
    path = tmp_path / "overflow.safetensors"
    path.write_bytes(len(raw).to_bytes(8, "little") + raw)
    with pytest.raises(CacheCorruptionError):
        load_agent_file(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    total=st.integers(0, 700),
    firsts=st.tuples(st.integers(-5, 700), st.integers(-5, 700)),
    ring=st.one_of(st.none(), st.integers(-2, 45)),
    data=st.data(),
)
def test_whatever_loads_imports_exactly(tmp_path, total, firsts, ring, data):
    """Files consistent in their shapes but with any positions: either refused as corrupt, or loaded
    into a real pool and read back exactly. Nothing in between (no raw error at import)."""
    first = [min(max(f, 0), total) if data.draw(st.booleans()) else f for f in firsts]
    tensors = {"token_ids": np.arange(total, dtype=np.int32) % 500}
    for i, f in enumerate(first):
        n = max(total - f, 0)
        tensors[f"layers.{i}.k"] = np.full((1, 2, n, 8), 0x3F80 + i, dtype=np.uint16)  # bfloat16 1.0, 1.0078...
        tensors[f"layers.{i}.v"] = np.full((1, 2, n, 4), 0xBF80 + i, dtype=np.uint16)
    _, metadata = raw_parts(synthetic_file(10, marker=0))
    metadata["first_token"] = json.dumps(first)
    metadata["ring_index"] = json.dumps({} if ring is None else {"1": ring})
    path = tmp_path / f"p{random.getrandbits(32)}.safetensors"
    write_raw_agent_file(path, tensors, metadata)
    try:
        file = load_agent_file(path, "fp", SPEC)
    except CacheCorruptionError:
        return
    pool = BlockPool(SPEC, num_blocks=16)
    agent = import_agent(pool, file)
    again = export_agent(pool, agent, "fp")
    assert again.token_ids == file.token_ids and again.first_token == file.first_token
    for got, want in zip(again.planes, file.planes):
        assert all(mx.array_equal(as_array(got[name]), want[name]).item() for name in want)
    pool.release(agent)
    assert pool.available_blocks() == 16


# ------------------------------------------------------------------ unsafe paths: links, FIFOs, directories


def test_a_symbolic_link_is_not_followed(tmp_path):
    outside = tmp_path / "outside.safetensors"
    save_agent_file(outside, synthetic_file(50, marker=6))  # a valid agent file
    link = tmp_path / "cache" / agent_file_name("a")
    link.parent.mkdir()
    link.symlink_to(outside)
    with pytest.raises(CacheCorruptionError, match="symbolic link"):
        load_agent_file(link, "fp", SPEC)
    with pytest.raises(CacheCorruptionError, match="symbolic link"):
        read_header(link)
    moved = quarantine(link)  # the link is moved aside, its target stays
    assert moved.is_symlink() and outside.exists() and not link.exists()
    synthetic_file_matches(load_agent_file(outside, "fp", SPEC), 6)


def test_a_fifo_is_refused_without_blocking(tmp_path):
    fifo = tmp_path / agent_file_name("a")
    os.mkfifo(fifo)
    hung, box = call_with_timeout(lambda: load_agent_file(fifo, "fp", SPEC), 10, fifo)
    assert not hung, "loading a FIFO blocked"
    assert isinstance(box.get("error"), CacheCorruptionError) and "FIFO" in str(box["error"])


def test_a_directory_at_the_path_is_refused(tmp_path):
    (tmp_path / agent_file_name("a")).mkdir()
    with pytest.raises(CacheCorruptionError, match="a directory"):
        load_agent_file(tmp_path / agent_file_name("a"))


def test_a_missing_file_is_a_persistence_error_not_corruption(tmp_path):
    with pytest.raises(PersistenceError) as info:
        load_agent_file(tmp_path / "missing.safetensors")
    assert (
        info.value.errno == errno.ENOENT and isinstance(info.value, OSError) and isinstance(info.value, BlockPoolError)
    )


# ------------------------------------------------------------------ writes that fail for real


def no_temp_files(directory: Path) -> bool:
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


def test_a_directory_at_the_target_fails_cleanly(tmp_path):
    target = tmp_path / agent_file_name("a")
    target.mkdir()
    (target / "inside").write_text("kept")
    with pytest.raises(PersistenceError) as info:
        save_agent_file(target, synthetic_file(50))
    assert info.value.errno == errno.EISDIR and str(target) in str(info.value)
    assert no_temp_files(tmp_path) and (target / "inside").read_text() == "kept"


def test_a_file_in_place_of_the_directory_fails_cleanly(tmp_path):
    (tmp_path / "cache").write_text("not a directory")
    with pytest.raises(PersistenceError) as info:
        save_agent_file(tmp_path / "cache" / agent_file_name("a"), synthetic_file(50))
    assert info.value.errno == errno.ENOTDIR
    with pytest.raises(PersistenceError) as info:
        save_agent_file(tmp_path / "missing" / agent_file_name("a"), synthetic_file(50))
    assert info.value.errno == errno.ENOENT
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache"]


def test_saving_over_a_fifo_or_a_link_replaces_it_and_never_writes_through(tmp_path):
    fifo = tmp_path / agent_file_name("fifo")
    os.mkfifo(fifo)
    hung, box = call_with_timeout(lambda: save_agent_file(fifo, synthetic_file(50, marker=7)), 10, fifo)
    assert not hung and "error" not in box, box
    synthetic_file_matches(load_agent_file(fifo, "fp", SPEC), 7)

    outside = tmp_path / "outside.txt"
    outside.write_text("not yours")
    link = tmp_path / agent_file_name("link")
    link.symlink_to(outside)
    save_agent_file(link, synthetic_file(50, marker=8))
    assert not link.is_symlink() and outside.read_text() == "not yours"
    synthetic_file_matches(load_agent_file(link, "fp", SPEC), 8)


def test_a_read_only_directory_fails_cleanly(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores permission bits: the read-only cases run on a read-only mount below")
    target = tmp_path / agent_file_name("a")
    save_agent_file(target, synthetic_file(50, marker=1))
    tmp_path.chmod(0o555)
    try:
        with pytest.raises(PersistenceError) as info:
            save_agent_file(target, synthetic_file(60, marker=2))
        assert info.value.errno == errno.EACCES
    finally:
        tmp_path.chmod(0o755)
    assert no_temp_files(tmp_path)
    synthetic_file_matches(load_agent_file(target, "fp", SPEC), 1)  # the old file is intact


_FAILING_WRITER = textwrap.dedent(
    """
    import json, os, resource, sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from agent_files import synthetic_file
    from blockpool.persistence import PersistenceError, load_agent_file, save_agent_file
    directory, how = Path(sys.argv[1]), sys.argv[2]
    target = directory / "a.safetensors"
    if how != "readonly":  # the read-only mount was made with this file in it
        save_agent_file(target, synthetic_file(20, marker=1))
    if how == "fsize":
        resource.setrlimit(resource.RLIMIT_FSIZE, (8192, 8192))
    try:
        save_agent_file(target, synthetic_file(600, marker=2))
        outcome = {{"error": None}}
    except PersistenceError as e:
        outcome = {{"error": type(e).__name__, "errno": e.errno, "message": str(e)}}
    outcome["left"] = sorted(os.listdir(directory))
    outcome["old_marker"] = load_agent_file(target).agent_id
    print(json.dumps(outcome))
    """
)


def run_failing_writer(tmp_path: Path, how: str) -> dict:
    """Run ``_FAILING_WRITER`` on ``tmp_path/cache`` in a child process; its JSON outcome."""
    script = tmp_path / "writer.py"
    script.write_text(_FAILING_WRITER.format(tests=str(TESTS_DIR)))
    result = subprocess.run(
        [sys.executable, str(script), str(tmp_path / "cache"), how], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_a_file_size_limit_fails_cleanly(tmp_path):
    """RLIMIT_FSIZE: the write itself fails (EFBIG) part way through the temporary file."""
    (tmp_path / "cache").mkdir()
    outcome = run_failing_writer(tmp_path, "fsize")
    assert outcome["error"] == "PersistenceError" and outcome["errno"] == errno.EFBIG, outcome
    assert outcome["left"] == ["a.safetensors"] and outcome["old_marker"] == "agent-1"  # no temp; old file intact


needs_mounts = pytest.mark.skipif(
    not mount_namespace_available(),
    reason="needs Linux user+mount namespaces (unshare -rm) for a real tiny or read-only filesystem",
)


@needs_mounts
@pytest.mark.parametrize("how, errno_name", [("full", "ENOSPC"), ("readonly", "EROFS")])
def test_a_full_disk_or_a_read_only_filesystem_fails_cleanly(tmp_path, how, errno_name):
    """A 16 KiB tmpfs (the write runs out of space), or a tmpfs remounted read-only (even root cannot
    write), mounted in a private mount namespace."""
    mount_point = tmp_path / "cache"
    mount_point.mkdir()
    script = tmp_path / "writer.py"
    script.write_text(_FAILING_WRITER.format(tests=str(TESTS_DIR)))
    seed = [
        sys.executable,
        "-c",
        f"import sys; sys.path.insert(0, {str(TESTS_DIR)!r}); from pathlib import Path; "
        f"from agent_files import synthetic_file; from blockpool.persistence import save_agent_file; "
        f"save_agent_file(Path({str(mount_point)!r}) / 'a.safetensors', synthetic_file(20, marker=1))",
    ]
    command = [sys.executable, str(script), str(mount_point), how]
    if how == "full":
        outcome = run_on_tmpfs(mount_point, "16k", command)
    else:
        outcome = run_on_tmpfs(mount_point, "1m", command, then_read_only=seed)
    assert outcome["error"] == "PersistenceError" and outcome["errno"] == getattr(errno, errno_name), outcome
    assert outcome["left"] == ["a.safetensors"] and outcome["old_marker"] == "agent-1"  # no temp; old file intact


def test_persistence_error_is_typed_and_an_os_error():
    error = PersistenceError(errno.ENOSPC, "cannot write agent file (No space left on device)", "/x/a.safetensors")
    assert isinstance(error, BlockPoolError) and isinstance(error, OSError)
    assert error.errno == errno.ENOSPC and error.filename == "/x/a.safetensors"


# ------------------------------------------------------------------ temporary files of interrupted saves


def dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temp_files_are_removed_and_nothing_else(tmp_path):
    target = agent_file_name("a")
    save_agent_file(tmp_path / target, synthetic_file(30, marker=1))
    gone = dead_pid()
    stale = tmp_path / f".{target}.{gone}.123.tmp"  # its writer is dead
    stale.write_bytes(b"half a file")
    old = tmp_path / f".{target}.{os.getpid()}.456.tmp"  # a live writer, but untouched for two hours
    old.write_bytes(b"old")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    live = tmp_path / f".{target}.{os.getpid()}.789.tmp"  # a save in progress in a live process
    live.write_bytes(b"in progress")
    outside = tmp_path.parent / f"outside-{random.getrandbits(32)}"
    outside.write_text("not yours")
    link = tmp_path / f".{target}.{gone}.1.tmp"  # named like a temp file, but a link: never followed, kept
    link.symlink_to(outside)
    fifo = tmp_path / f".{target}.{gone}.2.tmp"
    os.mkfifo(fifo)
    (tmp_path / f".{target}.{gone}.3.tmp.d").mkdir()
    (tmp_path / "notes.tmp").write_text("a user's file, not our pattern")

    removed = remove_stale_temp_files(tmp_path)
    assert sorted(removed) == sorted([stale.name, old.name])
    assert not stale.exists() and not old.exists() and live.exists()
    assert link.is_symlink() and outside.read_text() == "not yours" and fifo.exists()
    assert (tmp_path / "notes.tmp").exists() and (tmp_path / target).exists()
    assert remove_stale_temp_files(tmp_path) == []
    outside.unlink()


def test_cleanup_of_a_missing_directory_is_a_persistence_error(tmp_path):
    with pytest.raises(PersistenceError):
        remove_stale_temp_files(tmp_path / "missing")
