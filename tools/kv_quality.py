"""What storing an agent's history quantized costs in next-token quality, on the shipped model.

Method (teacher forcing, so one early disagreement does not steer later steps).
A window of held-out text is split into a history of ``H`` tokens and a
continuation of ``C`` tokens. The history is prefilled once at full precision
into an mlx-lm ``KVCache``. Then, for each way of storing it, the continuation
is fed in one forward pass on top of the stored history and each position's
next-token logits are compared with the full-precision run's:

- ``blockpool``: the history's KV goes into a ``BlockPool(kv_bits, kv_group_size)``
  (``from_mlx_caches``) and comes back (``to_mlx_caches``), as when an agent resumes
  from its blocks. The continuation's own K/V stay at full precision: that is what
  the engine does for the running request (its tokens are quantized only when
  they are written back to the pool, after the turn).
- ``oracle``: the same semantics in pure MLX: ``mx.dequantize(mx.quantize(history))``.
  blockpool should equal it to the last bit.
- ``mlx-lm``: mlx-lm's own ``QuantizedKVCache`` (``KVCache.to_quantized``) holding the
  history; the continuation's K/V are then quantized as they are appended, as
  mlx-lm does for every token past ``quantized_kv_start``. So it quantizes more
  than blockpool (the continuation too): that is the difference to read, not
  a defect of either.

Recorded per configuration, over all windows' continuation positions:
argmax agreement with full precision, perplexity of the real next tokens
(and its relative change), mean KL(full || stored).

Run ``python tools/kv_quality.py`` for the tables in ``docs/quality.md``; the
tests import :func:`measure` for smaller cases.
"""

from __future__ import annotations

import json
import math
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import KVCache, RotatingKVCache, make_prompt_cache

from blockpool import AgentBlocks, BlockPool, ModelCacheSpec, from_mlx_caches, to_mlx_caches

METHODS = ("blockpool", "oracle", "mlx-lm")


@dataclass
class Score:
    """Agreement and perplexity over every scored position of every window."""

    agree: int = 0
    positions: int = 0
    nll: float = 0.0
    kl: float = 0.0
    per_window_agreement: list[float] = field(default_factory=list)

    @property
    def agreement(self) -> float:
        return self.agree / self.positions

    @property
    def perplexity(self) -> float:
        return math.exp(self.nll / self.positions)

    @property
    def mean_kl(self) -> float:
        return self.kl / self.positions


def heldout_windows(tokenizer, model_dir: Path, count: int, length: int) -> list[list[int]]:
    """The first ``length`` tokens of each of the first ``count`` long-enough held-out files.

    The held-out files are the ones the model's ``training.json`` lists; they
    are read from this interpreter's standard library (files missing here are
    skipped, so another Python version reads the same names, not the same text).
    """
    record = json.loads((model_dir / "training.json").read_text())
    root = Path(sysconfig.get_paths()["stdlib"])
    windows = []
    for rel in record["corpus"]["heldout_files"]:
        path = root / rel
        if not path.is_file():
            continue
        ids = tokenizer.encode(path.read_text(encoding="utf-8", errors="replace"))
        if len(ids) >= length:
            windows.append(ids[:length])
        if len(windows) == count:
            break
    return windows


def _copy(cache, transform=mx.array):
    """A new cache like ``cache`` (its own arrays), its stored keys and values passed through ``transform``."""
    if isinstance(cache, RotatingKVCache):
        keys, values, offset, keep, max_size, idx = cache.state
        out = RotatingKVCache(max_size, keep)
        out.state = (transform(keys), transform(values), offset, keep, max_size, idx)
        return out
    out = KVCache()
    out.keys, out.values = (transform(a[..., : cache.offset, :]) for a in (cache.keys, cache.values))
    out.offset = cache.offset
    return out


def _quantized_round_trip(bits: int, group_size: int):
    def round_trip(a: mx.array) -> mx.array:
        return mx.dequantize(*mx.quantize(a, group_size=group_size, bits=bits), group_size=group_size, bits=bits)

    return round_trip


