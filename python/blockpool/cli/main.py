"""The ``blockpool`` command: a registry of subcommands.

Each subcommand lives in the module that owns its concept and provides
``HELP`` (one line), ``add_arguments(parser)`` and ``run(args) -> int``.
This module only dispatches, and holds the argument helpers they share.
Bad input gives one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from pathlib import Path
from typing import Any

#: Subcommand name -> the module that implements it, in ``--help`` order.
COMMANDS: dict[str, str] = {
    "demo": "blockpool.cli.demo",
    "inspect": "blockpool.cli.inspect",
    "bench": "blockpool.cli.report",
    "doctor": "blockpool.cli.doctor",
    "serve": "blockpool.server.command",
}


class UsageError(Exception):
    """A bad command line or environment: reported in one line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(message)


def positive_int(value: str) -> int:
    """argparse type: a whole number of at least 1."""
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def writable_dir(path: Path, what: str) -> Path:
    """Create ``path`` if needed and check that files can be written there.

    Raises:
        UsageError: It cannot be created or written.
    """
    path = Path(path).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{what} {path} is not writable ({e.strerror or e})") from None
    return path


def load_model(model_ref: str) -> tuple[Any, Any]:
    """``mlx_lm.load`` a local path or a Hugging Face repo id, failing in one line.

    Raises:
        UsageError: The path does not exist and is not a repo id, or loading failed.
    """
    from mlx_lm import load

    local = Path(model_ref).expanduser()
    if not local.exists() and (model_ref.startswith((".", "/", "~")) or model_ref.count("/") != 1):
        raise UsageError(f"model {model_ref!r} not found: not a directory here, and not a Hugging Face repo id")
    try:
        return load(str(local) if local.exists() else model_ref)
    except Exception as e:  # loading failures come in many types: report them in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load model {model_ref!r}: {first}") from None


def build_parser() -> argparse.ArgumentParser:
    """The full parser, every subcommand registered from its module."""
    parser = _Parser(
        prog="blockpool", description="Block-pooled, persistent KV caches for multi-agent inference on MLX."
    )
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, module_name in COMMANDS.items():
        module = importlib.import_module(module_name)
        sub = commands.add_parser(name, help=module.HELP, description=module.HELP)
        module.add_arguments(sub)
        sub.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``blockpool`` command; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        return int(args._run(args) or 0)
    except UsageError as e:
        print(f"blockpool: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockpool: interrupted", file=sys.stderr)
        return 130
