"""Regression gate for the block-copy benchmarks, on ratios from one run.

Usage: python bench/gate.py RESULTS.json

Fails (exit 1) when, for 32 blocks x 48 layers, the native gather's median
throughput is below 85% of the memcpy ceiling, or less than 3x the naive
per-layer concatenate. Absolute times are not gated: this machine is shared.
"""

from __future__ import annotations

import json
import sys

GATED_GROUP = "32 blocks x 48 layers"
MIN_CEILING_RATIO = 0.85
MIN_NAIVE_SPEEDUP = 3.0


def medians(results: dict, group: str) -> dict[str, float]:
    return {
        b["name"].split("[")[0]: b["stats"]["median"] for b in results["benchmarks"] if b["group"] == group
    }


def check(results: dict) -> list[str]:
    """Return the failed checks, each as a sentence; empty when all pass."""
    m = medians(results, GATED_GROUP)
    needed = ["test_gather_native", "test_gather_memcpy_ceiling", "test_gather_naive_concat"]
    missing = [n for n in needed if n not in m]
    if missing:
        return [f"missing benchmarks in {GATED_GROUP!r}: {', '.join(missing)}"]
    native = m["test_gather_native"]
    ceiling_ratio = m["test_gather_memcpy_ceiling"] / native
    naive_speedup = m["test_gather_naive_concat"] / native
    print(f"{GATED_GROUP}: native/memcpy throughput = {ceiling_ratio:.2f} (need >= {MIN_CEILING_RATIO})")
    print(f"{GATED_GROUP}: native speedup over naive = {naive_speedup:.1f}x (need >= {MIN_NAIVE_SPEEDUP})")
    failures = []
    if ceiling_ratio < MIN_CEILING_RATIO:
        failures.append(f"native gather reaches only {ceiling_ratio:.0%} of the memcpy ceiling")
    if naive_speedup < MIN_NAIVE_SPEEDUP:
        failures.append(f"native gather is only {naive_speedup:.1f}x the naive concatenate")
    return failures


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print(__doc__, file=sys.stderr)
        return 2
    with open(argv[1]) as f:
        failures = check(json.load(f))
    for failure in failures:
        print(f"GATE FAILED: {failure}", file=sys.stderr)
    if not failures:
        print("gate passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
