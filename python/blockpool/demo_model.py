"""The models that run without a download.

- The shipped models (:func:`trained_model_dir`): a 4.6M-parameter llama trained
  on the Python standard library's source (``tools/train_tiny_model.py``, the
  record in ``training.json`` and ``docs/quality.md``), stored as float16
  safetensors inside the package, and a sliding-window variant of it.
  ``blockpool demo`` runs the first: its agents write Python-looking code. It
  is small, not smart: the code reads like the stdlib and does not work.
- Random-weight models (:func:`build_model`, :func:`write_model_dir`) of any
  mlx-lm architecture, with a byte-level BPE tokenizer trained here on a few
  hundred lines of generated text. Their text is meaningless; the test suite
  uses them because their near-tied logits make exactness tests harder.

Both are ordinary model directories (``config.json``, ``model.safetensors``,
``tokenizer.json``) loaded with ``mlx_lm.load``.
"""

from __future__ import annotations

import json
import os
import platform
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

#: The default random-weight model of :func:`write_model_dir`: llama, 4 layers, hidden 128, 2 KV heads of 32.
RANDOM_LLAMA_CONFIG: dict[str, Any] = {
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
    model.update(
        tree_map(
            lambda p: p * WEIGHT_SCALE if p.ndim > 1 and mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()
        )
    )
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def write_model_dir(
    path: Path, config: dict[str, Any] = RANDOM_LLAMA_CONFIG, dtype: mx.Dtype = mx.float32, seed: int = 0
) -> Path:
    """Write a model directory that ``mlx_lm.load`` takes, and return its path."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(config, dtype, seed)
    mx.save_safetensors(
        str(path / "model.safetensors"), dict(tree_flatten(model.parameters())), metadata={"format": "mlx"}
    )
    tokenizer_json = train_tokenizer_json(config.get("vocab_size", VOCAB_SIZE))
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


TRAINED_MODEL = "stdlib-llama-4m"
#: The same model fine-tuned with layers 0 and 2 limited to a 128-token sliding window.
SLIDING_WINDOW_MODEL = "stdlib-llama-4m-swa"


def trained_model_dir(name: str = TRAINED_MODEL) -> Path:
    """A shipped model's directory (package data), for ``mlx_lm.load``.

    Args:
        name: ``TRAINED_MODEL`` (the demo's) or ``SLIDING_WINDOW_MODEL``.

    Raises:
        FileNotFoundError: There is no such model, or the package was
            installed without its model files.
    """
    path = Path(__file__).parent / "models" / name
    if not (path / "model.safetensors").is_file():
        raise FileNotFoundError(f"the shipped model {name!r} is missing from {path.parent}: reinstall mlx-blockpool")
    return path


def training_record(name: str = TRAINED_MODEL) -> dict[str, Any]:
    """How a shipped model was trained: seed, corpus, hyperparameters, loss curve, conversion check."""
    return json.loads((trained_model_dir(name) / "training.json").read_text())


def demo_model_dir() -> Path:
    """The demo's default model: the shipped trained one."""
    return trained_model_dir()


def _has_null(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_has_null(v) for v in value.values())
    if isinstance(value, list):
        return any(_has_null(v) for v in value)
    return value is None
