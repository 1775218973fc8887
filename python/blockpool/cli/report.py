"""Benchmark results (pytest-benchmark JSON) as markdown tables and PNG plots."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from blockpool.cli import UsageError, writable_dir

HELP = "run the benchmarks and write JSON, a markdown table and plots"

# Apple GPU memory bandwidths used for the projection (vendor figures, GB/s).
APPLE_BANDWIDTH_GBPS = {"M4 (120 GB/s)": 120, "M4 Pro (273 GB/s)": 273, "M4 Max (546 GB/s)": 546}


def _method(bench: dict[str, Any]) -> str:
    return bench["name"].removeprefix("test_")


def timing_table(results: dict[str, Any]) -> str:
    """Every benchmark: median, tail percentiles, throughput."""
    rows = [
        "| group | benchmark | median ms | p95 ms | p99 ms | GB/s | tokens/s | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in results["benchmarks"]:
        info, stats = b["extra_info"], b["stats"]
        gbps = f"{info['gb_per_s']:.2f}" if "gb_per_s" in info else "-"
        tps = f"{info['tokens_per_s']:.0f}" if "tokens_per_s" in info else "-"
        p95 = f"{info['p95_ms']:.2f}" if "p95_ms" in info else "-"
        p99 = f"{info['p99_ms']:.2f}" if "p99_ms" in info else "-"
        rows.append(
            f"| {b['group']} | {_method(b)} | {stats['median'] * 1e3:.2f} "
            f"| {p95} | {p99} | {gbps} | {tps} | {stats['rounds']} |"
        )
    return "\n".join(rows)


def projection_table(results: dict[str, Any]) -> str:
    """Bytes each native copy moves, divided by Apple GPU bandwidths. A projection, not a measurement."""
    rows = [
        "| group | benchmark | bytes moved | " + " | ".join(APPLE_BANDWIDTH_GBPS) + " |",
        "|---|---|---:|" + "---:|" * len(APPLE_BANDWIDTH_GBPS),
    ]
    for b in results["benchmarks"]:
        info = b["extra_info"]
        if "native" not in b["name"] and "reconstruct[" not in b["name"] or "bytes" not in info:
            continue
        moved = info["bytes"] + info.get("bytes_read", info["bytes"])  # written + read
        cells = " | ".join(f"{moved / (bw * 1e9) * 1e3:.2f} ms" for bw in APPLE_BANDWIDTH_GBPS.values())
        rows.append(f"| {b['group']} | {_method(b)} | {moved / 2**20:.0f} MiB | {cells} |")
    return "\n".join(rows)


def paired_table(results: dict[str, Any]) -> str:
    """Benchmarks that alternate our path and mlx-lm's in one run: both medians and the ratio."""
    rows = [
        "| group | ours | median ms | p95 ms | theirs | median ms | p95 ms | ours / theirs |",
        "|---|---|---:|---:|---|---:|---:|---:|",
    ]
    for b in results["benchmarks"]:
        info = b["extra_info"]
        if "ratio" not in info:
            continue
        names = [k.removesuffix("_median_ms") for k in info if k.endswith("_median_ms")]
        ours, theirs = names[0], names[1]
        rows.append(
            f"| {b['group']} | {ours} | {info[ours + '_median_ms']:.2f} | {info[ours + '_p95_ms']:.2f} | {theirs} | "
            f"{info[theirs + '_median_ms']:.2f} | {info[theirs + '_p95_ms']:.2f} | {info['ratio']:.2f} |"
        )
    return "\n".join(rows)


