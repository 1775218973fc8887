"""Turn a pytest-benchmark JSON file into the markdown tables of docs/performance.md.

Usage: python bench/report.py RESULTS.json [OUT.md]
"""

from __future__ import annotations

import json
import sys

# Apple GPU memory bandwidths used for the projection (vendor figures, GB/s).
APPLE_BANDWIDTH_GBPS = {"M4 (120 GB/s)": 120, "M4 Pro (273 GB/s)": 273, "M4 Max (546 GB/s)": 546}


def table(results: dict) -> str:
    rows = [
        "| case | method | median ms | p95 ms | p99 ms | GB/s | tokens/s | rounds |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for b in results["benchmarks"]:
        info, stats = b["extra_info"], b["stats"]
        method = b["name"].split("[")[0].removeprefix("test_")
        gbps = f"{info['gb_per_s']:.2f}" if "gb_per_s" in info else "-"
        tps = f"{info['tokens_per_s']:.0f}" if "tokens_per_s" in info else "-"
        rows.append(
            f"| {b['group']} | {method} | {stats['median'] * 1e3:.2f} | {info['p95_ms']:.2f} | "
            f"{info['p99_ms']:.2f} | {gbps} | {tps} | {stats['rounds']} |"
        )
    return "\n".join(rows)


def projection(results: dict) -> str:
    rows = [
        "| case | operation | bytes moved | " + " | ".join(APPLE_BANDWIDTH_GBPS) + " |",
        "|---|---|---:|" + "---:|" * len(APPLE_BANDWIDTH_GBPS),
    ]
    for b in results["benchmarks"]:
        method = b["name"].split("[")[0].removeprefix("test_")
        if not method.endswith("native") or "bytes" not in b["extra_info"]:
            continue
        # A copy reads and writes each byte: bytes moved = 2 x bytes produced.
        moved = 2 * b["extra_info"]["bytes"]
        cells = " | ".join(f"{moved / (bw * 1e9) * 1e3:.2f} ms" for bw in APPLE_BANDWIDTH_GBPS.values())
        rows.append(f"| {b['group']} | {method} | {moved / 2**20:.0f} MiB | {cells} |")
    return "\n".join(rows)


def main(argv: list[str]) -> int:
    with open(argv[1]) as f:
        results = json.load(f)
    text = "### Measured\n\n" + table(results) + "\n\n### Projected (not measured)\n\n" + projection(results) + "\n"
    if len(argv) > 2:
        with open(argv[2], "w") as f:
            f.write(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
