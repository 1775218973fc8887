"""Train the small model that ships with blockpool, on the Python standard library's source.

Development-only tool: it needs PyTorch's CPU build (``tools/requirements-train.txt``),
which the package never imports. It is not run in CI. One run, start to end::

    python tools/train_tiny_model.py --work /tmp/stdlib-train --out python/blockpool/models/stdlib-coder

Stages (each writes into ``--work`` and is skipped when its output is already there,
so an interrupted run resumes from its last checkpoint):

1. corpus: the ``.py`` files under ``sysconfig.get_paths()["stdlib"]`` (PSF license), without
   tests, ``site-packages``, codec tables and the pydoc topic blob (see ``keep_file``); split
   by file into train and held-out with a seeded shuffle (``HELDOUT_FRACTION`` of the files).
2. tokenizer: byte-level BPE (``tokenizers``) trained on the train files only, with the
   special tokens ``<|endoftext|>``, ``<|im_start|>`` and ``<|im_end|>``.
3. data: each train file, then ``<|endoftext|>``; plus chat-formatted samples made from the
   train files' documented functions (the user names a function and its docstring's first
   line, the assistant answers with the function's source), so the model learns to answer
   after ``<|im_start|>assistant``. Training windows are drawn at seeded random offsets.
4. training: a llama-shaped model written to match mlx-lm's ``llama.py`` exactly (RMSNorm,
   non-traditional RoPE, SwiGLU, GQA, tied embeddings), AdamW, warmup then cosine decay, one
   thread (``torch.set_num_threads(1)``) so a run is deterministic on one machine.
5. export: mlx-lm's parameter names, float16 safetensors, ``config.json``, tokenizer files, the
   chat template and ``training.json`` (seed, corpus, hyperparameters, loss curve, final losses).
6. check (needs ``mlx`` and ``mlx-lm`` too): load the directory with ``mlx_lm.load`` and compare
   its logits with the PyTorch model's on held-out text.

Everything is seeded (``--seed``); the corpus depends on the Python version whose standard
library is read, which ``training.json`` records along with a hash of the file list.
"""

from __future__ import annotations

import argparse
import ast
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import textwrap
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "1")  # tokenizers: one thread, like the training
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402

EOS = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = [EOS, IM_START, IM_END]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
ROLES = ("planner", "coder", "reviewer")
HELDOUT_FRACTION = 0.05

MODEL_CONFIG = {
    "model_type": "llama",
    "vocab_size": 4096,
    "hidden_size": 256,
    "intermediate_size": 640,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 128,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_traditional": False,
    "max_position_embeddings": 4096,
    "tie_word_embeddings": True,
}

TRAIN = {
    "seq_len": 512,
    "batch_size": 8,
    "steps": 1100,
    "lr": 2e-3,
    "min_lr": 2e-4,
    "warmup_steps": 60,
    "weight_decay": 0.1,
    "betas": (0.9, 0.95),
    "grad_clip": 1.0,
    "init_std": 0.02,
    "eval_every": 100,
    "eval_sequences": 16,
    "checkpoint_every": 100,
}


# ---------------------------------------------------------------------------- corpus


def keep_file(rel: str) -> bool:
    """Which standard-library files are corpus: source, not tests or generated tables."""
    parts = rel.split("/")
    if not rel.endswith(".py") or "site-packages" in parts or "dist-packages" in parts:
        return False
    if any(p in ("test", "tests", "idle_test") for p in parts):
        return False
    if parts[0] == "encodings" or rel == "pydoc_data/topics.py":  # codec tables, one text blob
        return False
    return True


def corpus_split(seed: int) -> tuple[Path, list[str], list[str]]:
    """(stdlib root, train files, held-out files), relative paths, split by a seeded shuffle."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(str(p.relative_to(root)) for p in root.rglob("*.py"))
    files = [f for f in files if keep_file(f)]
    shuffled = files[:]
    random.Random(seed).shuffle(shuffled)
    n_held = max(1, round(len(files) * HELDOUT_FRACTION))
    return root, sorted(shuffled[n_held:]), sorted(shuffled[:n_held])


def read_source(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except (UnicodeDecodeError, OSError):
        return None


def chat_samples(source: str, rng: random.Random) -> list[str]:
    """Chat-formatted samples from one file's documented functions (see the module docstring)."""
    try:
        tree = ast.parse(source)
    except SyntaxError:
        return []
    lines = source.splitlines()
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or node.end_lineno is None:
            continue
        start = min([node.lineno] + [d.lineno for d in node.decorator_list])
        body = textwrap.dedent("\n".join(lines[start - 1 : node.end_lineno]))
        if len(body) > 3000 or rng.random() < 0.5:  # half of them: most of the data stays plain files
            continue
        summary = doc.strip().splitlines()[0]
        args = ast.unparse(node.args)
        role = rng.choice(ROLES)
        system = f"You are the {role} of a team that maintains the Python standard library."
        user = f"Write {node.name}({args}). {summary}"
        out.append(
            f"{IM_START}system\n{system}{IM_END}\n{IM_START}user\n{user}{IM_END}\n{IM_START}assistant\n{body}{IM_END}\n"
        )
    return out


