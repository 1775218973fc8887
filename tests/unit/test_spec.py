"""ModelCacheSpec read off real mlx-lm models of each supported architecture."""

from __future__ import annotations

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx_lm.models.cache import CacheList, KVCache, RotatingKVCache

import tiny_models
from blockpool import Geometry, LayerSpec, ModelCacheSpec, StateGeometry, UnsupportedModelError
from tiny_models import tiny_model

# arch -> (layers, kv heads, head dim, sliding layers)
EXPECTED = {
    "llama": (2, 2, 16, []),
    "qwen2": (2, 2, 16, []),
    "qwen3": (2, 2, 32, []),
    "gemma3_text": (4, 2, 16, [0, 2]),
    "mixtral": (2, 2, 16, []),
    "qwen3_moe": (2, 2, 16, []),
}


@pytest.mark.parametrize("arch", sorted(EXPECTED))
def test_spec_from_model(arch):
    layers, heads, dim, sliding = EXPECTED[arch]
    spec = ModelCacheSpec.from_model(tiny_model(arch))
    assert spec.num_layers == layers
    assert spec.block_tokens == 256
    for i, layer in enumerate(spec.layers):
        assert (layer.kv_heads, layer.k_head_dim, layer.v_head_dim, layer.dtype) == (heads, dim, dim, "float32")
        if i in sliding:
            assert layer.attention == "sliding" and layer.window == tiny_models.CONFIGS[arch]["sliding_window"]
        else:
            assert layer.attention == "full" and layer.window is None
    assert len(spec.geometries) == 1
    # K and V, 256 tokens, float32
    assert spec.bytes_per_block(0) == heads * 256 * (2 * dim) * 4


def test_spec_dtype_follows_the_weights():
    spec = ModelCacheSpec.from_model(tiny_model("llama", mx.bfloat16))
    assert {layer.dtype for layer in spec.layers} == {"bfloat16"}
    assert spec.bytes_per_block(0) == 2 * 256 * 32 * 2


def test_block_ranges_for_sliding_layers(gemma_spec):
    # 8K tokens, window 32: a sliding layer keeps the blocks covering the last 32 tokens.
    assert gemma_spec.block_range(0, 8192) == (31, 32)
    assert gemma_spec.block_range(1, 8192) == (0, 32)
    assert gemma_spec.block_range(0, 270) == (0, 2)  # tokens 238..270 straddle two blocks
    assert gemma_spec.max_blocks(0) == 2 and gemma_spec.max_blocks(1) is None
    assert gemma_spec.bytes_for_tokens(8192) == (2 * 1 + 2 * 32) * gemma_spec.bytes_per_block(0)


def test_gemma3_like_sliding_saving():
    # The docs' figure: 48 layers, 40 of them sliding with a 1024 window, an
    # 8K-token agent (not block-aligned: the window then straddles 5 blocks).
    g = Geometry(8, 256, 256, "bfloat16")
    layers = tuple(LayerSpec(g, None if i % 6 == 5 else 1024) for i in range(48))
    spec = ModelCacheSpec(layers)
    held = sum(spec.blocks_held(i, 8100) for i in range(48))
    assert held == 8 * 32 + 40 * 5
    assert 48 * 32 * spec.bytes_per_block(0) / spec.bytes_for_tokens(8100) == pytest.approx(1536 / 456)


def test_spec_round_trips_through_dict(gemma_spec):
    assert ModelCacheSpec.from_dict(gemma_spec.to_dict()) == gemma_spec


def test_an_ssm_model_is_described_by_its_state_shapes():
    from mlx_lm.models import mamba

    args = mamba.ModelArgs(
        model_type="mamba",
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        state_size=4,
        num_hidden_layers=2,
        conv_kernel=4,
        use_bias=False,
        use_conv_bias=True,
        time_step_rank=4,
    )
    spec = ModelCacheSpec.from_model(mamba.Model(args))
    assert [layer.attention for layer in spec.layers] == ["recurrent", "recurrent"]
    geometry = spec.layers[0].geometry
    assert isinstance(geometry, StateGeometry) and geometry.shapes == ((3, 32), (32, 4))
    assert spec.bytes_per_block(0) == (3 * 32 + 32 * 4) * 4 and ModelCacheSpec.from_dict(spec.to_dict()) == spec


class _CustomCacheModel(nn.Module):
    """A model whose make_cache returns real mlx-lm cache classes we cannot store."""

    def __init__(self, caches):
        super().__init__()
        self._caches = caches

    def make_cache(self):
        return self._caches()

    def __call__(self, x, cache=None):  # pragma: no cover - never reached
        raise AssertionError("the spec must reject the cache before the probe")


class _LayerCache:
    """A cache class of a model's own, outside mlx-lm's cache module (as DeepSeek V4.1 has)."""


@pytest.mark.parametrize(
    "caches, message",
    [
        (lambda: [KVCache(), _LayerCache()], "layer 1 uses _LayerCache, which blockpool does not store"),
        (lambda: [CacheList(KVCache(), _LayerCache())], "layer 0 uses _LayerCache"),
        (lambda: [RotatingKVCache(64, keep=4)], "layer 0 uses RotatingKVCache with keep=4"),
    ],
)
def test_other_cache_classes_are_unsupported(caches, message):
    with pytest.raises(UnsupportedModelError, match=message):
        ModelCacheSpec.from_model(_CustomCacheModel(caches))
