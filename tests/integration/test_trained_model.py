"""The shipped trained model: it loads, it models held-out Python, and quantized blocks keep its quality.

The full tables (24 windows, every bit width and group, float16 and float32)
are in docs/quality.md, made by tools/kv_quality.py; these tests run the same
measurement on 3 windows, in float32 (mlx-lm's quantized attention is ten
times slower in float16 on a CPU), and hold bounds set from it. The
held-out files are read from the running interpreter's standard library, so
another Python version measures other text: the margins allow for that.

What the bounds are (numbers measured here are in docs/quality.md):
- Held-out perplexity: a uniform guess over the vocabulary is 4096; a
  conversion or tokenizer mistake (RoPE layout, swapped projections, another
  vocabulary) sends it to the hundreds.
- 8 bits: indistinguishable from full precision, stated as argmax agreement
  of at least 0.98 and a perplexity change within 0.5%.
- 4 bits: a small stated cost, a perplexity increase under 1% (measured:
  0.03% at most); and blockpool closer to full precision than mlx-lm's
  ``QuantizedKVCache`` holding the same history, in agreement and in KL
  divergence (mlx-lm also quantizes the continuation's own tokens, blockpool
  keeps those at full precision; perplexity alone is too noisy to order them).
- That blockpool's quantized history equals ``mx.dequantize(mx.quantize(...))``
  bit for bit is held by test_quantized_quality.py, on every bit width and group.
"""

from __future__ import annotations

import sys
from pathlib import Path

import mlx.core as mx
import pytest
from mlx_lm import load

from blockpool.demo_model import SLIDING_WINDOW_MODEL, trained_model_dir, training_record

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tools"))
import kv_quality  # noqa: E402

pytestmark = pytest.mark.integration

HISTORY, CONTINUATION, WINDOWS = 320, 96, 3
MAX_PERPLEXITY = 80.0  # measured 47.0 on these 3 windows (30.7 over the 24 of docs/quality.md)
EIGHT_BIT = (0.98, 0.005)  # minimum agreement, largest relative perplexity change; measured 0.9965, -0.003%
FOUR_BIT_MAX_INCREASE = {32: 0.01, 128: 0.01}  # measured -0.05% and -0.34% here, +0.01% and +0.03% over 24 windows
CONFIGS = [(8, 64, ("blockpool",)), (4, 32, ("blockpool",)), (4, 128, ("blockpool", "mlx-lm"))]


@pytest.fixture(scope="module")
def shipped():
    model, tokenizer = load(str(trained_model_dir()))
    return model, tokenizer


@pytest.fixture(scope="module")
def scores(shipped):
    model, tokenizer = shipped
    model32, _ = load(str(trained_model_dir()))
    model32.set_dtype(mx.float32)
    windows = kv_quality.heldout_windows(tokenizer, trained_model_dir(), WINDOWS, HISTORY + CONTINUATION + 1)
    assert len(windows) == WINDOWS
    return kv_quality.measure(model32, windows, HISTORY, CONFIGS)


def test_the_shipped_files_describe_one_model():
    record = training_record()
    path = trained_model_dir()
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "training.json"} <= {
        p.name for p in path.iterdir()
    }
    weights = mx.load(str(path / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.float16}
    assert sum(w.size for w in weights.values()) == record["parameters"]
    curve = record["history"]["heldout"]
    assert curve[-1] == [record["hyperparameters"]["steps"], record["final"]["heldout_loss"]]
    assert curve[-1][1] < curve[0][1] - 1.5  # it learned: held-out loss fell from 5.50 to 3.56 nats
    assert record["corpus"]["heldout_files"] and record["seed"] == 1234
    check = record["conversion_check"]["fp16 weights in both"]
    assert check["argmax_agreement"] == 1.0 and check["max_abs_logit_diff"] < 1e-3


def test_heldout_perplexity(scores):
    full = scores[("full", None, 0)]
    assert full.positions == WINDOWS * CONTINUATION
    assert full.perplexity < MAX_PERPLEXITY


def test_eight_bit_history_is_indistinguishable(scores, record_property):
    full, pool = scores[("full", None, 0)], scores[("blockpool", 8, 64)]
    change = pool.perplexity / full.perplexity - 1
    record_property("agreement", pool.agreement)
    record_property("perplexity-change", change)
    min_agree, max_change = EIGHT_BIT
    assert pool.agreement >= min_agree
    assert abs(change) <= max_change


@pytest.mark.parametrize("group_size", [32, 128])
def test_four_bit_history_costs_little(scores, record_property, group_size):
    full, pool = scores[("full", None, 0)], scores[("blockpool", 4, group_size)]
    increase = pool.perplexity / full.perplexity - 1
    record_property("agreement", pool.agreement)
    record_property("perplexity-increase", increase)
    assert increase <= FOUR_BIT_MAX_INCREASE[group_size]
    if group_size == 128:  # side by side with mlx-lm's own quantized cache on the same history
        mlx_lm = scores[("mlx-lm", 4, 128)]
        assert pool.agreement >= mlx_lm.agreement  # measured 1.000 and 0.962
        assert pool.mean_kl < mlx_lm.mean_kl / 3  # measured 10x apart (quality.md): mlx-lm quantizes more


def test_chat_answer_looks_like_python(shipped):
    from mlx_lm import generate

    model, tokenizer = shipped
    messages = [
        {"role": "system", "content": "You are the coder of a team that maintains the Python standard library."},
        {"role": "user", "content": "Write parse_header(line). Split a header line into its name and value."},
    ]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = generate(model, tokenizer, prompt, max_tokens=40)
    assert text.startswith("def parse_header(line):\n    ")  # a function, its name and an indented body


def test_sliding_window_variant_with_four_bit_blocks():
    """mlx-lm cannot quantize a RotatingKVCache; blockpool stores sliding layers quantized like the others."""
    model, tokenizer = load(str(trained_model_dir(SLIDING_WINDOW_MODEL)))
    model.set_dtype(mx.float32)
    windows = kv_quality.heldout_windows(
        tokenizer, trained_model_dir(SLIDING_WINDOW_MODEL), 2, HISTORY + CONTINUATION + 1
    )
    scores = kv_quality.measure(model, windows, HISTORY, [(4, 128, ("blockpool", "oracle"))])
    full, pool, oracle = scores[("full", None, 0)], scores[("blockpool", 4, 128)], scores[("oracle", 4, 128)]
    assert full.perplexity < MAX_PERPLEXITY
    assert pool.agree == oracle.agree and abs(pool.nll - oracle.nll) <= 1e-6 * oracle.nll  # the same numbers
    assert pool.perplexity / full.perplexity - 1 <= FOUR_BIT_MAX_INCREASE[128]


def test_an_unknown_shipped_model_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        trained_model_dir("no-such-model")
