"""Where the time of one warm resume goes: an agent with N cached tokens sends 1 new token, timed to its first token.

Run: ``python tools/profile_resume.py [--tokens 256] [--rounds 60]`` (about a
minute on two CPU cores). On the 4-layer test llama (``llama_4layer``,
float32), written to disk and loaded with ``mlx_lm.load``, the engine
resumes an agent from blocks its own prefill made and ``stream()`` is read
to the first token. Each phase is the median, over the rounds, of the time
between two marks:

- ``submit``: ``engine.submit`` (checks, the request queued);
- ``to the forward pass``: from ``submit`` returning to the model being
  called (admission: room in the budget, the history's caches, or the
  paged rows);
- ``forward graph``: the model call itself (MLX builds the graph lazily);
- ``forward compute``: from the model call returning to the evaluation that
  computed it returning;
- ``to the token event``: from there to ``stream()`` yielding the token.

The same rounds time mlx-lm's ``stream_generate`` on a kept prompt cache
(trimmed back after each round), alternating with the engine's. The marks
wrap public names only (``BlockPoolBatchEngine.submit``, the model's
``__call__``, ``mx.eval`` and ``mx.async_eval``), so the script runs on
earlier versions of the package too; ``docs/performance.md`` has its output
before and after paged attention.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

import mlx.core as mx  # noqa: E402
from mlx_lm import load  # noqa: E402
from mlx_lm.generate import stream_generate  # noqa: E402
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache  # noqa: E402

import tiny_models  # noqa: E402
from blockpool import AgentBlocks, BlockPool, BlockPoolBatchEngine, ModelCacheSpec  # noqa: E402

PHASES = ("submit", "to the forward pass", "forward graph", "forward compute", "to the token event")


class Marks:
    """Time stamps at the wrapped calls of one round."""

    def __init__(self) -> None:
        self.stamps: list[tuple[str, float]] = []
        self.on = False

    def mark(self, label: str) -> None:
        if self.on:
            self.stamps.append((label, time.perf_counter()))

    def wrap(self, owner: object, name: str, label: str) -> None:
        original = getattr(owner, name)

        def wrapped(*args, **kwargs):
            self.mark(label + ">")
            try:
                return original(*args, **kwargs)
            finally:
                self.mark(label + "<")

        setattr(owner, name, wrapped)

    def phases(self) -> dict[str, float]:
        """The phases of the round, in ms, from its first forward pass and the evaluation after it."""
        t = dict.fromkeys(("submit>", "submit<", "model>", "model<", "eval<", "token"), None)
        for label, stamp in self.stamps:
            if label in ("submit>", "submit<", "token") or (label == "model>" and t["model>"] is None):
                t[label] = stamp
            elif label == "model<" and t["model<"] is None:
                t[label] = stamp
            elif label in ("eval<", "async_eval<") and t["model<"] is not None and t["eval<"] is None:
                t["eval<"] = stamp
        points = [t[k] for k in ("submit>", "submit<", "model>", "model<", "eval<", "token")]
        return {name: (b - a) * 1e3 for name, a, b in zip(PHASES, points, points[1:])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=256, help="cached tokens the agent resumes")
    parser.add_argument("--rounds", type=int, default=60)
    args = parser.parse_args()

    model, tokenizer = load(str(tiny_models.write_model_dir(Path(tempfile.mkdtemp()), "llama_4layer")))
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=256 << 20)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    history = mx.random.randint(3, 500, (args.tokens - 1,), key=mx.random.key(1)).tolist()
    engine.submit("template", history, max_tokens=1)
    (done,) = list(engine.step())
    template = done.blocks
    prompt = [7]
    kept = make_prompt_cache(model)
    for _ in stream_generate(model, tokenizer, template.token_ids, max_tokens=1, prompt_cache=kept):
        pass
    trim_prompt_cache(kept, kept[0].offset - args.tokens)

    marks = Marks()
    marks.wrap(BlockPoolBatchEngine, "submit", "submit")
    marks.wrap(type(model), "__call__", "model")
    marks.wrap(mx, "eval", "eval")
    marks.wrap(mx, "async_eval", "async_eval")

    def resume(i: int) -> dict[str, float]:
        agent = f"r{i}"
        pool.share(template.all_blocks(), agent)
        handle = AgentBlocks(
            agent, template.spec, {k: list(v) for k, v in template.blocks.items()}, args.tokens, template.token_ids
        )
        gc.collect()
        marks.stamps.clear()
        marks.on = True
        engine.submit(agent, prompt, cache=handle, max_tokens=2)
        events = engine.stream()
        next(e for e in events if e.token is not None)
        marks.mark("token")
        marks.on = False
        for event in events:
            if event.completion is not None:
                pool.release(event.completion.blocks)
        phases = marks.phases()
        phases["total"] = sum(phases.values())
        return phases

    def mlx_lm_round() -> float:
        gc.collect()
        start = time.perf_counter()
        next(iter(stream_generate(model, tokenizer, prompt, max_tokens=1, prompt_cache=kept)))
        elapsed = time.perf_counter() - start
        trim_prompt_cache(kept, kept[0].offset - args.tokens)
        return elapsed * 1e3

    for i in range(5):
        resume(i)
        mlx_lm_round()
    rounds, reference = [], []
    for i in range(args.rounds):
        rounds.append(resume(100 + i))
        reference.append(mlx_lm_round())
    print(f"warm resume, {args.tokens} cached tokens + 1 new, median of {args.rounds} rounds (ms)")
    for name in (*PHASES, "total"):
        print(f"  {name:22s} {statistics.median(r[name] for r in rounds):7.3f}")
    print(f"  {'mlx-lm kept cache':22s} {statistics.median(reference):7.3f}")


if __name__ == "__main__":
    main()
