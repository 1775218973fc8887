"""The ``blockpool`` command: ``demo``, ``bench`` and ``inspect``.

Bad input gives one line on stderr and exit status 2, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from blockpool.demo_model import user_cache_dir


class UsageError(Exception):
    """A bad command line: reported in one line."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, no usage dump
        raise UsageError(message)


def _positive(value: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {value!r}") from None
    if number <= 0:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {number}")
    return number


def _writable_dir(path: Path, what: str) -> Path:
    path = path.expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise UsageError(f"{what} {path} is not writable ({e.strerror or e})") from None
    return path


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="blockpool", description="Block-pooled, persistent KV caches for multi-agent inference on MLX.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = commands.add_parser("demo", help="run a multi-agent, multi-turn scenario and show the cache at work")
    demo.add_argument("--model", help="a path or Hugging Face repo mlx_lm.load takes (default: a small random-weight demo model)")
    demo.add_argument("--agents", "-n", type=_positive, default=3, help="number of agents (default 3)")
    demo.add_argument("--turns", "-t", type=_positive, default=3, help="turns per agent (default 3)")
    demo.add_argument("--max-tokens", type=_positive, default=24, help="tokens generated per turn (default 24)")
    demo.add_argument("--budget-mb", type=_positive, help="pool size in MiB (default: about two agents, so the rest spill to disk)")
    demo.add_argument("--cache-dir", type=Path, help="where agents persist (default: the user cache directory)")
    demo.add_argument("--out", type=Path, default=Path("blockpool-demo"), help="where the table and plot go (default ./blockpool-demo)")
    demo.add_argument("--no-cold", action="store_true", help="skip the cold-prefill comparison")

    bench = commands.add_parser("bench", help="run the benchmarks and write JSON, a markdown table and plots")
    bench.add_argument("--bench-dir", type=Path, default=Path("bench"), help="the benchmark directory of a clone (default ./bench)")
    bench.add_argument("--results", type=Path, default=Path("bench/results"), help="results folder (default bench/results)")
    bench.add_argument("-k", dest="select", help="only benchmarks matching this pytest -k expression")

    inspect = commands.add_parser("inspect", help="list the agents persisted in a cache directory and verify them")
    inspect.add_argument("cache_dir", type=Path)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        if args.command == "demo":
            return _demo(args)
        if args.command == "bench":
            return _bench(args)
        return _inspect(args)
    except UsageError as e:
        print(f"blockpool: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("blockpool: interrupted", file=sys.stderr)
        return 130


def _demo(args: argparse.Namespace) -> int:
    cache_dir = _writable_dir(args.cache_dir or user_cache_dir() / "demo-agents", "cache directory")
    out_dir = _writable_dir(args.out, "output directory")
    model, tokenizer = _load(args.model)
    from tqdm import tqdm

    from blockpool.demo import run_demo

    with tqdm(total=args.agents * args.turns, desc="turns", unit="turn", leave=False, file=sys.stderr, disable=None) as bar:
        run_demo(
            model,
            tokenizer,
            agents=args.agents,
            turns=args.turns,
            max_tokens=args.max_tokens,
            budget_bytes=args.budget_mb << 20 if args.budget_mb else None,
            cache_dir=cache_dir,
            out_dir=out_dir,
            compare_cold=not args.no_cold,
            echo=tqdm.write,
            progress=bar.update,
        )
    return 0


def _load(model_ref: str | None):
    from mlx_lm import load

    if model_ref is None:
        from blockpool.demo_model import demo_model_dir

        print("model: the default demo model (llama-like, random weights, tokenizer trained here).")
        print("NOTE: its text is meaningless. It exists only to show the cache mechanics;")
        print("      pass --model with a real model (e.g. an mlx-community repo on a Mac) for real text.")
        path = demo_model_dir()
        return load(str(path))
    local = Path(model_ref).expanduser()
    if not local.exists() and (model_ref.startswith((".", "/", "~")) or model_ref.count("/") != 1):
        raise UsageError(f"model {model_ref!r} not found: not a directory here, and not a Hugging Face repo id")
    try:
        print(f"model: {model_ref}")
        return load(str(local) if local.exists() else model_ref)
    except Exception as e:  # loading failures come in many types: report them in one line
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UsageError(f"cannot load model {model_ref!r}: {first}") from None


def _bench(args: argparse.Namespace) -> int:
    if not args.bench_dir.is_dir():
        raise UsageError(f"benchmark directory {args.bench_dir} not found: run from a clone of mlx-blockpool, or pass --bench-dir")
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise UsageError("the benchmarks need the test extras: pip install 'mlx-blockpool[test]'") from None
    results = _writable_dir(args.results, "results folder")
    json_path = results / "results.json"
    command = [sys.executable, "-m", "pytest", str(args.bench_dir), "-q", "--benchmark-only", f"--benchmark-json={json_path}",
               "--benchmark-columns=median,iqr,rounds"]
    if args.select:
        command += ["-k", args.select]
    status = subprocess.call(command)
    if not json_path.exists():
        print("blockpool: error: the benchmarks wrote no results", file=sys.stderr)
        return status or 1
    from blockpool.report import write_report

    written = write_report(json_path, results)
    print("wrote " + ", ".join(str(p) for p in written))
    return status


def _inspect(args: argparse.Namespace) -> int:
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
