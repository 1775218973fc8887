"""``blockpool demo``: the main job of the README, run as a user runs it."""

from __future__ import annotations

import json

import pytest

from cli_runner import run_cli

pytestmark = pytest.mark.integration


def test_demo_runs_and_writes_its_table_and_plot(tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "demo",
        "-n",
        "2",
        "-t",
        "2",
        "--max-tokens",
        "8",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "agents"),
        env_extra={"XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "stdlib-llama-4m" in result.stdout  # the shipped trained model is the default
    assert "meaningless" not in result.stdout
    replies = [line.split("> ", 1)[1] for line in result.stdout.splitlines() if line.lstrip().startswith("> ")]
    assert sum(reply.startswith("def ") for reply in replies) >= 2  # the agents answer each task with Python
    records = json.loads((out / "results.json").read_text())
    assert len(records) == 4 and {r["agent"] for r in records} == {"planner", "coder"}
    assert {r["cache"] for r in records[2:]} <= {"pool", "disk"}  # second turns resume
    assert all(r["cold_ttft_ms"] > 0 for r in records)
    assert (out / "summary.md").read_text().startswith("| cache |")
    assert (out / "ttft.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert list((tmp_path / "agents").glob("*.safetensors"))  # caches persist
    # Both timed paths ran once before the table, on a prompt that shares nothing with the agents,
    # so the first cold row carries no one-time costs; the warm-up agent leaves no file behind.
    assert "warm-up:" in result.stdout and records[0]["cache"] == "cold" and records[0]["reused_tokens"] == 0
    assert len(list((tmp_path / "agents").glob("*.safetensors"))) == 2

    again = run_cli(
        "demo",
        "-n",
        "2",
        "-t",
        "1",
        "--max-tokens",
        "4",
        "--no-cold",
        "--no-text",
        "--out",
        str(out),
        "--cache-dir",
        str(tmp_path / "agents"),
        env_extra={"XDG_CACHE_HOME": str(tmp_path / "xdg")},
    )
    assert again.returncode == 0, again.stderr[-2000:]
    assert "task:" not in again.stdout and "> def" not in again.stdout
    assert {r["cache"] for r in json.loads((out / "results.json").read_text())} == {"disk"}  # a new process resumes


@pytest.mark.parametrize(
    "args, message",
    [
        (["demo", "--model", "/no/such/model"], "not found"),
        (["demo", "--model", "no-such-org/no-such-model-xyz"], "cannot load model"),
        (["demo", "-n", "0"], "must be at least 1"),
        (["demo", "-t", "-2"], "must be at least 1"),
        (["demo", "-n", "three"], "whole number"),
    ],
)
def test_bad_demo_arguments_are_one_line_and_no_traceback(tmp_path, args, message):
    result = run_cli(*args, env_extra={"XDG_CACHE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockpool: error:") and message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_unwritable_cache_directory(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("demo", "--cache-dir", str(blocker / "agents"), env_extra={"XDG_CACHE_HOME": str(tmp_path)})
    assert result.returncode == 2
    assert result.stderr.strip().startswith("blockpool: error: cache directory") and "not writable" in result.stderr
    assert "Traceback" not in result.stderr
