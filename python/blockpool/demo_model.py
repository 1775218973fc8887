"""A small model to show the cache mechanics without a download.

It has a real architecture (llama) and random weights, and a byte-level BPE
tokenizer trained here on a few hundred lines of generated text. Its output
is meaningless text: it exists to exercise caching, not to answer. It is
written as an ordinary model directory (``config.json``,
``model.safetensors``, ``tokenizer.json``) and loaded with ``mlx_lm.load``.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map

VOCAB_SIZE = 512
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

#: The demo's model: llama, 4 layers, hidden 128, 2 KV heads of 32.
DEMO_CONFIG: dict[str, Any] = {
    "model_type": "llama",
    "vocab_size": VOCAB_SIZE,
    "hidden_size": 128,
    "intermediate_size": 384,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "tie_word_embeddings": True,
}

# Default random init gives near-uniform logits and greedy decoding repeats
# one token; larger weights make the (still meaningless) output vary.
WEIGHT_SCALE = 4.0

_WORDS = (
    "the agent reads a file and writes a short plan before it calls the tool again "
    "memory blocks move from the pool to the cache when a returning agent resumes its work "
    "each layer keeps keys and values for every token of the history in order "
    "a planner asks the coder for a patch and the reviewer answers with three comments "
    "tokens flow through attention heads while the sliding window forgets older context "
    "numbers like 12 345 and 6789 appear in logs next to words such as error warning info"
).split()


def corpus(lines: int = 400) -> list[str]:
    """Deterministic pseudo-text, to train the tokenizer and to write prompts with."""
    out = []
    n = len(_WORDS)
    for i in range(lines):
        start = (i * 7) % n
        length = 8 + (i * 5) % 17
        out.append(" ".join(_WORDS[(start + k * (1 + i % 3)) % n] for k in range(length)))
    return out


def train_tokenizer_json(vocab_size: int = VOCAB_SIZE) -> str:
    """A byte-level BPE tokenizer trained on :func:`corpus`, as tokenizer.json text."""
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
    tok.train_from_iterator(corpus(), trainer)
    return tok.to_str()


def build_model(config: dict[str, Any], dtype: mx.Dtype = mx.float32, seed: int = 0):
    """An mlx-lm model of ``config``'s architecture with scaled random weights."""
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    model.update(tree_map(lambda p: p * WEIGHT_SCALE if p.ndim > 1 else p, model.parameters()))
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def write_model_dir(path: Path, config: dict[str, Any] = DEMO_CONFIG, dtype: mx.Dtype = mx.float32, seed: int = 0) -> Path:
    """Write a model directory that ``mlx_lm.load`` takes, and return its path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(config, dtype, seed)
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"})
    tokenizer_json = train_tokenizer_json(config["vocab_size"])
    (path / "tokenizer.json").write_text(tokenizer_json)
    eos_id = json.loads(tokenizer_json)["added_tokens"][0]["id"]
    full = {**config, "eos_token_id": eos_id, "bos_token_id": eos_id}
    if _has_null(full):
        raise ValueError("config.json must not contain nulls")
    (path / "config.json").write_text(json.dumps(full, indent=2))
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": EOS,
        "bos_token": EOS,
        "pad_token": EOS,
        "unk_token": EOS,
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1 << 20,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
    return path


def user_cache_dir() -> Path:
    """Where blockpool keeps its files: ``$XDG_CACHE_HOME/blockpool``, ``~/Library/Caches/blockpool`` on macOS."""
    if platform.system() == "Darwin":
        base = Path.home() / "Library" / "Caches"
    else:
        base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "blockpool"


def demo_model_dir() -> Path:
    """The demo model's directory, built on first use and reused after."""
    path = user_cache_dir() / "demo-model-v1"
    if not (path / "config.json").exists():
        staging = path.with_name(path.name + f".partial-{os.getpid()}")
        write_model_dir(staging)
        try:
            os.replace(staging, path)
        except OSError:  # another process finished first
            shutil.rmtree(staging, ignore_errors=True)
    return path


def _has_null(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    return value is None
