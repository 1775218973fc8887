"""Shared fixtures: tiny real models, built once per session."""

from __future__ import annotations

import mlx.core as mx
import pytest

import tiny_models
from blockpool import ModelCacheSpec
from tiny_models import tiny_model


@pytest.fixture(scope="session")
def llama_spec() -> ModelCacheSpec:
    return ModelCacheSpec.from_model(tiny_model("llama"))


@pytest.fixture(scope="session")
def gemma_spec() -> ModelCacheSpec:
    return ModelCacheSpec.from_model(tiny_model("gemma3_text"))


@pytest.fixture(scope="session")
def load_tiny(tmp_path_factory):
    """``load_tiny(arch, dtype)``: write a tiny model directory and load it with ``mlx_lm.load``."""
    from mlx_lm import load

    loaded: dict[tuple[str, str], tuple] = {}

    def _load(arch: str, dtype: mx.Dtype = mx.float32):
        key = (arch, str(dtype))
        if key not in loaded:
            path = tmp_path_factory.mktemp(f"{arch}-{str(dtype).split('.')[-1]}")
            tiny_models.write_model_dir(path, arch, dtype)
            loaded[key] = load(str(path))
        return loaded[key]

    return _load
