"""``blockpool serve`` on the command line: every flag documented, bad flags and a busy port refused in one line."""

from __future__ import annotations

import socket

import pytest
from server_process import free_port

from blockpool.cli import build_parser, main
from cli_runner import run_cli

pytestmark = pytest.mark.integration


def test_help_documents_every_flag_with_its_default():
    result = run_cli("serve", "--help")
    assert result.returncode == 0
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]
    flags = [a for a in serve._actions if a.option_strings and a.dest != "help"]
    assert {a.dest for a in flags} >= {
        "model",
        "host",
        "port",
        "cache_dir",
        "memory_mb",
        "kv_bits",
        "queue_limit",
        "drain_timeout",
    }
    text = " ".join(result.stdout.split())
    for action in flags:
        assert action.option_strings[0] in text
        assert action.help and len(action.help) > 20, action.dest
    assert "default: 127.0.0.1" in text and "default: 8080" in text and "blockpool/server" in text


@pytest.mark.parametrize(
    "args, message",
    [
        (["serve"], "--model"),
        (["serve", "--model", "/no/such/model"], "not found"),
        (["serve", "--model", "x/y", "--host", "no such host name", "--allow-unauthenticated"], "cannot listen"),
        (["serve", "--model", "x/y", "--host", "0.0.0.0"], "no API key is set"),
        (["serve", "--model", "x/y", "--api-key", " "], "must not be empty"),
        (["serve", "--model", "x/y", "--header-timeout", "0"], "must be > 0"),
        (["serve", "--model", "x/y", "--max-agents", "0"], "at least 1"),
        (["serve", "--model", "x/y", "--kv-bits", "3"], "invalid choice"),
        (["serve", "--model", "x/y", "--chat-template-args", "[1]"], "JSON object"),
        (["serve", "--model", "x/y", "--memory-mb", "0"], "at least 1"),
        (["serve", "--model", "x/y", "--temp", "-1"], ">= 0"),
    ],
)
def test_bad_flags_are_one_line_and_no_traceback(tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main([*args, "--port", str(free_port())] if len(args) > 1 else args) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockpool: error:") and message in lines[0], err


def test_a_busy_port_is_refused_before_the_model_loads(model_dir, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli(
            "serve", "--model", str(model_dir), "--port", str(port), "--cache-dir", str(tmp_path), timeout=120
        )
    assert result.returncode == 2
    assert f"cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_port_out_of_range_is_refused(capsys):
    assert main(["serve", "--model", "x/y", "--port", "70000"]) == 2
    assert "at most 65535" in capsys.readouterr().err
