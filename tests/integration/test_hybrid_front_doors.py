"""Hybrid models through every front door: the drop-in functions, AgentMemory's stats, quantized pools,
``blockpool doctor --model``, ``blockpool demo --model`` and ``blockpool serve``; and snapshots that never
alias the live cache."""

from __future__ import annotations

import copy

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm import load
from mlx_lm.models.cache import ArraysCache

import blockpool
from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from blockpool.demo_model import build_model, write_model_dir
from blockpool.kinds import RecurrentState
from cli_runner import run_cli
from family_configs import FAMILY_CONFIGS
from family_models import family_model, shared_tokenizer, tokens

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def hybrid_dir(tmp_path_factory):
    """A tiny Qwen3.5-like model (gated delta net + full attention) as a model directory."""
    return write_model_dir(tmp_path_factory.mktemp("qwen3_5"), copy.deepcopy(FAMILY_CONFIGS["qwen3_5"]))


def test_drop_ins_equal_mlx_lm_and_reuse_the_agents_state(hybrid_dir):
    model, tokenizer = load(str(hybrid_dir))
    prompt = "def parse(line):"
    assert blockpool.generate(model, tokenizer, prompt, max_tokens=12) == mlx_lm.generate(
        model, tokenizer, prompt, max_tokens=12
    )
    longer = prompt + " return line.split()"
    final = list(blockpool.stream_generate(model, tokenizer, longer, max_tokens=12))[-1]
    assert final.cache_source == "pool" and final.cached_tokens > 0  # resumed from its checkpoint, not recomputed
    text = "".join(r.text for r in blockpool.stream_generate(model, tokenizer, longer, max_tokens=12, agent_id="x"))
    assert text == mlx_lm.generate(model, tokenizer, longer, max_tokens=12)
    prompts = [[5, 6, 7], list(range(8, 60))]
    assert (
        blockpool.batch_generate(model, tokenizer, prompts, max_tokens=6).texts
        == mlx_lm.batch_generate(model, tokenizer, prompts, max_tokens=6).texts
    )


def test_stats_report_the_bytes_checkpoints_hold():
    model, tokenizer = family_model("qwen3_5"), shared_tokenizer()
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=32 << 20)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool, checkpoint_blocks=1))
    memory.submit("a", tokens(700, 1), max_tokens=3)
    (done,) = list(memory.step())
    (layer,) = pool.spec.state_layers
    # Checkpoints at 256 and 512 (the grid), at 699 (where the prompt ended), and the last token at 703.
    assert done.blocks.positions[layer] == [256, 512, 699, 703]
    assert memory.stats().checkpoint_bytes == 3 * pool.bytes_per_block(layer)
    memory.close()
    assert memory.stats().checkpoint_bytes == 0 and pool.stats().used_bytes == 0


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_pools_quantize_kv_only(bits):
    config = copy.deepcopy(FAMILY_CONFIGS["qwen3_5"])
    config["text_config"].update(
        head_dim=32, rope_parameters={**config["text_config"]["rope_parameters"], "mrope_section": [4, 2, 2]}
    )
    model, tokenizer = build_model(config), shared_tokenizer()
    spec = ModelCacheSpec.from_model(model)
    (layer,) = spec.state_layers
    pool = BlockPool(spec, memory_bytes=32 << 20, kv_bits=bits, kv_group_size=32)
    assert pool.bytes_per_block(layer) == spec.layers[layer].geometry.bytes_per_block()  # the state: model dtype
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    prompt = tokens(300, 2)
    engine.submit("q", prompt, max_tokens=4)
    (done,) = list(engine.step())
    # The state at the last token is stored exactly as the model computed it.
    cache = mlx_lm.models.cache.make_prompt_cache(model)
    model(mx.array([prompt + done.token_ids]), cache=cache)  # the last generated token was fed too
    stored = pool.read_states({layer: done.blocks.blocks[layer][-1:]})[layer][0]
    live = cache[spec.groups.index((layer,))].cache
    for mine, theirs in zip(stored, live):
        assert mx.allclose(mine, theirs[0], atol=1e-5).item()
    pool.release(done.blocks)


def test_a_snapshot_never_aliases_the_live_cache():
    kind = RecurrentState(2)
    cache = ArraysCache(2)
    cache.cache = [mx.zeros((1, 3)), mx.ones((1, 2, 2))]
    snapshot = kind.read(cache)
    cache.cache[0][0, 1] = 7.0  # the model may write into the live arrays in place
    cache.cache[1] = mx.zeros((1, 2, 2))  # or replace them
    assert snapshot[0].tolist() == [0.0, 0.0, 0.0] and snapshot[1].tolist() == [[1.0, 1.0], [1.0, 1.0]]
    rebuilt = kind.rebuild(snapshot)
    rebuilt.cache[0][0, 0] = 5.0
    assert snapshot[0].tolist() == [0.0, 0.0, 0.0]  # nor does a cache rebuilt from it alias the snapshot


def test_doctor_says_how_each_layer_is_stored_or_why_a_model_is_refused(hybrid_dir, tmp_path):
    result = run_cli("doctor", "--model", str(hybrid_dir))
    assert result.returncode == 0, result.stderr
    assert "recurrent-state: keeps snapshots of its 2-slot state" in result.stdout
    assert "full-attention: keeps every token's K and V" in result.stdout
    assert "batching" in result.stdout and "recurrent checkpoints" in result.stdout
    attention = next(line for line in result.stdout.splitlines() if line.startswith("attention"))
    assert "paged: entries" in attention and "in place" in attention  # its full-attention entries
    recurrent = write_model_dir(tmp_path / "mamba", copy.deepcopy(FAMILY_CONFIGS["mamba"]))
    result = run_cli("doctor", "--model", str(recurrent))
    assert result.returncode == 0, result.stderr
    attention = next(line for line in result.stdout.splitlines() if line.startswith("attention"))
    assert "gathered into caches per pass (no full or sliding-window attention layer" in attention
    refused = write_model_dir(tmp_path / "v41", copy.deepcopy(FAMILY_CONFIGS["deepseek_v41"]))
    result = run_cli("doctor", "--model", str(refused))
    assert result.returncode == 1 and "refused" in result.stdout and "LayerCache" in result.stdout


def test_demo_runs_on_a_hybrid_model(hybrid_dir, tmp_path):
    result = run_cli(
        "demo",
        "--model",
        str(hybrid_dir),
        "-n",
        "2",
        "-t",
        "2",
        "--max-tokens",
        "6",
        "--no-text",
        "--out",
        str(tmp_path / "out"),
        "--cache-dir",
        str(tmp_path / "agents"),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "pool" in result.stdout or "disk" in result.stdout  # second turns resumed
