"""Shared fixtures: tiny real models, built once per session."""

from __future__ import annotations

import mlx.core as mx
import pytest
import tiny_models

from blockpool import ModelCacheSpec

_models: dict[tuple[str, str], object] = {}


def tiny_model(arch: str, dtype: mx.Dtype = mx.float32):
    """A cached in-memory model of ``arch`` (random, scaled weights)."""
    key = (arch, str(dtype))
    if key not in _models:
        _models[key] = tiny_models.build_model(arch, dtype)
    return _models[key]


@pytest.fixture(scope="session")
def llama_spec() -> ModelCacheSpec:
    return ModelCacheSpec.from_model(tiny_model("llama"))


@pytest.fixture(scope="session")
def gemma_spec() -> ModelCacheSpec:
    return ModelCacheSpec.from_model(tiny_model("gemma3_text"))
