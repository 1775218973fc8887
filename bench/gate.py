"""Regression gate for the benchmarks, on ratios measured in one run.

Usage:
    python bench/gate.py RESULTS.json            every check (after `bash bench/run.sh`)
    python bench/gate.py --quick RESULTS.json    only the quick subset (CI)
    python bench/gate.py --quick-select          the pytest -k expression of the quick subset

Absolute times are not gated: this machine is shared and noisy. A ratio
check compares two medians of the same run (paired benchmarks alternate
their two sides round by round); a bound check compares a value a benchmark
computed from its own run (e.g. MLX's peak memory over the budget). Exit 1
if any check fails or a benchmark it needs is missing.
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
    quick: bool = False
    #: The looser floor the quick (CI) run holds, when it differs: one short run on a shared
    #: machine swings these ratios by about 0.1, so CI guards against regressions while the
    #: full run holds the target.
    quick_minimum: float | None = None


@dataclass(frozen=True)
class Bound:
    """``extra_info[key]`` of one benchmark must be at most ``maximum`` (at least ``-maximum`` when
    ``at_least``: a floor)."""

    what: str
    group: str
    test: str
    key: str
    maximum: float
    quick: bool = False
    at_least: bool = False


def Floor(what: str, group: str, test: str, key: str, minimum: float, quick: bool = False) -> Bound:  # noqa: N802
    """``extra_info[key]`` of one benchmark must be at least ``minimum``."""
    return Bound(what, group, test, key, minimum, quick, at_least=True)


PAIRED_TTFT = "test_ttft_warm_engine_vs_mlx_lm_prompt_cache"
PAIRED_DECODE = "test_decode_8_agents_engine_vs_batch_generator"
TTFT_1 = "TTFT, 4096 cached + 1 new tokens"
TTFT_16 = "TTFT, 4096 cached + 16 new tokens"
DECODE = "decode, 8 agents x 64 tokens"
SEQUENTIAL = "multi-agent workload, sequential"
CONCURRENT = "multi-agent workload, all agents at once"
HEAD_TO_HEAD = "server head to head, 6 agents x 3 turns"
PAIRED_SERVER = "test_server_head_to_head_vs_mlx_lm_server"
SIXTEEN = "server head to head, 16 agents x 4 turns"
PAIRED_SIXTEEN = "test_server_16_agents_vs_mlx_lm_server"
SHARED_PROMPT = "server, 16 new agents with one 2,000-token system prompt"
PAIRED_SHARED_PROMPT = "test_server_shared_system_prompt_16_agents"
PAIRED_HYBRID = "test_ttft_hybrid_warm_engine_vs_mlx_lm_kept_cache"
PAIRED_SHARED = "test_ttft_hybrid_shared_prefix_vs_cold"
HYBRID_TTFT = "hybrid TTFT, 4096 cached + 1 new token"
HYBRID_SHARED = "hybrid TTFT, 4096-token shared prefix + 16 new tokens"
PAGED_MEMORY = "paged: memory per running request"
PAGED_AT_ONCE = "paged: agents decoding at once in a budget"
PAGED_DECODE = "test_decode_per_token_vs_batch_generator"
PAGED_TTFT = "test_warm_ttft_vs_mlx_lm_kept_cache"


def paged_ttft(history: int, most: float, quick: bool) -> Check:
    """Warm TTFT at ``history`` cached tokens + 1 new against mlx-lm's kept cache: at most ``most`` x."""
    return Check(
        f"paged warm TTFT, {history} cached + 1 new token, vs mlx-lm's kept cache (engine at most {most}x)",
        f"paged: warm TTFT, {history} cached + 1 new token",
        f"{PAGED_TTFT}:engine_median_ms",
        f"{PAGED_TTFT}:mlx_lm_median_ms",
        1 / most,
        quick=quick,
    )


def paged_decode(agents: int, quick: bool) -> Check:
    """Decode time per token with ``agents`` agents at 4,096 tokens against BatchGenerator: at most 1.0x."""
    return Check(
        f"paged decode per token, {agents} agents x 4096 tokens, vs mlx-lm BatchGenerator (at most 1.0x)",
        f"paged: decode per token, {agents} agents x 4096 tokens",
        f"{PAGED_DECODE}:engine_median_ms",
        f"{PAGED_DECODE}:batch_generator_median_ms",
        1.0,
        quick=quick,
    )


