"""Tiny real models for the tests: random weights, an in-process BPE tokenizer.

Nothing is downloaded. Each model is built from mlx-lm's own ``ModelArgs``
for its architecture, its weights are scaled up so that greedy decoding does
not collapse to one repeated token, and it is written as a model directory
(``config.json``, ``model.safetensors``, ``tokenizer.json``) that tests load
with ``mlx_lm.load(dir)``, the path users take. The builder is the one the
CLI demo uses (``blockpool.demo_model``); this module holds the
architectures.
"""

from __future__ import annotations

from pathlib import Path

import mlx.core as mx

from blockpool import demo_model
from blockpool.demo_model import VOCAB_SIZE

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
    # Like "gemma3_text", with 32-wide heads so that quantized blocks (kv_group_size 32) fit them.
    "gemma3_hd32": {
        **_COMMON,
        "model_type": "gemma3_text",
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 32,
        "query_pre_attn_scalar": 32,
        "sliding_window": 32,
        "sliding_window_pattern": 2,
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


# The demo's random llama (4 layers, hidden 128, 2 KV heads of 32): the size the tight-budget defects were found at.
CONFIGS["llama_4layer"] = demo_model.RANDOM_LLAMA_CONFIG


def build_model(arch: str, dtype: mx.Dtype = mx.float32, seed: int = 0):
    """A model of architecture ``arch`` with scaled random weights, in memory."""
    return demo_model.build_model(CONFIGS[arch], dtype, seed)


def write_model_dir(path: Path, arch: str, dtype: mx.Dtype = mx.float32, seed: int = 0) -> Path:
    """Write a loadable model directory for ``arch`` and return its path."""
    return demo_model.write_model_dir(path, CONFIGS[arch], dtype, seed)


_built: dict[tuple[str, str], object] = {}


def tiny_model(arch: str, dtype: mx.Dtype = mx.float32):
    """A cached in-memory model of ``arch`` (random, scaled weights), built once per session.

    Import it from here (``from tiny_models import tiny_model``), not from a
    conftest: sub-directories have conftest modules of their own.
    """
    key = (arch, str(dtype))
    if key not in _built:
        _built[key] = build_model(arch, dtype)
    return _built[key]


class FailingModel:
    """The real model, except that once ``armed``, its next forward pass over ``batch``
    sequences raises ``error`` from inside the call (a device failure, or Ctrl-C)."""

    def __init__(self, model, batch: int = 2, error: BaseException | None = None):
        error = error if error is not None else RuntimeError("simulated device failure")
        self._model, self.batch, self.error, self.armed, self.calls = model, batch, error, False, 0

    def __call__(self, inputs, *args, **kwargs):
        self.calls += 1
        if self.armed and inputs.shape[0] == self.batch:
            self.armed = False
            raise self.error
        return self._model(inputs, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._model, name)
