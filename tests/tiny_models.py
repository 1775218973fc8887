"""Tiny real models for the tests: random weights, an in-process BPE tokenizer.

Nothing is downloaded. Each model is built from mlx-lm's own ``ModelArgs``
for its architecture, its weights are scaled up so that greedy decoding does
not collapse to one repeated token, and it is written as a model directory
(``config.json``, ``model.safetensors``, ``tokenizer.json``) that tests load
with ``mlx_lm.load(dir)``, the path users take.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.utils import _get_classes

VOCAB_SIZE = 512
EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_COMMON = {"vocab_size": VOCAB_SIZE, "hidden_size": 64, "intermediate_size": 128, "rms_norm_eps": 1e-5}

# Small widths, 2 to 4 layers: the suite runs on two CPU cores with a reference BLAS.
CONFIGS: dict[str, dict] = {
    "llama": {
        **_COMMON,
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    # Like "llama", with 64-wide heads so that every kv_group_size (32, 64) divides them.
    "llama_hd64": {
        **_COMMON,
        "model_type": "llama",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 64,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "qwen2": {
        **_COMMON,
        "model_type": "qwen2",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    "qwen3": {
        **_COMMON,
        "model_type": "qwen3",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": True,
    },
    "gemma3_text": {
        **_COMMON,
        "model_type": "gemma3_text",
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "sliding_window": 32,
        "sliding_window_pattern": 2,  # layers 0, 2 sliding; 1, 3 full
        "rope_theta": 10000.0,
        "rope_local_base_freq": 10000.0,
        "max_position_embeddings": 4096,
    },
    "mixtral": {
        **_COMMON,
        "model_type": "mixtral",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "num_local_experts": 4,
        "num_experts_per_tok": 2,
        "rope_theta": 10000.0,
        "tie_word_embeddings": False,
    },
    "qwen3_moe": {
        **_COMMON,
        "model_type": "qwen3_moe",
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "num_experts": 4,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 64,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
        "norm_topk_prob": True,
        "rope_theta": 10000.0,
        "max_position_embeddings": 4096,
        "tie_word_embeddings": False,
    },
}

# Random init is too gentle: logits are near-uniform and greedy decoding
# repeats one token. A larger weight scale makes the output vary.
WEIGHT_SCALE = 4.0

_CORPUS_WORDS = (
    "the agent reads a file and writes a short plan before it calls the tool again "
    "memory blocks move from the pool to the cache when a returning agent resumes its work "
    "each layer keeps keys and values for every token of the history in order "
    "a planner asks the coder for a patch and the reviewer answers with three comments "
    "tokens flow through attention heads while the sliding window forgets older context "
    "numbers like 12 345 and 6789 appear in logs next to words such as error warning info"
).split()


def corpus(lines: int = 400) -> list[str]:
    """Deterministic pseudo-text to train the tokenizer on."""
    out = []
    n = len(_CORPUS_WORDS)
    for i in range(lines):
        start = (i * 7) % n
        length = 8 + (i * 5) % 17
        out.append(" ".join(_CORPUS_WORDS[(start + k * (1 + i % 3)) % n] for k in range(length)))
    return out


def train_tokenizer_json() -> str:
    """A byte-level BPE tokenizer with VOCAB_SIZE entries, as tokenizer.json text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus(), trainer)
    return tok.to_str()


def build_model(arch: str, dtype: mx.Dtype = mx.float32, seed: int = 0):
    """A model of architecture ``arch`` with scaled random weights, in memory."""
    config = CONFIGS[arch]
    model_class, args_class = _get_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    scaled = tree_map(lambda p: p * WEIGHT_SCALE if p.ndim > 1 else p, model.parameters())
    model.update(scaled)
    model.set_dtype(dtype)
    mx.eval(model.parameters())
    return model


def write_model_dir(path: Path, arch: str, dtype: mx.Dtype = mx.float32, seed: int = 0) -> Path:
    """Write a loadable model directory for ``arch`` and return its path."""
    path.mkdir(parents=True, exist_ok=True)
    model = build_model(arch, dtype, seed)
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    tokenizer_json = train_tokenizer_json()
    (path / "tokenizer.json").write_text(tokenizer_json)
    eos_id = json.loads(tokenizer_json)["added_tokens"][0]["id"]
    config = {**CONFIGS[arch], "eos_token_id": eos_id, "bos_token_id": eos_id}
    (path / "config.json").write_text(json.dumps(config, indent=2))
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
    _assert_no_nulls(config)
    return path


def _assert_no_nulls(value) -> None:
    if isinstance(value, dict):
        for v in value.values():
            _assert_no_nulls(v)
    elif isinstance(value, list):
        for v in value:
            _assert_no_nulls(v)
    else:
        assert value is not None, "config.json must not contain nulls"
