"""``blockpool inspect``: list the agents persisted in a cache directory and verify them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from blockpool.cli import UsageError

HELP = "list the agents persisted in a cache directory and verify them"


def add_arguments(parser: Any) -> None:
    """The ``blockpool inspect`` arguments."""
    parser.add_argument("cache_dir", type=Path)


def run(args: Any) -> int:
    """Print one line per file: agent, tokens, bytes, bits, format, fingerprint and status."""
    if not args.cache_dir.is_dir():
        raise UsageError(f"cache directory {args.cache_dir} not found")
    from blockpool.persistence import describe_cache_dir

    reports = describe_cache_dir(args.cache_dir)
    if not reports:
        print(f"{args.cache_dir}: no files")
        return 0
    print(f"{'file':<48} {'agent':<20} {'tokens':>7} {'bytes':>10} {'bits':>4} {'fmt':>3} {'fingerprint':<16} status")
    for r in reports:
        agent = (r.agent_id or "-")[:20].encode("unicode_escape").decode()
        tokens = r.tokens if r.tokens is not None else "-"
        bits = r.kv_bits or (16 if r.status == "ok" else "-")
        print(f"{r.name[:48]:<48} {agent:<20} {tokens:>7} {r.size_bytes:>10} {bits:>4} {r.format_version or '-':>3} "
              f"{(r.fingerprint or '-')[:16]:<16} {r.status}")
    return 0