def stored_history(
    method: str, spec: ModelCacheSpec, caches: list, history: list[int], bits: int | None, group_size: int
):
    """Caches holding ``history`` as ``method`` stores it (``bits=None``: unquantized), or None if it cannot."""
    if method == "blockpool":
        pool = BlockPool(
            spec,
            num_blocks=spec.num_layers * (len(history) // spec.block_tokens + 2),
            kv_bits=bits,
            kv_group_size=group_size,
        )
        agent = from_mlx_caches(pool, caches, history, AgentBlocks.empty("history", spec))
        rebuilt = to_mlx_caches(pool, agent)
        mx.eval([c.state for c in rebuilt])
        pool.release(agent)
        return rebuilt
    if bits is None:
        return [_copy(c) for c in caches]
    if method == "oracle":
        return [_copy(c, _quantized_round_trip(bits, group_size)) for c in caches]
    if method == "mlx-lm":
        if any(isinstance(c, RotatingKVCache) for c in caches):
            return None  # mlx-lm cannot quantize a RotatingKVCache (NotImplementedError)
        return [_copy(c).to_quantized(group_size=group_size, bits=bits) for c in caches]
    raise ValueError(method)


def measure(model, windows: list[list[int]], history_tokens: int, configs: list[tuple], methods=METHODS) -> dict:
    """Scores keyed by ``(method, bits, group_size)``, plus ``("full", None, 0)``.

    Each window is ``history_tokens`` of history and the rest continuation;
    the continuation's last token is only a target. ``configs`` holds
    ``(bits, group_size)`` pairs, measured with every method of ``methods``,
    or ``(bits, group_size, methods)`` triples that name their own.
    """
    spec = ModelCacheSpec.from_model(model)
    scores: dict = {}
    for window in windows:
        history, continuation = window[:history_tokens], window[history_tokens:-1]
        targets = mx.array(window[history_tokens + 1 :])
        caches = make_prompt_cache(model)
        mx.eval(model(mx.array([history]), cache=caches))
        full = _log_probs(model(mx.array([continuation]), cache=[_copy(c) for c in caches]))
        full_argmax = mx.argmax(full, axis=-1)
        _score(scores.setdefault(("full", None, 0), Score()), full, full, full_argmax, targets)
        for bits, group_size, *own in configs:
            for method in own[0] if own else methods:
                stored = stored_history(method, spec, caches, history, bits, group_size)
                if stored is None:
                    continue
                logp = _log_probs(model(mx.array([continuation]), cache=stored))
                _score(scores.setdefault((method, bits, group_size), Score()), logp, full, full_argmax, targets)
    return scores


def _log_probs(logits: mx.array) -> mx.array:
    logits = logits[0].astype(mx.float32)
    return logits - mx.logsumexp(logits, axis=-1, keepdims=True)


def _score(score: Score, logp: mx.array, full: mx.array, full_argmax: mx.array, targets: mx.array) -> None:
    agree = mx.sum(mx.argmax(logp, axis=-1) == full_argmax).item()
    n = targets.size
    score.agree += agree
    score.positions += n
    score.per_window_agreement.append(agree / n)
    score.nll += -mx.sum(mx.take_along_axis(logp, targets[:, None], axis=-1)).item()
    score.kl += mx.sum(mx.exp(full) * (full - logp)).item()


def table(scores: dict, configs: list[tuple[int | None, int]], full_bits: int = 16) -> str:
    """Markdown: one row per (bits, group), blockpool and mlx-lm side by side; unquantized rows show ``full_bits``."""
    full = scores[("full", None, 0)]
    rows = [
        f"Full precision: perplexity {full.perplexity:.3f} over {full.positions} positions.",
        "",
        "| KV bits | group | blockpool agreement | blockpool PPL (change) | blockpool "
        "KL | oracle = blockpool | mlx-lm agreement | mlx-lm PPL (change) | mlx-lm KL |",
        "|---:|---:|---:|---:|---:|:---:|---:|---:|---:|",
    ]
    for bits, group in configs:
        b, o, m = (scores.get((k, bits, group)) for k in METHODS)
        same = (
            "yes" if o is not None and b.agree == o.agree and abs(b.nll - o.nll) < 1e-6 * max(1.0, abs(o.nll)) else "no"
        )
        cells = [f"{bits or full_bits}", f"{group if bits else '-'}"]
        for s, extra in ((b, None), (m, same)):
            if extra is not None:
                cells.append(extra)
            if s is None:
                cells += ["n/a", "n/a", "n/a"]
                continue
            change = 100 * (s.perplexity / full.perplexity - 1)
            cells += [f"{s.agreement:.4f}", f"{s.perplexity:.3f} ({change:+.2f}%)", f"{s.mean_kl:.2e}"]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main() -> None:
    import argparse
    import time

    from mlx_lm import load

    from blockpool.demo_model import trained_model_dir

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", type=Path, help="a model directory with training.json (default: the shipped model)")
    parser.add_argument("--windows", type=int, default=24)
    parser.add_argument("--history", type=int, default=384)
    parser.add_argument("--continuation", type=int, default=128)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    args = parser.parse_args()
    model_dir = args.model or trained_model_dir()
    model, tokenizer = load(str(model_dir))
    model.set_dtype(getattr(mx, args.dtype))
    windows = heldout_windows(tokenizer, model_dir, args.windows, args.history + args.continuation + 1)
    configs = [(None, 64)] + [(bits, g) for bits in (8, 4) for g in (32, 64, 128)]
    start = time.perf_counter()
    scores = measure(model, windows, args.history, configs)
    print(
        f"{len(windows)} windows of {args.history} + {args.continuation} "
        f"tokens, {args.dtype}, {sys.version.split()[0]}, "
        f"{time.perf_counter() - start:.0f} s\n"
    )
    print(table(scores, configs, full_bits=8 * getattr(mx, args.dtype).size))
    worst = {k: min(s.per_window_agreement) for k, s in scores.items() if k[0] == "blockpool"}
    print(
        "\nlowest per-window blockpool agreement:",
        {f"{b or 'full'}/{g}": round(v, 4) for (_, b, g), v in worst.items()},
    )


if __name__ == "__main__":
    main()