# ---------------------------------------------------------------------------- tokenizer


def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return tok


# ---------------------------------------------------------------------------- model (torch)


def build_torch_model(config: dict):
    import torch
    import torch.nn.functional as F
    from torch import nn

    hidden = config["hidden_size"]
    n_heads = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    head_dim = config["head_dim"]
    eps = config["rms_norm_eps"]

    class RMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))

        def forward(self, x):
            return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * self.weight

    def rope_tables(length: int, offset: int = 0):
        # mlx's nn.RoPE(traditional=False): dimension i pairs with i + head_dim/2,
        # frequency base ** (-2i / head_dim), position = offset + t.
        half = head_dim // 2
        inv = config["rope_theta"] ** (-torch.arange(0, half, dtype=torch.float32) * 2 / head_dim)
        pos = torch.arange(offset, offset + length, dtype=torch.float32)
        angles = pos[:, None] * inv[None, :]
        return torch.cos(angles), torch.sin(angles)

    window = config.get("sliding_window")
    sliding = [
        t == "sliding_attention" for t in config.get("layer_types") or ["full_attention"] * config["num_hidden_layers"]
    ]

    def window_mask(length: int):
        # mlx-lm's create_causal_mask: query i sees key j when j <= i < j + window.
        i = torch.arange(length)[:, None]
        j = torch.arange(length)[None, :]
        return (j <= i) & (i < j + window)

    def apply_rope(x, cos, sin):
        half = head_dim // 2
        a, b = x[..., :half], x[..., half:]
        return torch.cat([a * cos - b * sin, a * sin + b * cos], dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            self.q_proj = nn.Linear(hidden, n_heads * head_dim, bias=False)
            self.k_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
            self.v_proj = nn.Linear(hidden, n_kv * head_dim, bias=False)
            self.o_proj = nn.Linear(n_heads * head_dim, hidden, bias=False)

        def forward(self, x, cos, sin, mask=None):
            B, L, _ = x.shape
            q = self.q_proj(x).view(B, L, n_heads, head_dim).transpose(1, 2)
            k = self.k_proj(x).view(B, L, n_kv, head_dim).transpose(1, 2)
            v = self.v_proj(x).view(B, L, n_kv, head_dim).transpose(1, 2)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            rep = n_heads // n_kv
            k = k.repeat_interleave(rep, dim=1)  # query head h reads KV head h // rep, as mlx does
            v = v.repeat_interleave(rep, dim=1)
            if mask is None:
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=head_dim**-0.5)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=head_dim**-0.5)
            return self.o_proj(out.transpose(1, 2).reshape(B, L, n_heads * head_dim))

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(hidden, config["intermediate_size"], bias=False)
            self.up_proj = nn.Linear(hidden, config["intermediate_size"], bias=False)
            self.down_proj = nn.Linear(config["intermediate_size"], hidden, bias=False)

        def forward(self, x):
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.self_attn = Attention()
            self.mlp = MLP()
            self.input_layernorm = RMSNorm()
            self.post_attention_layernorm = RMSNorm()

        def forward(self, x, cos, sin, mask=None):
            h = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
            return h + self.mlp(self.post_attention_layernorm(h))

    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(config["vocab_size"], hidden)
            self.layers = nn.ModuleList(Block() for _ in range(config["num_hidden_layers"]))
            self.norm = RMSNorm()

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = Inner()

        def forward(self, tokens):
            cos, sin = rope_tables(tokens.shape[1])
            h = self.model.embed_tokens(tokens)
            mask = window_mask(tokens.shape[1]) if any(sliding) else None
            for layer, is_sliding in zip(self.model.layers, sliding):
                h = layer(h, cos, sin, mask if is_sliding else None)
            return self.model.norm(h) @ self.model.embed_tokens.weight.T  # tied embeddings

    return Llama()


