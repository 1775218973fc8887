"""``blockpool demo``: several agents, several turns, caches that persist.

Each agent talks over several turns, interleaved with the others, with a
shared system prompt and a growing history, through ``AgentMemory``. By
default it runs the shipped model (trained on Python's standard library):
each turn asks an agent for a function and prints the code it writes. Every
turn reports where the agent's cache came from (pool, disk, shared or
cold), the time to first token, the decode speed and the pool's occupancy.
Unless ``--no-cold`` is given, every turn's prompt is also prefilled cold
with mlx-lm (no cache), so the two can be compared at each context length.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from textwrap import indent
from typing import Any

from blockpool.cli import UsageError, load_model, positive_int, writable_dir
from blockpool.demo_model import user_cache_dir

HELP = "run a multi-agent, multi-turn scenario and show the cache at work"

ROLES = ["planner", "coder", "reviewer", "tester", "writer", "critic", "scout", "archivist"]

# The shared system prompt: the same for every agent, so its blocks are shared.
# The shipped model learned chat turns of this shape (tools/train_tiny_model.py):
# a system line, "Write name(args). summary", and code as the answer.
SYSTEM = (
    "You are one agent of a team that maintains the Python standard library. "
    "Reply with Python code. The module you work on today:\n\n"
    "import os\nimport re\n\n_HEADER = re.compile(r'^([A-Za-z-]+):\\s*(.*)$')\n\n\n"
    "class Message:\n"
    '    """A parsed message: headers and a body."""\n\n'
    "    def __init__(self, headers=None, body=''):\n"
    "        self.headers = dict(headers or {})\n"
    "        self.body = body\n\n"
    "    def get(self, name, default=None):\n"
    '        """Return the value of header *name*, or *default*."""\n'
    "        return self.headers.get(name.lower(), default)\n\n\n"
    "class MessageError(ValueError):\n"
    '    """Raised when a message cannot be parsed."""\n\n\n'
    "def read_message(path):\n"
    '    """Read the message stored in the file at *path*."""\n'
    "    with open(path, encoding='utf-8') as f:\n"
    "        return parse_message(f.read())\n\n\n"
    "def header_names(message):\n"
    '    """Return the sorted list of the header names of *message*."""\n'
    "    names = []\n"
    "    for name in message.headers:\n"
    "        if name not in names:\n"
    "            names.append(name)\n"
    "    return sorted(names)\n"
)

# One task per turn and agent: "Write name(args). summary", as in training.
TASKS = [
    ("parse_header", "line", "Split a header line into its name and value."),
    ("parse_message", "text", "Parse the headers and the body of a message."),
    ("format_header", "name, value", "Return a header line for *name* and *value*."),
    ("write_message", "message, path", "Write *message* to the file at *path*."),
    ("is_valid_name", "name", "Return True if *name* is a valid header name."),
    ("split_lines", "text, keepends=False", "Split *text* into a list of lines."),
    ("quote", "value", "Quote *value* if it contains special characters."),
    ("unquote", "value", "Remove the quotes around *value*."),
    ("get_encoding", "message", "Return the encoding of the message body."),
    ("join_headers", "headers", "Join a dict of headers into a string."),
    ("copy_message", "message", "Return a copy of *message*."),
    ("find_messages", "directory", "Return the paths of the messages in *directory*."),
]


#: The throwaway agent the demo warms up with (never persisted).
WARM_UP_AGENT = "_warm-up"


@dataclass
class TurnRecord:
    turn: int
    agent: str
    context_tokens: int
    cache: str
    reused_tokens: int
    ttft_ms: float
    tokens_per_s: float
    pool_used_blocks: int
    pool_total_blocks: int
    cold_ttft_ms: float | None = None


def agent_names(n: int) -> list[str]:
    return [ROLES[i] if i < len(ROLES) else f"agent-{i}" for i in range(n)]


def run_demo(
    model: Any,
    tokenizer: Any,
    *,
    agents: int,
    turns: int,
    max_tokens: int,
    budget_bytes: int | None,
    cache_dir: Path,
    out_dir: Path,
    compare_cold: bool,
    show_text: bool = True,
    echo=print,
    progress=None,
) -> list[TurnRecord]:
    """Run the scenario and write ``results.json``, ``summary.md`` and ``ttft.png`` to ``out_dir``."""
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
    from blockpool.engine.working_memory import request_bytes

    spec = ModelCacheSpec.from_model(model)
    if budget_bytes is None:
        # Room for one running request (its blocks, working cache and copies: working_memory.py) and
        # half an idle agent more: while one agent runs, the others wait on disk.
        final = len(tokenizer.encode(SYSTEM)) + turns * (40 + max_tokens)
        budget_bytes = request_bytes(spec, final) + spec.bytes_for_tokens(final) // 2
    pool = BlockPool(spec, memory_bytes=budget_bytes)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool), cache_dir=cache_dir)
    names = agent_names(agents)
    conversations = {name: [{"role": "system", "content": SYSTEM}] for name in names}
    records: list[TurnRecord] = []
    echo(
        f"pool: {pool.total_blocks} blocks of {spec.block_tokens} tokens "
        f"({pool.total_bytes / 2**20:.1f} MiB), agents on disk in {cache_dir}"
    )
    echo(
        f"{'turn':>4} {'agent':<10} {'context':>7} {'cache':<7} {'reused':>6} "
        f"{'TTFT ms':>8} {'cold ms':>8} {'tok/s':>7} {'pool':>9}"
    )
    first_prompt = memory.tokenize(conversations[names[0]] + [{"role": "user", "content": "Write f(x)."}])
    warm_ms = _warm_up(memory, model, tokenizer, first_prompt[::-1], compare_cold)
    echo(f"warm-up: {warm_ms:.0f} ms (one-time setup of both paths, not in the table)")
    task = 0
    for turn in range(turns):
        for name in names:
            function, args, summary = TASKS[task % len(TASKS)]
            task += 1
            conversations[name].append({"role": "user", "content": f"Write {function}({args}). {summary}"})
            tokens = memory.tokenize(conversations[name])
            start = time.perf_counter()
            uid = memory.submit(name, tokens, max_tokens=max_tokens)
            first = None
            for event in memory.stream():
                if event.uid == uid and event.token is not None and first is None:
                    first = time.perf_counter()
                if event.completion is not None and event.uid == uid:
                    done = event.completion
            cold_ms = None
            if compare_cold:
                cold_start = time.perf_counter()
                for _ in stream_generate(model, tokenizer, tokens, max_tokens=1, prompt_cache=make_prompt_cache(model)):
                    break
                cold_ms = (time.perf_counter() - cold_start) * 1e3
            record = TurnRecord(
                turn + 1,
                name,
                len(tokens),
                done.cache_source or "cold",
                done.cached_tokens,
                (first - start) * 1e3,
                done.generation_tps,
                pool.used_blocks(),
                pool.total_blocks,
                cold_ms,
            )
            records.append(record)
            conversations[name].append({"role": "assistant", "content": done.text})
            cold = f"{cold_ms:8.1f}" if cold_ms is not None else f"{'-':>8}"
            echo(
                f"{record.turn:>4} {name:<10} {record.context_tokens:>7} {record.cache:<7} {record.reused_tokens:>6} "
                f"{record.ttft_ms:8.1f} {cold} {record.tokens_per_s:7.0f} "
                f"{record.pool_used_blocks:>4}/{record.pool_total_blocks:<4}"
            )
            if show_text:
                echo(f"       task: {conversations[name][-2]['content']}")
                echo(indent(done.text.rstrip() or "(nothing)", "       > "))
            if progress is not None:
                progress()
    memory.close()  # flushes every agent to disk and frees the pool
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(records)
    (out_dir / "results.json").write_text(json.dumps([asdict(r) for r in records], indent=2))
    (out_dir / "summary.md").write_text(summary + "\n")
    plot_ttft(records, out_dir / "ttft.png")
    echo("")
    echo(summary)
    echo(f"\nwrote {out_dir / 'summary.md'}, {out_dir / 'results.json'} and {out_dir / 'ttft.png'}")
    echo(f"agents are persisted in {cache_dir}: run the demo again to resume them from disk")
    return records


def _warm_up(memory: Any, model: Any, tokenizer: Any, prompt: list[int], cold_too: bool) -> float:
    """Run each timed path once on a prompt like the first turn's, so that the first row does not carry
    one-time costs (allocations, first kernel runs) the cold column, timed after it, would not.

    The prompt shares no prefix with the agents' (it is the first prompt reversed), and its agent and
    blocks are dropped after, so the table starts from an empty pool as before.
    """
    from mlx_lm.generate import stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    start = time.perf_counter()
    memory.submit(WARM_UP_AGENT, prompt, max_tokens=2)
    list(memory.step())
    memory.forget(WARM_UP_AGENT)
    memory.pool.drop_cached()
    if cold_too:
        for _ in stream_generate(model, tokenizer, prompt, max_tokens=1, prompt_cache=make_prompt_cache(model)):
            break
    return (time.perf_counter() - start) * 1e3


def summarize(records: list[TurnRecord]) -> str:
    """A markdown table: turns, context and time to first token per cache source."""
    rows = [
        "| cache | turns | median context | median TTFT ms | median cold TTFT ms | speedup |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for source in ("pool", "disk", "shared", "cold"):
        picked = [r for r in records if r.cache == source]
        if not picked:
            continue
        ttft = statistics.median(r.ttft_ms for r in picked)
        colds = [r.cold_ttft_ms for r in picked if r.cold_ttft_ms is not None]
        cold = statistics.median(colds) if colds else None
        speedup = f"{cold / ttft:.1f}x" if cold else "-"
        cold_text = f"{cold:.1f}" if cold is not None else "-"
        context = statistics.median(r.context_tokens for r in picked)
        rows.append(f"| {source} | {len(picked)} | {context:.0f} | {ttft:.1f} | {cold_text} | {speedup} |")
    return "\n".join(rows)


def plot_ttft(records: list[TurnRecord], path: Path) -> None:
    """Time to first token against context length: each cache source, and cold prefill."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    styles = {"pool": "o", "disk": "s", "shared": "^", "cold": "x"}
    for source, marker in styles.items():
        picked = [r for r in records if r.cache == source]
        if picked:
            ax.scatter(
                [r.context_tokens for r in picked],
                [r.ttft_ms for r in picked],
                marker=marker,
                label=f"blockpool: {source}",
            )
    colds = [r for r in records if r.cold_ttft_ms is not None]
    if colds:
        ax.scatter(
            [r.context_tokens for r in colds],
            [r.cold_ttft_ms for r in colds],
            marker="+",
            color="black",
            label="cold prefill (mlx-lm, no cache)",
        )
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("time to first token (ms)")
    ax.set_yscale("log")
    ax.set_title("Time to first token: resumed agents against cold prefill")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------ command line


