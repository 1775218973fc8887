"""Regression gate for the benchmarks, on ratios of medians measured in one run.

Usage: python bench/gate.py RESULTS.json

Absolute times are not gated: this machine is shared and noisy. Each check
compares two benchmarks of the same run. Exit 1 if any check fails or a
benchmark it needs is missing.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass


@dataclass(frozen=True)
class Check:
    """median(slow) / median(fast) must be at least ``minimum``.

    A name is a benchmark test (its median), or ``test:key`` for a median
    (in ms) that a paired benchmark stored in its extra_info.
    """

    what: str
    group: str
    fast: str
    slow: str
    minimum: float


PAIRED_TTFT = "test_ttft_warm_engine_vs_mlx_lm_prompt_cache"
PAIRED_DECODE = "test_decode_8_agents_engine_vs_batch_generator"
CHECKS = [
    Check("native gather throughput vs one numpy.copyto (>= 0.85)", "32 blocks x 48 layers",
          "test_gather_native", "test_gather_memcpy_ceiling", 0.85),
    Check("native gather speedup over per-layer mx.concatenate (>= 3x)", "32 blocks x 48 layers",
          "test_gather_native", "test_gather_naive_concat", 3.0),
    Check("warm TTFT vs mlx-lm prompt-cache reuse (engine at most 1.3x slower)", "TTFT, 4096 cached + 16 new tokens",
          f"{PAIRED_TTFT}:engine_median_ms", f"{PAIRED_TTFT}:mlx_lm_median_ms", 1 / 1.3),
    Check("warm TTFT speedup over cold prefill (>= 20x)", "TTFT, 4096 cached + 16 new tokens",
          f"{PAIRED_TTFT}:engine_median_ms", "test_ttft_cold_prefill", 20.0),
    Check("8-agent decode vs mlx-lm BatchGenerator (engine overhead at most 10%)", "decode, 8 agents x 64 tokens",
          f"{PAIRED_DECODE}:engine_median_ms", f"{PAIRED_DECODE}:batch_generator_median_ms", 1 / 1.1),
]


def medians(results: dict) -> dict[tuple[str, str], float]:
    """Medians in seconds, by (group, name) and (group, "test:key") for paired medians."""
    out = {}
    for b in results["benchmarks"]:
        name = b["name"].split("[")[0]
        out[(b["group"], name)] = b["stats"]["median"]
        for key, value in b["extra_info"].items():
            if key.endswith("_median_ms"):
                out[(b["group"], f"{name}:{key}")] = value / 1e3
    return out


def check(results: dict) -> list[str]:
    """Print each ratio; return the failed checks as sentences (empty when all pass)."""
    m = medians(results)
    failures = []
    for c in CHECKS:
        fast, slow = m.get((c.group, c.fast)), m.get((c.group, c.slow))
        if fast is None or slow is None:
            failures.append(f"{c.what}: missing {c.fast} or {c.slow} in group {c.group!r}")
            continue
        ratio = slow / fast
        status = "ok" if ratio >= c.minimum else "FAIL"
        print(f"[{status}] {c.what}: ratio {ratio:.2f} (need >= {c.minimum:.2f})")
        if ratio < c.minimum:
            failures.append(f"{c.what}: ratio {ratio:.2f} < {c.minimum:.2f}")
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