def init_weights(model, std: float, n_layers: int) -> None:
    import torch

    for name, p in model.named_parameters():
        if p.ndim == 1:
            continue
        scale = std / math.sqrt(2 * n_layers) if name.endswith(("o_proj.weight", "down_proj.weight")) else std
        torch.nn.init.normal_(p, mean=0.0, std=scale)


# ---------------------------------------------------------------------------- stages


def stage_data(work: Path, seed: int) -> dict:
    """Corpus split, tokenizer, token streams. Returns the corpus record."""
    record_path = work / "corpus.json"
    if record_path.exists():
        return json.loads(record_path.read_text())
    root, train_files, held_files = corpus_split(seed)
    rng = random.Random(seed + 1)
    train_texts, skipped = [], []
    samples: list[str] = []
    for rel in train_files:
        text = read_source(root / rel)
        if text is None:
            skipped.append(rel)
            continue
        train_texts.append(text)
        samples += chat_samples(text, rng)
    held_texts = [t for t in (read_source(root / rel) for rel in held_files) if t is not None]
    t0 = time.time()
    tok = train_tokenizer(train_texts + samples, MODEL_CONFIG["vocab_size"])
    tok.save(str(work / "tokenizer.json"))
    eos = tok.token_to_id(EOS)

    def stream(docs: list[str]) -> np.ndarray:
        ids: list[int] = []
        for enc in tok.encode_batch(docs):
            ids += enc.ids + [eos]
        return np.array(ids, dtype=np.int32)

    docs = [t for t in train_texts] + samples
    random.Random(seed + 2).shuffle(docs)
    train_ids = stream(docs)
    held_ids = stream(held_texts)
    np.save(work / "train_ids.npy", train_ids)
    np.save(work / "heldout_ids.npy", held_ids)
    record = {
        "python": sys.version.split()[0],
        "stdlib": str(root),
        "rule": "*.py under the stdlib, minus site-packages, "
        "test/tests/idle_test dirs, encodings/, pydoc_data/topics.py",
        "heldout_fraction": HELDOUT_FRACTION,
        "split_seed": seed,
        "train_files": len(train_files),
        "heldout_files": held_files,
        "unreadable_files": skipped,
        "file_list_sha256": hashlib.sha256("\n".join(train_files + held_files).encode()).hexdigest(),
        "train_chars": sum(map(len, train_texts)),
        "chat_samples": len(samples),
        "chat_chars": sum(map(len, samples)),
        "train_tokens": int(train_ids.size),
        "heldout_tokens": int(held_ids.size),
        "tokenizer_seconds": round(time.time() - t0, 1),
    }
    record_path.write_text(json.dumps(record, indent=2))
    return record


def lr_at(step: int) -> float:
    t = TRAIN
    if step < t["warmup_steps"]:
        return t["lr"] * (step + 1) / t["warmup_steps"]
    progress = (step - t["warmup_steps"]) / max(1, t["steps"] - t["warmup_steps"])
    return t["min_lr"] + 0.5 * (t["lr"] - t["min_lr"]) * (1 + math.cos(math.pi * min(1.0, progress)))


def heldout_batch(held: np.ndarray, n: int, seq_len: int) -> np.ndarray:
    """``n`` evenly spaced, fixed windows of the held-out stream (the same at every evaluation)."""
    starts = np.linspace(0, held.size - seq_len - 2, n).astype(np.int64)
    return np.stack([held[s : s + seq_len + 1] for s in starts])


def evaluate(model, batch: np.ndarray) -> float:
    import torch
    import torch.nn.functional as F

    model.eval()
    with torch.no_grad():
        x = torch.from_numpy(batch[:, :-1].astype(np.int64))
        y = torch.from_numpy(batch[:, 1:].astype(np.int64))
        losses = [
            F.cross_entropy(model(x[i : i + 4]).flatten(0, 1), y[i : i + 4].flatten()).item()
            for i in range(0, len(x), 4)
        ]
    model.train()
    return float(np.mean(losses))


