"""The ``blockpool serve`` flags, their parsers and the checks made on them before anything loads."""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
from pathlib import Path
from typing import Any

from blockpool.cli import UsageError, positive_int

log = logging.getLogger("blockpool.server")

#: The environment variable ``--api-key`` falls back to (so the key stays out of ``ps``).
API_KEY_ENV = "BLOCKPOOL_API_KEY"


def default_memory_mb() -> int:
    """A quarter of this machine's memory, between 256 and 4096 MiB."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1024
    return max(256, min(4096, total // 4 // (1 << 20)))


def default_cache_dir() -> Path:
    """``<user cache folder>/blockpool/server``."""
    from blockpool.demo_model import user_cache_dir

    return user_cache_dir() / "server"


def _json_object(value: str) -> dict[str, Any]:
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as e:
        raise argparse.ArgumentTypeError(f"not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise argparse.ArgumentTypeError("expected a JSON object, e.g. '{\"enable_thinking\": false}'")
    return parsed


def _port(value: str) -> int:
    number = positive_int(value)
    if number > 65535:
        raise argparse.ArgumentTypeError(f"must be at most 65535, got {number}")
    return number


def _at_least_zero(kind: type) -> Any:
    """argparse type: a number of ``kind`` (int or float) that is not negative."""

    def parse(value: str) -> Any:
        try:
            number = kind(value)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a {'whole ' if kind is int else ''}number, got {value!r}"
            ) from None
        if not number >= 0:  # NaN too
            raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
        return number

    return parse


_non_negative, _whole = _at_least_zero(float), _at_least_zero(int)


def _positive_float(value: str) -> float:
    number = _non_negative(value)
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return number


def add_arguments(parser: Any) -> None:
    """The ``blockpool serve`` flags."""
    parser.add_argument(
        "--model", required=True, help="model directory or Hugging Face repo id (anything mlx_lm.load takes); required"
    )
    parser.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: %(default)s, local clients only)"
    )
    parser.add_argument("--port", type=_port, default=8080, help="port to listen on (default: %(default)s)")
    parser.add_argument(
        "--cache-dir",
        type=Path,
        default=None,
        help="where agents are persisted (a subfolder per model, and per rank under mlx.launch); "
        f"default: {default_cache_dir()}",
    )
    parser.add_argument(
        "--memory-mb",
        type=positive_int,
        default=None,
        help="the KV budget in MiB: all agents' caches and the running batch's (per rank under mlx.launch); "
        f"default: a quarter of this machine's memory, at most 4096 (here {default_memory_mb()})",
    )
    parser.add_argument(
        "--kv-bits",
        type=int,
        choices=(8, 4),
        default=None,
        help="store resting blocks quantized to 8 or 4 bits (default: the model's dtype)",
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=512,
        help="tokens to generate when a request does not say (default: %(default)s)",
    )
    parser.add_argument(
        "--temp",
        type=_non_negative,
        default=0.0,
        help="sampling temperature when a request does not say (default: %(default)s, greedy)",
    )
    parser.add_argument(
        "--top-p",
        type=_non_negative,
        default=1.0,
        help="nucleus sampling top-p when a request does not say (default: %(default)s, off)",
    )
    parser.add_argument(
        "--top-k", type=_whole, default=0, help="top-k sampling when a request does not say (default: %(default)s, off)"
    )
    parser.add_argument(
        "--min-p",
        type=_non_negative,
        default=0.0,
        help="min-p sampling when a request does not say (default: %(default)s, off)",
    )
    parser.add_argument(
        "--max-concurrency",
        type=positive_int,
        default=32,
        help="most requests decoded together in the batch (default: %(default)s)",
    )
    parser.add_argument(
        "--queue-limit",
        type=_whole,
        default=64,
        help="most requests waiting beyond --max-concurrency; past it the answer is 429 with "
        "Retry-After (default: %(default)s)",
    )
    parser.add_argument(
        "--prefill-step-size",
        type=positive_int,
        default=2048,
        help="prompt tokens per prefill chunk (default: %(default)s)",
    )
    parser.add_argument(
        "--anonymous-agents",
        type=_whole,
        default=8,
        help="recent conversations of requests without X-Agent-Id or user kept in the pool, to resume "
        "them (default: %(default)s)",
    )
    parser.add_argument(
        "--drain-timeout",
        type=_non_negative,
        default=30.0,
        help="on SIGTERM, seconds to let requests in flight finish before cancelling them; every agent "
        "is persisted after (default: %(default)s)",
    )
    parser.add_argument(
        "--chat-template-args",
        type=_json_object,
        default={},
        help="JSON object of chat template arguments for every chat request, e.g. "
        "'{\"enable_thinking\": false}' (default: none)",
    )
    parser.add_argument(
        "--max-prompt-tokens",
        type=positive_int,
        default=None,
        help="longest prompt accepted, in tokens; longer ones get 400 (default: the model's context, "
        "max_position_embeddings or kin, when its config states one)",
    )
    parser.add_argument(
        "--max-agents",
        type=positive_int,
        default=None,
        help="most agents kept (in the pool and on disk); past it the least recently used idle agents "
        "are deleted, each deletion logged (default: no limit)",
    )
    parser.add_argument(
        "--max-disk-mb",
        type=positive_int,
        default=None,
        help="most MiB of agent files; past it the least recently used idle agents are deleted, each "
        "deletion logged (default: no limit)",
    )
    parser.add_argument(
        "--api-key",
        default=None,
        help=f"every route but /health needs 'Authorization: Bearer KEY' or 'x-api-key: KEY' (default: "
        f"${API_KEY_ENV}, else none)",
    )
    parser.add_argument(
        "--allow-unauthenticated",
        action="store_true",
        help="allow a --host other than loopback without an API key (a warning is logged)",
    )
    parser.add_argument(
        "--header-timeout",
        type=_positive_float,
        default=10.0,
        help="seconds a connection has to send a request's headers before it is closed (default: %(default)s)",
    )
    parser.add_argument(
        "--body-timeout",
        type=_positive_float,
        default=30.0,
        help="seconds a request has to send its body; past it: 408 (default: %(default)s)",
    )
    parser.add_argument(
        "--max-connections",
        type=positive_int,
        default=256,
        help="most open connections; past it new ones get 503 (default: %(default)s)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="logging level (default: %(default)s)",
    )


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local clients (``127.0.0.1``, ``::1``, ``localhost``)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_exposure(args: Any) -> None:
    """Take the API key from the environment when no flag gives it; refuse a non-loopback
    ``--host`` without a key unless ``--allow-unauthenticated`` says so (then warn).

    Raises:
        UsageError: A non-loopback host with neither a key nor ``--allow-unauthenticated``.
    """
    if args.api_key is None:
        args.api_key = os.environ.get(API_KEY_ENV) or None
    if args.api_key is not None and not args.api_key.strip():
        raise UsageError("--api-key must not be empty")
    if is_loopback(args.host) or args.api_key:
        return
    if not args.allow_unauthenticated:
        raise UsageError(
            f"--host {args.host} lets other machines in, and no API key is set: give --api-key KEY "
            f"(or set {API_KEY_ENV}), or --allow-unauthenticated to serve anyone who can reach it"
        )
    log.warning("serving on %s without an API key: anyone who can reach this address can use it", args.host)