CHECKS: list[Check | Bound] = [
    # Issue 20: running agents hold their KV once (bench/test_paged.py).
    Bound(
        "paged memory per running request, 328 tokens (<= 1.1 x its KV + one block of every layer)",
        PAGED_MEMORY,
        "test_memory_per_running_request_328",
        "charged_over_allowed",
        1.0,
        quick=True,
    ),
    Bound(
        "paged memory per running request, 16,385 tokens (<= 1.1 x its KV + one block of every layer)",
        PAGED_MEMORY,
        "test_memory_per_running_request_16385",
        "charged_over_allowed",
        1.0,
    ),
    Bound(
        "paged resume of 4,096 tokens + 16 decoded: MLX peak rise over the history's KV (<= 0.25)",
        "paged: peak memory of a resume, 4096 cached + 16 decoded",
        "test_peak_memory_of_a_resume_4096",
        "peak_rise_over_kv",
        0.25,
        quick=True,
    ),
    Bound(
        "paged resume of 16,384 tokens + 16 decoded: MLX peak rise over the history's KV (<= 0.25)",
        "paged: peak memory of a resume, 16384 cached + 16 decoded",
        "test_peak_memory_of_a_resume_16384",
        "peak_rise_over_kv",
        0.25,
    ),
    Floor(
        "agents with 4,096-token histories decoding at once in 64 MiB, paged over gathered (>= 1.8)",
        PAGED_AT_ONCE,
        "test_agents_decoding_at_once_in_a_budget",
        "paged_over_gathered",
        1.8,
        quick=True,
    ),
    paged_decode(8, quick=True),
    paged_decode(32, quick=False),
    paged_ttft(256, 1.1, quick=True),
    paged_ttft(1024, 1.05, quick=True),
    paged_ttft(4096, 1.05, quick=True),
    paged_ttft(16384, 1.05, quick=False),
    Check(
        "native gather throughput vs one numpy.copyto (>= 0.85)",
        "32 blocks x 48 layers",
        "test_gather_native",
        "test_gather_memcpy_ceiling",
        0.85,
    ),
    Check(
        "native gather throughput vs two threads of numpy.copyto (>= 0.85)",
        "32 blocks x 48 layers",
        "test_gather_native",
        "test_gather_memcpy_ceiling_two_threads",
        0.85,
    ),
    Check(
        "native gather speedup over per-layer mx.concatenate (>= 3x)",
        "32 blocks x 48 layers",
        "test_gather_native",
        "test_gather_naive_concat",
        3.0,
    ),
    # The pool's own read path: 3,072 separate block arrays. Measured 0.40-0.69 of memcpy here (separate
    # 512 KiB buffers, no huge pages): the gate only holds what was reached.
    Check(
        "per-block concat_blocks throughput vs one numpy.copyto (>= 0.35)",
        "per-block arrays, 32 blocks x 48 layers",
        "test_concat_native",
        "test_concat_memcpy_ceiling",
        0.35,
    ),
    Check(
        "per-block concat_blocks vs per-layer mx.concatenate (not slower: >= 0.9)",
        "per-block arrays, 32 blocks x 48 layers",
        "test_concat_native",
        "test_concat_naive_concatenate",
        0.9,
    ),
    # Met in some runs here, not all: 1.18-1.31x. mlx-lm itself on caches rebuilt from the blocks,
    # in the same rounds, takes 1.15-1.20x (the copy out of the blocks). CI holds 1.4x.
    Check(
        "warm TTFT, 1 new token, vs mlx-lm's kept prompt cache (engine at most 1.2x)",
        TTFT_1,
        f"{PAIRED_TTFT}:engine_median_ms",
        f"{PAIRED_TTFT}:mlx_lm_median_ms",
        1 / 1.2,
        quick=True,
        quick_minimum=1 / 1.4,
    ),
    Check(
        "warm TTFT, 16 new tokens, vs mlx-lm's kept prompt cache (engine at most 1.3x)",
        TTFT_16,
        f"{PAIRED_TTFT}:engine_median_ms",
        f"{PAIRED_TTFT}:mlx_lm_median_ms",
        1 / 1.3,
    ),
    Check(
        "warm TTFT speedup over cold prefill (>= 20x)",
        TTFT_1,
        f"{PAIRED_TTFT}:engine_median_ms",
        "test_ttft_cold_prefill",
        20.0,
        quick=True,
    ),
    Check(
        "8-agent decode vs mlx-lm BatchGenerator (engine overhead at most 5%)",
        DECODE,
        f"{PAIRED_DECODE}:engine_median_ms",
        f"{PAIRED_DECODE}:batch_generator_median_ms",
        1 / 1.05,
        quick=True,
        quick_minimum=1 / 1.12,
    ),
    Check(
        "workload, sequential, vs mlx-lm server's LRUPromptCache (wall at most 1.0x)",
        SEQUENTIAL,
        "test_blockpool_from_pool:wall_median_ms",
        "test_mlx_lm_server_lru_prompt_cache:wall_median_ms",
        1.0,
        quick=True,
        quick_minimum=1 / 1.15,
    ),
    Check(
        "workload, all agents at once, vs mlx-lm's server pattern (wall at most 1.0x)",
        CONCURRENT,
        "test_blockpool_all_at_once:wall_median_ms",
        "test_mlx_lm_server_pattern_all_at_once:wall_median_ms",
        1.0,
        quick=True,
        quick_minimum=1 / 1.15,
    ),
    Check(
        "blockpool serve vs mlx_lm.server, same multi-agent chat workload (wall at most 1.0x)",
        HEAD_TO_HEAD,
        f"{PAIRED_SERVER}:blockpool_median_ms",
        f"{PAIRED_SERVER}:mlx_lm_server_median_ms",
        1.0,
        quick=True,
        quick_minimum=1 / 1.15,
    ),  # 0.66x to 0.99x over the day's runs: the two servers share 2 cores
    Check(
        "blockpool serve vs mlx_lm.server, 16 agents x 4 turns at once (wall at most 1.0x)",
        SIXTEEN,
        f"{PAIRED_SIXTEEN}:blockpool_median_ms",
        f"{PAIRED_SIXTEEN}:mlx_lm_server_median_ms",
        1.0,
    ),
    Check(
        "blockpool serve vs mlx_lm.server, 16 new agents with one 2,000-token system prompt (wall at most 1.0x)",
        SHARED_PROMPT,
        f"{PAIRED_SHARED_PROMPT}:blockpool_median_ms",
        f"{PAIRED_SHARED_PROMPT}:mlx_lm_server_median_ms",
        1.0,
    ),
    # One system prompt and 16 agents' own tails: 1/16 of the prompt tokens plus the tails (0.08 here).
    Bound(
        "16 new agents with one system prompt: share of the prompt tokens prefilled (<= 0.1)",
        SHARED_PROMPT,
        PAIRED_SHARED_PROMPT,
        "blockpool_prefilled_share",
        0.1,
    ),
    # Measured 1.5x-1.6x on the tiny model here (8 ms against 5 ms): about 3 ms of fixed cost per resume
    # (checks, resume choice, admission, the event path) that a 5 ms step does not hide. CI holds 2x.
    Check(
        "hybrid warm TTFT, 4,096 cached + 1 new token, vs mlx-lm's kept cache (engine at most 1.1x)",
        HYBRID_TTFT,
        f"{PAIRED_HYBRID}:engine_median_ms",
        f"{PAIRED_HYBRID}:mlx_lm_median_ms",
        1 / 1.1,
        quick=True,
        quick_minimum=1 / 2.0,
    ),
    Check(
        "hybrid shared 4,096-token prefix, TTFT speedup over a cold prefill (>= 10x)",
        HYBRID_SHARED,
        f"{PAIRED_SHARED}:shared_median_ms",
        f"{PAIRED_SHARED}:cold_median_ms",
        10.0,
        quick=True,
    ),
    Bound(
        "workload peak MLX memory, pool (<= 1.05 x budget + activations)",
        SEQUENTIAL,
        "test_blockpool_from_pool",
        "peak_over_bound",
        1.0,
        quick=True,
    ),
    Bound(
        "workload peak MLX memory, disk (<= 1.05 x budget + activations)",
        SEQUENTIAL,
        "test_blockpool_from_disk",
        "peak_over_bound",
        1.0,
    ),
    Bound(
        "workload peak MLX memory, all at once (<= 1.05 x budget + activations)",
        CONCURRENT,
        "test_blockpool_all_at_once",
        "peak_over_bound",
        1.0,
        quick=True,
    ),
]