def stage_train(work: Path, seed: int, bench: bool, init_from: Path | None = None) -> dict:
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(1)
    torch.manual_seed(seed)
    t = TRAIN
    train_ids = np.load(work / "train_ids.npy")
    held_ids = np.load(work / "heldout_ids.npy")
    model = build_torch_model(MODEL_CONFIG)
    init_weights(model, t["init_std"], MODEL_CONFIG["num_hidden_layers"])
    if init_from is not None:  # fine-tuning: start from a trained model's weights
        model.load_state_dict(torch.load(init_from, weights_only=True))
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim == 1]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": t["weight_decay"]}, {"params": no_decay, "weight_decay": 0.0}],
        lr=t["lr"],
        betas=t["betas"],
    )
    rng = np.random.default_rng(seed)
    history: dict = {"train": [], "heldout": []}
    step0 = 0
    ckpt = work / "checkpoint.pt"
    if ckpt.exists() and not bench:
        state = torch.load(ckpt, weights_only=False)
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        rng.bit_generator.state = state["rng"]
        history, step0 = state["history"], state["step"]
        print(f"resumed at step {step0}", flush=True)
    held_batch = heldout_batch(held_ids, t["eval_sequences"], t["seq_len"])
    n_params = sum(p.numel() for p in model.parameters())
    print(f"parameters: {n_params:,}  train tokens: {train_ids.size:,}  held-out tokens: {held_ids.size:,}", flush=True)
    started = time.time()
    window_loss: list[float] = []
    last = started
    for step in range(step0, t["steps"]):
        starts = rng.integers(0, train_ids.size - t["seq_len"] - 1, t["batch_size"])
        batch = np.stack([train_ids[s : s + t["seq_len"] + 1] for s in starts]).astype(np.int64)
        x, y = torch.from_numpy(batch[:, :-1]), torch.from_numpy(batch[:, 1:])
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t["grad_clip"])
        opt.step()
        window_loss.append(loss.item())
        if bench and step - step0 == 4:
            per = (time.time() - started) / 5
            print(f"bench: {per:.2f} s/step, {t['batch_size'] * t['seq_len'] / per:.0f} tokens/s", flush=True)
            return {}
        if (step + 1) % 10 == 0:
            now = time.time()
            history["train"].append([step + 1, round(float(np.mean(window_loss)), 4)])
            print(
                f"step {step + 1:5d}  loss {np.mean(window_loss):.4f}  "
                f"lr {lr_at(step):.2e}  {(now - last) / 10:.2f} s/step",
                flush=True,
            )
            window_loss, last = [], now
        if (step + 1) % t["eval_every"] == 0 or step + 1 == t["steps"]:
            held = evaluate(model, held_batch)
            history["heldout"].append([step + 1, round(held, 4)])
            print(f"step {step + 1:5d}  held-out loss {held:.4f}  ({time.time() - started:.0f} s)", flush=True)
        if (step + 1) % t["checkpoint_every"] == 0 or step + 1 == t["steps"]:
            state = {
                "model": model.state_dict(),
                "opt": opt.state_dict(),
                "rng": rng.bit_generator.state,
                "history": history,
                "step": step + 1,
            }
            torch.save(state, work / "checkpoint.tmp")
            os.replace(work / "checkpoint.tmp", ckpt)
    # Final losses on fixed windows: the held-out ones above, and as many train windows.
    train_batch = heldout_batch(train_ids, t["eval_sequences"], t["seq_len"])
    final = {
        "train_loss": round(evaluate(model, train_batch), 4),
        "heldout_loss": round(evaluate(model, held_batch), 4),
    }
    torch.save(model.state_dict(), work / "model.pt")
    result = {
        "history": history,
        "final": final,
        "parameters": n_params,
        "train_seconds_this_run": round(time.time() - started),
    }
    (work / "train.json").write_text(json.dumps(result, indent=2))
    print(f"final: {final}", flush=True)
    return result