def add_arguments(parser: Any) -> None:
    """The ``blockpool demo`` flags."""
    parser.add_argument(
        "--model",
        help="a path or Hugging Face repo mlx_lm.load takes (default: the shipped model, trained on Python's stdlib)",
    )
    parser.add_argument("--agents", "-n", type=positive_int, default=3, help="number of agents (default 3)")
    parser.add_argument("--turns", "-t", type=positive_int, default=3, help="turns per agent (default 3)")
    parser.add_argument("--max-tokens", type=positive_int, default=48, help="tokens generated per turn (default 48)")
    parser.add_argument(
        "--budget-mb",
        type=positive_int,
        help="pool size in MiB (default: one running agent and half an idle one, so the rest wait on disk)",
    )
    parser.add_argument("--cache-dir", type=Path, help="where agents persist (default: the user cache directory)")
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("blockpool-demo"),
        help="where the table and plot go (default ./blockpool-demo)",
    )
    parser.add_argument("--no-cold", action="store_true", help="skip the cold-prefill comparison")
    parser.add_argument("--no-text", action="store_true", help="do not print what the agents write")


def run(args: Any) -> int:
    """``blockpool demo``: load the model, run the scenario, write the report."""
    import sys

    cache_dir = writable_dir(args.cache_dir or user_cache_dir() / "demo-agents", "cache directory")
    out_dir = writable_dir(args.out, "output directory")
    model, tokenizer = _load(args.model)
    from tqdm import tqdm

    with tqdm(
        total=args.agents * args.turns, desc="turns", unit="turn", leave=False, file=sys.stderr, disable=None
    ) as bar:
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
            show_text=not args.no_text,
            echo=tqdm.write,
            progress=bar.update,
        )
    return 0


def _load(model_ref: str | None):
    if model_ref is None:
        from mlx_lm import load

        from blockpool.demo_model import demo_model_dir

        try:
            path = demo_model_dir()
        except FileNotFoundError as e:
            raise UsageError(str(e)) from None
        print(f"model: the shipped {path.name} (llama, 4 layers, trained on Python's standard library; it writes")
        print("       stdlib-like code, not working code). --model takes any model mlx_lm.load takes.")
        return load(str(path))
    print(f"model: {model_ref}")
    return load_model(model_ref)
