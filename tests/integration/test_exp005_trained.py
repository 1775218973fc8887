"""EXP-005 on the shipped trained model: the engine's greedy output equals mlx-lm's.

The random-weight models of test_exp005_equivalence.py are the harder case
(near-tied logits); this one is what the demo runs, in the dtype it ships
(float16) and in float32 and bfloat16 (the float16 weights converted at load).
Cases are spread over dtypes to keep the suite short: every dtype gets the
short prompt, float16 the 1000+ token prompt and the three-turn resume,
bfloat16 the resume too. The sliding-window variant (layers 0 and 2 see 128
tokens) resumes agents whose history is past its window, in bfloat16.
"""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm import load

from blockpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from blockpool.demo_model import SLIDING_WINDOW_MODEL, TRAINED_MODEL, trained_model_dir
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration

_loaded: dict[tuple[str, str], tuple] = {}


def trained(dtype: mx.Dtype, name: str = TRAINED_MODEL):
    key = (name, str(dtype))
    if key not in _loaded:
        model, tokenizer = load(str(trained_model_dir(name)))
        model.set_dtype(dtype)
        _loaded[key] = (model, tokenizer)
    return _loaded[key]


def engine_for(model, tokenizer):
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
    return pool, BlockPoolBatchEngine(model, tokenizer, pool)


def run_one(engine, agent, prompt, max_tokens, cache=None):
    engine.submit(agent, prompt, cache=cache, max_tokens=max_tokens)
    (completion,) = list(engine.step())
    return completion


def chat(tokenizer, task: str) -> list[int]:
    messages = [
        {"role": "system", "content": "You are the coder of a team that maintains the Python standard library."},
        {"role": "user", "content": task},
    ]
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16], ids=str)
def test_short_prompt(dtype):
    model, tokenizer = trained(dtype)
    pool, engine = engine_for(model, tokenizer)
    prompt = chat(tokenizer, "Write parse_header(line). Split a header line into its name and value.")
    done = run_one(engine, "a", prompt, 40)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 40)
    assert len(done.token_ids) >= 8  # it answers instead of ending at once
    pool.release(done.blocks)


def test_prompt_over_1000_tokens():
    model, tokenizer = trained(mx.float16)
    pool, engine = engine_for(model, tokenizer)
    source = "\n".join(f"def scale_{i}(x):\n    return x * {i} + len(str(x))\n" for i in range(150))
    prompt = tokenizer.encode(source)[:1100]
    assert len(prompt) == 1100  # five blocks
    done = run_one(engine, "a", prompt, 24)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 24)
    assert done.blocks.total_tokens == 1100 + len(done.token_ids)
    pool.release(done.blocks)


@pytest.mark.parametrize("dtype", [mx.float16, mx.bfloat16], ids=str)
def test_resume_over_three_turns_equals_cold_run_on_full_history(dtype):
    model, tokenizer = trained(dtype)
    pool, engine = engine_for(model, tokenizer)
    tasks = [
        "Write quote(value). Quote *value* if it contains special characters.",
        "Write unquote(value). Remove the quotes around *value*.",
        "Write split_lines(text, keepends=False). Split *text* into a list of lines.",
    ]
    history: list[int] = []
    cache = None
    for turn, task in enumerate(tasks):
        prompt = chat(tokenizer, task)  # each turn appends a new exchange to the history
        done = run_one(engine, "a", prompt, 48, cache=cache)
        history += prompt
        assert done.cached_tokens == len(history) - len(prompt)
        assert done.token_ids == mlx_lm_tokens(model, tokenizer, history, 48), f"turn {turn}"
        history += done.token_ids
        cache = done.blocks
    assert len(history) > 256  # the history crossed a block edge
    pool.release(cache)
    assert pool.available_blocks() == pool.total_blocks


def test_sliding_window_variant_resumes_past_its_window():
    model, tokenizer = trained(mx.bfloat16, SLIDING_WINDOW_MODEL)
    pool, engine = engine_for(model, tokenizer)
    source = "\n".join(f"def scale_{i}(x):\n    return x * {i}\n" for i in range(40))
    histories = {
        "short": tokenizer.encode('class Parser:\n    """Parse a header."""\n\n    def __init__(self, line):\n'),
        "long": tokenizer.encode(source)[:160],
    }
    caches = {}
    for agent, prompt in histories.items():  # "short" crosses the 128-token window while decoding
        engine.submit(agent, prompt, max_tokens=120)
    for c in engine.step():
        assert c.token_ids == mlx_lm_tokens(model, tokenizer, histories[c.agent_id], 120), c.agent_id
        histories[c.agent_id] += c.token_ids
        caches[c.agent_id] = c.blocks
    assert len(histories["short"]) > 128
    for agent in histories:
        follow_up = chat(tokenizer, "Write unquote(value). Remove the quotes around *value*.")
        histories[agent] += follow_up
        engine.submit(agent, follow_up, cache=caches[agent], max_tokens=20)
    for c in engine.step():
        assert c.cached_tokens > 0
        assert c.token_ids == mlx_lm_tokens(model, tokenizer, histories[c.agent_id], 20), c.agent_id
        pool.release(c.blocks)
    assert pool.available_blocks() == pool.total_blocks