def stage_export(work: Path, out: Path, seed: int) -> None:
    import torch
    from safetensors.numpy import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = torch.load(work / "model.pt", weights_only=True)
    # The torch module uses mlx-lm's llama names already (model.layers.N.self_attn.q_proj...);
    # tied embeddings, so there is no lm_head.
    tensors = {k: v.numpy().astype(np.float16) for k, v in state.items()}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "mlx"})
    os.chmod(out / "model.safetensors", 0o644)  # safetensors writes it owner-only
    tok = json.loads((work / "tokenizer.json").read_text())
    (out / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    config = {
        **MODEL_CONFIG,
        "eos_token_id": [ids[EOS], ids[IM_END]],
        "bos_token_id": ids[EOS],
        "torch_dtype": "float16",
    }
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": IM_END,
        "bos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1 << 20,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE + "\n")
    corpus = json.loads((work / "corpus.json").read_text())
    trained = json.loads((work / "train.json").read_text())
    record = {
        "seed": seed,
        "corpus": corpus,
        "model": MODEL_CONFIG,
        "hyperparameters": {
            **TRAIN,
            "optimizer": "AdamW",
            "schedule": "linear warmup, cosine decay to min_lr",
            "threads": 1,
        },
        "torch": torch.__version__,
        **trained,
    }
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {out}", flush=True)


def stage_check(work: Path, out: Path) -> dict:
    """Logits of the exported model (mlx-lm) against the PyTorch model, on held-out text."""
    import mlx.core as mx
    import torch
    from mlx_lm import load

    torch.set_num_threads(1)
    held = np.load(work / "heldout_ids.npy")
    tokens = held[1000 : 1000 + TRAIN["seq_len"]].astype(np.int64)
    state = torch.load(work / "model.pt", weights_only=True)
    results = {}
    for label, cast in (("fp16 weights in both", True), ("fp32 torch vs fp16 export", False)):
        model = build_torch_model(MODEL_CONFIG)
        model.load_state_dict({k: v.half().float() if cast else v for k, v in state.items()})
        model.eval()
        with torch.no_grad():
            ref = model(torch.from_numpy(tokens)[None])[0].numpy()
        mlx_model, _ = load(str(out))
        if cast:
            mlx_model.set_dtype(mx.float32)  # the same fp16-rounded weights, computed in fp32
        got = np.array(mlx_model(mx.array(tokens[None].astype(np.int32)))[0].astype(mx.float32))
        diff = float(np.abs(got - ref).max())
        spread = float(ref.max() - ref.min())
        agree = float((got.argmax(-1) == ref.argmax(-1)).mean())
        results[label] = {
            "max_abs_logit_diff": diff,
            "logit_range": spread,
            "argmax_agreement": agree,
            "tokens": int(tokens.size),
        }
        print(
            f"check [{label}]: max |diff| {diff:.2e} over a logit range of {spread:.1f}, argmax agreement {agree:.4f}",
            flush=True,
        )
    record = json.loads((out / "training.json").read_text())
    record["conversion_check"] = results
    (out / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work", type=Path, required=True, help="scratch directory (corpus, checkpoints)")
    parser.add_argument("--out", type=Path, required=True, help="the model directory to write")
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--steps", type=int, help=f"training steps (default {TRAIN['steps']})")
    parser.add_argument("--bench", action="store_true", help="time five steps and stop")
    parser.add_argument("--lr", type=float, help=f"peak learning rate (default {TRAIN['lr']})")
    parser.add_argument("--warmup", type=int, help=f"warmup steps (default {TRAIN['warmup_steps']})")
    parser.add_argument("--init-from", type=Path, help="start from this trained model.pt (fine-tuning)")
    parser.add_argument(
        "--sliding-window", type=int, help="a sliding-window variant: layers 0 and 2 see this many tokens"
    )
    parser.add_argument("--stage", choices=["all", "data", "train", "export", "check"], default="all")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    for key, value in (("steps", args.steps), ("lr", args.lr), ("warmup_steps", args.warmup)):
        if value is not None:
            TRAIN[key] = value
    if args.lr is not None:
        TRAIN["min_lr"] = args.lr / 10
    if args.init_from is not None:
        TRAIN["init_from"] = str(args.init_from)
    if args.sliding_window is not None:
        MODEL_CONFIG["sliding_window"] = args.sliding_window
        MODEL_CONFIG["layer_types"] = ["sliding_attention", "full_attention"] * (MODEL_CONFIG["num_hidden_layers"] // 2)
    if args.stage in ("all", "data"):
        print(
            json.dumps({k: v for k, v in stage_data(args.work, args.seed).items() if k != "heldout_files"}, indent=1),
            flush=True,
        )
    if args.stage in ("all", "train"):
        stage_train(args.work, args.seed, args.bench, args.init_from)
        if args.bench:
            return
    if args.stage in ("all", "export"):
        stage_export(args.work, args.out, args.seed)
    if args.stage in ("all", "check"):
        stage_check(args.work, args.out)


if __name__ == "__main__":
    main()
