"""The blockpool command (the drop-in functions are tested in test_drop_ins.py)."""

from __future__ import annotations

import os

import mlx.core as mx
import pytest

import tiny_models
from agent_files import synthetic_file
from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from blockpool.cli import main
from blockpool.persistence import agent_file_name, save_agent_file
from cli_runner import run_cli

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "/no/such/dir"], "not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_no_traceback(tmp_path, args, message):
    result = run_cli(*args, env_extra={"XDG_CACHE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockpool: error:") and message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_inspect_lists_agents_and_flags_a_corrupt_file(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=16)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool), cache_dir=tmp_path)
    for agent in ("alpha", "beta"):
        memory.submit(agent, mx.random.randint(3, 500, (70,)).tolist(), max_tokens=4)
        list(memory.step())
    memory.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    broken = bytearray(files[1].read_bytes())
    broken[-5] ^= 0x40
    files[1].write_bytes(bytes(broken))
    (tmp_path / f".{files[0].name}.123.456.tmp").write_bytes(b"partial")  # as an interrupted save names it

    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 1, result.stderr  # one agent file is corrupt
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["file", "agent", "tokens", "bytes"]
    ok = [line for line in lines if line.endswith(" ok")]
    assert len(ok) == 1 and ("alpha" in ok[0] or "beta" in ok[0]) and f" {memory.fingerprint[:16]} " in ok[0]
    assert ok[0].split()[2:6] == [
        "74",
        str(files[0].stat().st_size),
        "32",
        "2",
    ]  # tokens, bytes, float32 values, format 2
    assert any("corrupt: checksum mismatch" in line for line in lines)
    assert any("partial write" in line for line in lines)
    assert lines[-1].startswith("2 agent files: 1 ok, 1 corrupt, 0 incompatible; ignored: 1 partial writes")
    assert files[1].exists()  # inspect changes nothing


def inspect_in_process(capsys, *args: str) -> tuple[int, str]:
    """``blockpool inspect ARGS`` through the command's own entry point, in this process: (exit status, stdout)."""
    try:
        status = main(["inspect", *args])
    except SystemExit as e:  # --help
        status = e.code
    return status, capsys.readouterr().out


def test_inspect_on_a_model_directory_finds_no_agent_files(tmp_path, capsys):
    model_dir = tiny_models.write_model_dir(tmp_path / "model", "llama")
    status, out = inspect_in_process(capsys, str(model_dir))
    assert status == 0, out
    lines = out.splitlines()[1:-1]
    assert {"model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json"} <= {
        line.split()[0] for line in lines
    }
    assert all(line.endswith("not an agent file") for line in lines)
    assert out.splitlines()[-1].startswith("0 agent files: 0 ok, 0 corrupt")


def test_inspect_exit_statuses_are_documented_and_kept(tmp_path, capsys):
    status, help_text = inspect_in_process(capsys, "--help")
    assert status == 0 and "exit status" in help_text and all(f"  {code}  " in help_text for code in (0, 1, 2))
    cache = tmp_path / "agents"
    cache.mkdir()
    assert inspect_in_process(capsys, str(cache))[0] == 0  # empty
    save_agent_file(cache / agent_file_name("a"), synthetic_file(40, marker=1))
    (cache / "notes.txt").write_text("mine")
    (cache / f"{agent_file_name('b')}.corrupt-20250101-000000-1").write_bytes(b"set aside earlier")
    status, out = inspect_in_process(capsys, str(cache))
    assert status == 0, out  # one ok agent; the rest is ignored
    assert [line.split()[4] for line in out.splitlines() if line.endswith(" ok")] == ["16"]  # bfloat16 values
    assert "set aside by a store" in out and "not an agent file" in out
    (cache / agent_file_name("c")).write_bytes(b"\x00" * 20)
    assert inspect_in_process(capsys, str(cache))[0] == 1
    assert inspect_in_process(capsys, str(tmp_path / "missing"))[0] == 2


def test_inspect_never_follows_links_or_opens_fifos(tmp_path):
    cache, outside = tmp_path / "agents", tmp_path / "outside"
    cache.mkdir()
    outside.mkdir()
    save_agent_file(outside / "x.safetensors", synthetic_file(40, marker=2))  # a valid file, outside the directory
    os.symlink(outside / "x.safetensors", cache / agent_file_name("linked"))
    os.mkfifo(cache / agent_file_name("fifo"))
    result = run_cli("inspect", str(cache), timeout=60)  # a FIFO that were opened would block here
    assert result.returncode == 1
    lines = result.stdout.splitlines()
    assert any("not a regular file (a symbolic link)" in line for line in lines)
    assert any("not a regular file (a FIFO)" in line for line in lines)
    assert not any(line.endswith(" ok") for line in lines)  # the linked file was not read
    assert lines[-1].startswith("2 agent files: 0 ok, 2 corrupt")
