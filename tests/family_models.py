"""Tiny random-weight models of every mlx-lm family (``family_configs.FAMILY_CONFIGS``), built in memory.

The weights are scaled as the suite's other tiny models are
(``blockpool.demo_model.build_model``), so that greedy decoding does not
collapse to one repeated token. Every family shares one tokenizer (the
suite's trained BPE one, vocabulary 512): prompts are token ids, and the
tokenizer only detokenizes and names the end-of-sequence token.
"""

from __future__ import annotations

import copy
import tempfile

import mlx.core as mx
from mlx_lm import load

import tiny_models
from blockpool.demo_model import build_model
from family_configs import FAMILY_CONFIGS

_models: dict[str, object] = {}
_tokenizer: list[object] = []

#: Output weights a family creates as zeros (its checkpoints fill them): random here too, or
#: every logit is 0 and every output token the same, which would make the family's tests vacuous.
ZERO_OUTPUT_WEIGHTS = {"talkie": ["lm_head"]}


def family_model(family: str):
    """The family's tiny model (built once per session)."""
    if family not in _models:
        model = build_model(copy.deepcopy(FAMILY_CONFIGS[family]))
        for name in ZERO_OUTPUT_WEIGHTS.get(family, []):
            weight = getattr(model, name)
            setattr(model, name, 0.05 * mx.random.normal(weight.shape, key=mx.random.key(7)).astype(weight.dtype))
        _models[family] = model
    return _models[family]


def shared_tokenizer():
    """The suite's tokenizer, loaded as mlx-lm loads it (once per session)."""
    if not _tokenizer:
        path = tiny_models.write_model_dir(tempfile.mkdtemp(prefix="family-tokenizer-"), "llama")
        _tokenizer.append(load(str(path))[1])
    return _tokenizer[0]


def tokens(n: int, seed: int) -> list[int]:
    """``n`` random token ids (not the end-of-sequence one), reproducibly."""
    return mx.random.randint(3, 500, (n,), key=mx.random.key(seed)).tolist()
