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


def family_model(family: str):
    """The family's tiny model (built once per session)."""
    if family not in _models:
        _models[family] = build_model(copy.deepcopy(FAMILY_CONFIGS[family]))
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