def workload_table(results: dict[str, Any]) -> str:
    """The side-by-side multi-agent workloads: one row per contender, grouped by workload."""
    rows = [
        "| workload | contender | total wall s | median TTFT ms | max TTFT ms | peak KV held MiB | MLX peak / bound |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for b in results["benchmarks"]:
        info = b["extra_info"]
        if "series" not in info:
            continue
        ttfts = sorted(t for _, t in info["series"])
        median = ttfts[len(ttfts) // 2]
        bound = f"{info['peak_over_bound']:.2f}" if "peak_over_bound" in info else "-"
        rows.append(
            f"| {b['group']} | {info['contender']} | {info['wall_s']:.2f} | {median:.1f} | {ttfts[-1]:.1f} | "
            f"{info['peak_kv_bytes'] / 2**20:.2f} | {bound} |"
        )
    return "\n".join(rows)


def write_report(json_path: Path, out_dir: Path) -> list[Path]:
    """Write ``results.md`` and the plots next to the JSON; return the paths written."""
    results = json.loads(Path(json_path).read_text())
    out_dir = Path(out_dir)
    text = "## Timings\n\n" + timing_table(results) + "\n"
    if any("ratio" in b["extra_info"] for b in results["benchmarks"]):
        text += "\n## Paired runs (alternating rounds, same machine state)\n\n" + paired_table(results) + "\n"
    text += "\n## Projected at Apple GPU bandwidths (not measured)\n\n" + projection_table(results) + "\n"
    if any("series" in b["extra_info"] for b in results["benchmarks"]):
        text += "\n## Multi-agent workload, side by side\n\n" + workload_table(results) + "\n"
    md = out_dir / "results.md"
    md.write_text(text)
    written = [md]
    written += plot_results(results, out_dir)
    return written


def plot_results(results: dict[str, Any], out_dir: Path) -> list[Path]:
    """Bar charts per benchmark group, and TTFT against context for the workload."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    groups: dict[str, list[dict[str, Any]]] = {}
    for b in results["benchmarks"]:
        if "series" not in b["extra_info"]:
            groups.setdefault(b["group"], []).append(b)
    for group, benches in groups.items():
        fig, ax = plt.subplots(figsize=(7, 0.5 + 0.45 * len(benches)))
        names = [_method(b) for b in benches]
        ax.barh(names, [b["stats"]["median"] * 1e3 for b in benches])
        ax.set_xlabel("median ms (lower is better)")
        ax.set_title(group)
        if max(b["stats"]["median"] for b in benches) > 50 * min(b["stats"]["median"] for b in benches):
            ax.set_xscale("log")
        fig.tight_layout()
        path = out_dir / ("bench-" + "".join(c if c.isalnum() else "-" for c in group).strip("-") + ".png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)
    workload = [b for b in results["benchmarks"] if "series" in b["extra_info"]]
    if workload:
        fig, ax = plt.subplots(figsize=(9.5, 4.5))
        for b in workload:
            series = b["extra_info"]["series"]
            ax.plot([c for c, _ in series], [t for _, t in series], "o", label=b["extra_info"]["contender"], alpha=0.8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("time to first token (ms)")
        ax.set_yscale("log")
        ax.set_title("Multi-agent workload: time to first token by context")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        fig.tight_layout()
        path = out_dir / "workload-ttft.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# ------------------------------------------------------------------ command line


def add_arguments(parser: Any) -> None:
    """The ``blockpool bench`` flags."""
    parser.add_argument(
        "--bench-dir", type=Path, default=Path("bench"), help="the benchmark directory of a clone (default ./bench)"
    )
    parser.add_argument(
        "--results", type=Path, default=Path("bench/results"), help="results folder (default bench/results)"
    )
    parser.add_argument("-k", dest="select", help="only benchmarks matching this pytest -k expression")


def run(args: Any) -> int:
    """``blockpool bench``: run pytest-benchmark over ``--bench-dir``, then write the report."""
    if not args.bench_dir.is_dir():
        raise UsageError(
            f"benchmark directory {args.bench_dir} not found: run from a clone of mlx-blockpool, or pass --bench-dir"
        )
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        raise UsageError("the benchmarks need the test extras: pip install 'mlx-blockpool[test]'") from None
    results = writable_dir(args.results, "results folder")
    json_path = results / "results.json"
    command = [
        sys.executable,
        "-m",
        "pytest",
        str(args.bench_dir),
        "-q",
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        "--benchmark-columns=median,iqr,rounds",
    ]
    if args.select:
        command += ["-k", args.select]
    status = subprocess.call(command)
    if not json_path.exists():
        print("blockpool: error: the benchmarks wrote no results", file=sys.stderr)
        return status or 1
    written = write_report(json_path, results)
    print("wrote " + ", ".join(str(p) for p in written))
    return status