#: The benchmarks the quick subset runs (pytest -k).
QUICK_SELECT = (
    "test_ttft_warm_engine_vs_mlx_lm_prompt_cache or test_ttft_cold_prefill or test_decode_8_agents "
    "or test_blockpool_from_pool or test_mlx_lm_server_lru_prompt_cache "
    "or test_blockpool_all_at_once or test_mlx_lm_server_pattern_all_at_once "
    "or test_server_head_to_head_vs_mlx_lm_server or test_ttft_hybrid "
    "or (test_paged and not 16384 and not 16385 and not agents32)"
)


def medians(results: dict) -> dict[tuple[str, str], float]:
    """Medians in seconds, by (group, name) and (group, "test:key") for medians stored in extra_info."""
    out = {}
    for b in results["benchmarks"]:
        name = b["name"].split("[")[0]
        out[(b["group"], name)] = b["stats"]["median"]
        for key, value in b["extra_info"].items():
            if key.endswith("_median_ms"):
                out[(b["group"], f"{name}:{key}")] = value / 1e3
    return out


def extra(results: dict) -> dict[tuple[str, str], dict]:
    return {(b["group"], b["name"].split("[")[0]): b["extra_info"] for b in results["benchmarks"]}


def check(results: dict, quick: bool = False) -> list[str]:
    """Print each check; return the failed ones as sentences (empty when all pass)."""
    m, info = medians(results), extra(results)
    failures = []
    for c in CHECKS:
        if quick and not c.quick:
            continue
        if isinstance(c, Bound):
            value = info.get((c.group, c.test), {}).get(c.key)
            if value is None:
                failures.append(f"{c.what}: missing {c.test}:{c.key} in group {c.group!r}")
                continue
            ok = value >= c.maximum if c.at_least else value <= c.maximum
            sign = ">=" if c.at_least else "<="
            print(f"[{'ok' if ok else 'FAIL'}] {c.what}: {value:.2f} (need {sign} {c.maximum:.2f})")
            if not ok:
                failures.append(f"{c.what}: {value:.2f} not {sign} {c.maximum:.2f}")
            continue
        fast, slow = m.get((c.group, c.fast)), m.get((c.group, c.slow))
        if fast is None or slow is None:
            failures.append(f"{c.what}: missing {c.fast} or {c.slow} in group {c.group!r}")
            continue
        ratio = slow / fast
        minimum = c.quick_minimum if quick and c.quick_minimum is not None else c.minimum
        ok = ratio >= minimum
        note = (
            ""
            if minimum == c.minimum
            else f"; the target, {c.minimum:.2f}, is {'met' if ratio >= c.minimum else 'NOT met'}"
        )
        print(f"[{'ok' if ok else 'FAIL'}] {c.what}: ratio {ratio:.2f} (need >= {minimum:.2f}{note})")
        if not ok:
            failures.append(f"{c.what}: ratio {ratio:.2f} < {minimum:.2f}")
    return failures


def main(argv: list[str]) -> int:
    args = argv[1:]
    if args == ["--quick-select"]:
        print(QUICK_SELECT)
        return 0
    quick = "--quick" in args
    paths = [a for a in args if a != "--quick"]
    if len(paths) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    with open(paths[0]) as f:
        failures = check(json.load(f), quick)
    for failure in failures:
        print(f"GATE FAILED: {failure}", file=sys.stderr)
    if not failures:
        print("gate passed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
