"""``blockpool inspect``: list the agents persisted in a cache directory and verify them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from blockpool.cli import UsageError

HELP = "list the agents persisted in a cache directory and verify them"

#: Exit statuses, for scripts.
EXIT_OK = 0  # every agent file verified (other files are listed and ignored)
EXIT_BAD = 1  # at least one agent file is corrupt, unreadable or incompatible
# 2: usage error (no such directory, bad arguments), as for every blockpool command

EPILOG = """\
Each entry gets one line. Files that are not agent files (a model's
model.safetensors, config.json, ...) are listed as "not an agent file" and
ignored; temporary files of interrupted saves and files a store has set
aside are listed and ignored too. Nothing is changed, and symbolic links
and FIFOs are reported, never followed or opened.

exit status:
  0  every agent file verified ok (also when there are none)
  1  at least one agent file is corrupt, unreadable or incompatible
  2  usage error: no such directory, or bad arguments
"""


def add_arguments(parser: Any) -> None:
    """The ``blockpool inspect`` arguments."""
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EPILOG
    parser.add_argument("cache_dir", type=Path, help="the directory an AgentMemory writes to (its cache_dir)")


def run(args: Any) -> int:
    """Print one line per file (agent, tokens, bytes, bits per value, format, fingerprint, status) and a summary."""
    if not args.cache_dir.is_dir():
        raise UsageError(f"cache directory {args.cache_dir} not found")
    from blockpool.persistence import PersistenceError, describe_cache_dir

    try:
        reports = describe_cache_dir(args.cache_dir)
    except PersistenceError as e:
        raise UsageError(f"cannot read {args.cache_dir}: {e.strerror}") from None
    if not reports:
        print(f"{args.cache_dir}: no files")
        return EXIT_OK
    print(f"{'file':<48} {'agent':<20} {'tokens':>7} {'bytes':>10} {'bits':>4} {'fmt':>3} {'fingerprint':<16} status")
    for r in reports:
        agent = (r.agent_id or "-")[:20].encode("unicode_escape").decode()
        tokens = r.tokens if r.tokens is not None else "-"
        bits = r.bits or "-"
        name = r.name.encode("unicode_escape").decode()[:48]
        print(
            f"{name:<48} {agent:<20} {tokens:>7} {r.size_bytes:>10} {bits:>4} {r.format_version or '-':>3} "
            f"{(r.fingerprint or '-')[:16]:<16} {r.status}"
        )
    counts = {
        kind: sum(r.kind == kind for r in reports)
        for kind in ("ok", "corrupt", "incompatible", "partial", "quarantined", "other")
    }
    agents = counts["ok"] + counts["corrupt"] + counts["incompatible"]
    print(
        f"{agents} agent files: {counts['ok']} ok, {counts['corrupt']} corrupt, {counts['incompatible']} incompatible; "
        f"ignored: {counts['partial']} partial writes, {counts['quarantined']} set aside, {counts['other']} other files"
    )
    return EXIT_BAD if counts["corrupt"] or counts["incompatible"] else EXIT_OK
