"""The mlx-lm drop-in functions: the documented calls with their defaults, exact output, and misuse.

The oracle is mlx-lm itself, called with the same model and arguments.
Tests of the default store load their own model instance (``fresh_model``)
so that the store made for it, and its pool, go away with it.
"""

from __future__ import annotations

import contextlib
import gc
import inspect
import io
import sys
import threading
import weakref

import mlx.core as mx
import mlx_lm
import pytest
from mlx_lm import load

import blockpool
import tiny_models
from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, InvalidRequestError, ModelCacheSpec
from blockpool.generate import default_memory

pytestmark = pytest.mark.integration

# mlx_lm.generate is both a function and a module: take the module.
mlx_generate_module = sys.modules["mlx_lm.generate"]
PROMPT = "the agent reads a file and writes"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_models.write_model_dir(tmp_path_factory.mktemp("dropin-llama"), "llama")


@pytest.fixture
def fresh_model(model_dir, monkeypatch):
    """A model instance of this test's own, with a small default pool (the 1 GiB default is tested once)."""
    monkeypatch.setenv("BLOCKPOOL_MEMORY_BYTES", str(8 << 20))
    return load(str(model_dir))


@pytest.fixture
def memory(load_tiny):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
    return AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool))


def force_eos_after(n_tokens: int, eos: int):
    """A logits processor that makes EOS the only choice once the sequence has ``n_tokens`` tokens."""

    def processor(tokens: mx.array, logits: mx.array) -> mx.array:
        if tokens.size < n_tokens:
            return logits
        return mx.where(mx.arange(logits.shape[-1]) == eos, logits, -mx.inf)

    return processor


# ------------------------------------------------------------------ defaults


@pytest.mark.parametrize("name", ["generate", "stream_generate", "batch_generate"])
def test_signatures_match_mlx_lm(name):
    ours = inspect.signature(getattr(blockpool, name)).parameters
    theirs = inspect.signature(getattr(mlx_generate_module, name)).parameters
    for param in theirs.values():
        assert param.name in ours, f"{name} lacks {param.name}"
        mine = ours[param.name]
        assert mine.kind == param.kind and mine.default == param.default, f"{name}.{param.name} differs"
    extra = [p for p in ours.values() if p.name not in theirs]
    assert all(p.kind == inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty for p in extra)
    assert {p.name for p in extra} == ({"agent_ids", "memory"} if name == "batch_generate" else {"agent_id", "memory"})


def test_only_required_arguments_with_the_real_default_budget(model_dir, monkeypatch):
    """generate / stream_generate / batch_generate with nothing but model, tokenizer and prompt."""
    monkeypatch.delenv("BLOCKPOOL_MEMORY_BYTES", raising=False)
    model, tokenizer = load(str(model_dir))
    assert blockpool.generate(model, tokenizer, "Hello") == mlx_lm.generate(model, tokenizer, "Hello")
    ours = [(r.text, r.token, r.finish_reason) for r in blockpool.stream_generate(model, tokenizer, "Hello")]
    assert ours == [(r.text, r.token, r.finish_reason) for r in mlx_lm.stream_generate(model, tokenizer, "Hello")]
    prompts = [tokenizer.encode("Hello"), tokenizer.encode(PROMPT)]
    assert (
        blockpool.batch_generate(model, tokenizer, prompts).texts
        == mlx_lm.batch_generate(model, tokenizer, prompts).texts
    )
    assert default_memory(model, tokenizer).pool.total_bytes <= 1 << 30


def test_the_documented_call(fresh_model):
    model, tokenizer = fresh_model
    expected = mlx_lm.generate(model, tokenizer, "Hello", max_tokens=32)
    assert blockpool.generate(model, tokenizer, "Hello", max_tokens=32, agent_id="a") == expected
    memory = default_memory(model, tokenizer)
    assert memory.where("a") == "pool"
    final = list(blockpool.stream_generate(model, tokenizer, "Hello", max_tokens=32, agent_id="a"))[-1]
    assert final.cache_source == "pool" and final.cached_tokens > 0  # the agent's cache was reused


def test_one_default_store_per_model_and_tokenizer_released_with_the_model(fresh_model, model_dir):
    model, tokenizer = load(str(model_dir))  # not the fixture's: pytest keeps that one alive
    memory = default_memory(model, tokenizer)
    assert default_memory(model, tokenizer) is memory
    other_model, other_tokenizer = load(str(model_dir))
    assert default_memory(other_model, other_tokenizer) is not memory
    assert default_memory(model, other_tokenizer) is not memory  # another tokenizer object: its own store
    assert "_blockpool_default_stores" not in dict(model)  # not part of the module tree
    assert len(model.parameters()) == len(other_model.parameters())
    blockpool.generate(model, tokenizer, "Hello", max_tokens=4)
    refs = [weakref.ref(model), weakref.ref(memory), weakref.ref(memory.pool)]
    del model, memory
    gc.collect()
    assert [r() for r in refs] == [None, None, None]


def test_a_plain_hugging_face_tokenizer_is_wrapped_as_mlx_lm_wraps_it(fresh_model):
    model, tokenizer = fresh_model
    raw = tokenizer._tokenizer
    assert blockpool.generate(model, raw, PROMPT, max_tokens=16) == mlx_lm.generate(model, raw, PROMPT, max_tokens=16)


def test_a_bad_default_budget_is_refused(fresh_model, monkeypatch):
    model, tokenizer = fresh_model
    for bad in ("lots", "0", "-5"):
        monkeypatch.setenv("BLOCKPOOL_MEMORY_BYTES", bad)
        with pytest.raises(InvalidRequestError, match="BLOCKPOOL_MEMORY_BYTES"):
            blockpool.generate(model, tokenizer, "Hello", max_tokens=4)


# ------------------------------------------------------------------ exact output and response fields


def test_drop_ins_equal_mlx_lm(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    for _ in range(2):  # the second call reuses the agent's cache
        ours = blockpool.generate(model, tokenizer, PROMPT, max_tokens=24, agent_id="a", memory=memory)
        assert ours == mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=24)
    ours = list(blockpool.stream_generate(model, tokenizer, PROMPT, max_tokens=24, agent_id="a", memory=memory))
    theirs = list(mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=24))
    assert [(r.text, r.token, r.finish_reason, r.generation_tokens, r.prompt_tokens, r.from_draft) for r in ours] == [
        (r.text, r.token, r.finish_reason, r.generation_tokens, r.prompt_tokens, r.from_draft) for r in theirs
    ]
    assert isinstance(ours[0], mlx_generate_module.GenerationResponse) and ours[-1].cache_source == "pool"
    assert all(mx.array_equal(a.logprobs, b.logprobs).item() for a, b in zip(ours, theirs))

    prompts = [tokenizer.encode(p) for p in ("the agent", "memory blocks move from the pool", "numbers like 12 345")]
    kwargs = dict(max_tokens=[12, 20, 16], return_token_ids=True, return_logprobs=True)
    mine = blockpool.batch_generate(model, tokenizer, prompts, memory=memory, **kwargs)
    ref = mlx_lm.batch_generate(model, tokenizer, prompts, **kwargs)
    assert isinstance(mine, mlx_generate_module.BatchResponse)
    assert (mine.texts, mine.token_ids, mine.logprobs) == (ref.texts, ref.token_ids, ref.logprobs)
    assert mine.stats.generation_tokens == ref.stats.generation_tokens == sum(len(t) for t in ref.token_ids)


def test_batch_caches_equal_mlx_lm(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    prompts = [tokenizer.encode("the agent reads"), tokenizer.encode("memory blocks move from the pool")]
    kwargs = dict(max_tokens=[5, 9], return_prompt_caches=True)
    mine = blockpool.batch_generate(model, tokenizer, prompts, memory=memory, agent_ids=["c0", "c1"], **kwargs)
    ref = mlx_lm.batch_generate(model, tokenizer, prompts, **kwargs)
    for ours, theirs in zip(mine.caches, ref.caches):
        assert [type(c) for c in ours] == [type(c) for c in theirs]
        for a, b in zip(ours, theirs):
            assert a.offset == b.offset
            for x, y in ((a.keys, b.keys), (a.values, b.values)):
                assert mx.array_equal(x[..., : a.offset, :], y[..., : b.offset, :]).item()


def test_response_fields_have_mlx_lm_meaning(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    ours = list(blockpool.stream_generate(model, tokenizer, PROMPT, max_tokens=8, agent_id="fields", memory=memory))
    n_prompt = len(tokenizer.encode(PROMPT))
    for i, r in enumerate(ours, 1):
        assert r.generation_tokens == i and r.prompt_tokens == n_prompt and r.from_draft is False
        assert r.prompt_tps > 0 and r.generation_tps > 0 and r.peak_memory > 0
        assert r.logprobs.shape == (model.args.vocab_size,)
        assert abs(mx.logsumexp(r.logprobs).item()) < 1e-4  # log-probabilities, normalised
        assert r.agent_id == "fields"
    assert len({r.prompt_tps for r in ours}) == 1  # measured once, at the first token, as mlx-lm does
    assert [r.finish_reason for r in ours] == [None] * 7 + ["length"]
    assert ours[-1].cache_source == "cold" and ours[-1].cached_tokens == 0
    again = list(blockpool.stream_generate(model, tokenizer, PROMPT, max_tokens=8, agent_id="fields", memory=memory))
    assert again[-1].cache_source == "pool" and again[-1].cached_tokens == n_prompt - 1  # one token is always prefilled
    assert again[-1].prompt_tokens == n_prompt  # the whole prompt, as mlx-lm counts it


def test_eos_ends_as_in_mlx_lm(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    (eos,) = tokenizer.eos_token_ids
    n_prompt = len(tokenizer.encode(PROMPT))
    processors = [force_eos_after(n_prompt + 3, eos)]  # EOS is the 4th generated token
    ours = list(
        blockpool.stream_generate(model, tokenizer, PROMPT, max_tokens=16, logits_processors=processors, memory=memory)
    )
    theirs = list(mlx_lm.stream_generate(model, tokenizer, PROMPT, max_tokens=16, logits_processors=processors))
    assert [(r.text, r.token, r.finish_reason, r.generation_tokens) for r in ours] == [
        (r.text, r.token, r.finish_reason, r.generation_tokens) for r in theirs
    ]
    assert ours[-1].token == eos and ours[-1].finish_reason == "stop" and len(ours) == 4
    kwargs = dict(max_tokens=16, logits_processors=processors, return_token_ids=True, return_logprobs=True)
    prompts = [tokenizer.encode(PROMPT)]
    mine = blockpool.batch_generate(model, tokenizer, prompts, memory=memory, agent_ids=["eos-batch"], **kwargs)
    ref = mlx_lm.batch_generate(model, tokenizer, prompts, **kwargs)
    assert (mine.texts, mine.token_ids, mine.logprobs) == (ref.texts, ref.token_ids, ref.logprobs)
    assert eos not in mine.token_ids[0] and len(mine.token_ids[0]) == 3


def test_chat_messages_and_token_arrays_are_prompts_too(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "plan the "}, {"type": "text", "text": "refactor"}]}
    ]
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "plan the refactor"}], add_generation_prompt=True
    )
    expected = mlx_lm.generate(model, tokenizer, rendered, max_tokens=12)
    assert blockpool.generate(model, tokenizer, messages, max_tokens=12, agent_id="chat", memory=memory) == expected
    assert (
        blockpool.generate(model, tokenizer, mx.array(rendered), max_tokens=12, agent_id="arr", memory=memory)
        == expected
    )


# ------------------------------------------------------------------ stop strings


def a_stop_string(text: str) -> str:
    """A 3-character piece of ``text`` each of whose characters appears earlier on its own.

    Split into characters, it would stop generation earlier than it should.
    """
    for i in range(1, len(text) - 3):
        piece = text[i : i + 3]
        first = text.find(piece)
        if piece.strip() and first == i and all(c in text[:i] for c in piece):
            return piece
    raise AssertionError(f"no usable stop string in {text!r}")


def test_a_stop_string_is_one_string_not_characters(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    reference = mlx_lm.generate(model, tokenizer, PROMPT, max_tokens=40)
    stop = a_stop_string(reference)
    expected = reference[: reference.find(stop)]
    assert (
        blockpool.generate(model, tokenizer, PROMPT, max_tokens=40, stop=stop, agent_id="s1", memory=memory) == expected
    )
    assert (
        blockpool.generate(
            model, tokenizer, PROMPT, max_tokens=40, stop=[stop, "\x00never"], agent_id="s2", memory=memory
        )
        == expected
    )
    final = list(
        blockpool.stream_generate(model, tokenizer, PROMPT, max_tokens=40, stop=(stop,), agent_id="s3", memory=memory)
    )[-1]
    assert final.finish_reason == "stop"

    prompts = [tokenizer.encode(PROMPT), tokenizer.encode("memory blocks move")]
    batch = blockpool.batch_generate(
        model, tokenizer, prompts, max_tokens=40, stop=stop, memory=memory, return_token_ids=True
    )
    assert batch.texts[0] == expected
    other = mlx_lm.generate(model, tokenizer, prompts[1], max_tokens=40)
    assert batch.texts[1] == (other[: other.find(stop)] if stop in other else other)


# ------------------------------------------------------------------ prompt progress


def test_prompt_progress_callback_is_called_as_mlx_lm_calls_it(load_tiny):
    model, tokenizer = load_tiny("llama")
    step = 16
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool, prefill_step_size=step))
    prompt = mx.random.randint(3, 500, (40,), key=mx.random.key(7)).tolist()
    theirs, ours = [], []
    mlx_lm.generate(
        model,
        tokenizer,
        prompt,
        max_tokens=2,
        prefill_step_size=step,
        prompt_progress_callback=lambda *a: theirs.append(a),
    )
    blockpool.generate(
        model,
        tokenizer,
        prompt,
        max_tokens=2,
        agent_id="p",
        memory=memory,
        prompt_progress_callback=lambda *a: ours.append(a),
    )
    assert theirs[0] == (0, 40) and theirs[-1] == (40, 40) and len(theirs) > 3  # start, per chunk, end
    assert ours == theirs
    # Resumed: the callback counts the tokens actually prefilled.
    resumed = []
    longer = prompt + mx.random.randint(3, 500, (20,), key=mx.random.key(8)).tolist()
    blockpool.generate(
        model,
        tokenizer,
        longer,
        max_tokens=2,
        agent_id="p",
        memory=memory,
        prompt_progress_callback=lambda *a: resumed.append(a),
    )
    total = resumed[0][1]
    assert resumed[0] == (0, total) and resumed[-1] == (total, total) and 20 <= total < len(longer)
    assert all(a[0] <= b[0] for a, b in zip(resumed, resumed[1:]))


# ------------------------------------------------------------------ leaving early, misuse


def test_leaving_a_stream_early_cancels_and_keeps_the_agent_usable(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    blockpool.generate(model, tokenizer, PROMPT, max_tokens=8, agent_id="early", memory=memory)
    cached = memory.where("early")
    for i, _ in enumerate(
        blockpool.stream_generate(model, tokenizer, PROMPT + " more", max_tokens=30, agent_id="early", memory=memory)
    ):
        if i == 2:
            break
    assert memory.where("early") == cached == "pool" and memory.engine.in_flight == 0
    again = blockpool.generate(model, tokenizer, PROMPT + " more", max_tokens=12, agent_id="early", memory=memory)
    assert again == mlx_lm.generate(model, tokenizer, PROMPT + " more", max_tokens=12)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"draft_model": "m"}, "draft_model"),
        ({"prompt_cache": []}, "prompt_cache"),
        ({"kv_bits": 4}, "kv_bits"),
        ({"max_kv_size": 64}, "max_kv_size"),
        ({"input_embeddings": mx.zeros((2, 4))}, "input_embeddings"),
        ({"bogus": 1}, "unknown arguments"),
        ({"max_tokens": 0}, "at least 1"),
        ({"max_tokens": -1}, "no limit"),
        ({"max_tokens": True}, "integer"),
        ({"max_tokens": 2.0}, "integer"),
        ({"stop": [""]}, "stop must be"),
        ({"stop": 5}, "stop must be"),
        ({"stop": ["a", 3]}, "stop must be"),
        ({"prompt_progress_callback": 3}, "callable"),
        ({"memory": "not a store"}, "AgentMemory"),
        ({"prompt": b"Hello"}, "bytes"),
        ({"prompt": "a\ud800"}, "Unicode"),
        ({"prompt": [1, 2, 512]}, r"\[0, 512\)"),
        ({"prompt": ""}, "empty"),
    ],
)
def test_drop_ins_refuse_what_they_do_not_support(load_tiny, memory, kwargs, message):
    model, tokenizer = load_tiny("llama")
    kwargs = {"prompt": "hi", "memory": memory, **kwargs}
    before = memory.pool.stats()
    with pytest.raises(InvalidRequestError, match=message):
        blockpool.generate(model, tokenizer, **kwargs)
    assert memory.pool.stats() == before and memory.engine.in_flight == 0


def test_another_models_store_is_refused(load_tiny, memory):
    _, tokenizer = load_tiny("llama")
    other, _ = load_tiny("qwen3")
    with pytest.raises(InvalidRequestError, match="another model"):
        blockpool.generate(other, tokenizer, "hi", memory=memory)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prompt_caches": [[]]}, "prompt_caches"),
        ({"agent_ids": ["a", "a"]}, "agent_ids"),
        ({"agent_ids": ["a"]}, "agent_ids"),
        ({"max_tokens": [4]}, "1 entries for 2 prompts"),
        ({"max_tokens": [4, 0]}, "at least 1"),
        ({"prompts": [[1, 2], b"xy"]}, "bytes"),  # the second prompt is bad: the first is not submitted either
        ({"prompts": [[1, 2], []]}, "empty"),
        ({"prompts": "hello"}, "list of prompts"),
        ({"stop_tokens": [[5]]}, "stop_tokens"),
        ({"bogus": 1}, "unknown arguments"),
    ],
)
def test_batch_generate_refuses_before_submitting_anything(load_tiny, memory, kwargs, message):
    model, tokenizer = load_tiny("llama")
    kwargs = {"prompts": [[5, 6, 7], [8, 9]], "agent_ids": ["b0", "b1"], "memory": memory, **kwargs}
    before = memory.pool.stats()
    with pytest.raises(InvalidRequestError, match=message):
        blockpool.batch_generate(model, tokenizer, **kwargs)
    assert memory.pool.stats() == before and memory.engine.in_flight == 0
    assert memory.where("b0") == "none"


def test_empty_batch_is_an_empty_response(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    ours = blockpool.batch_generate(model, tokenizer, [], memory=memory, return_token_ids=True)
    theirs = mlx_lm.batch_generate(model, tokenizer, [], return_token_ids=True)
    assert (ours.texts, ours.token_ids) == (theirs.texts, theirs.token_ids) == ([], [])


def test_verbose_prints_as_mlx_lm_does(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    ours, theirs = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(ours):
        text = blockpool.generate(model, tokenizer, PROMPT, verbose=True, max_tokens=8, agent_id="v", memory=memory)
    with contextlib.redirect_stdout(theirs):
        mlx_lm.generate(model, tokenizer, PROMPT, verbose=True, max_tokens=8)
    ours_lines, theirs_lines = ours.getvalue().splitlines(), theirs.getvalue().splitlines()
    assert ours_lines[:3] == theirs_lines[:3] == ["=" * 10, text, "=" * 10]
    assert [line.split(":")[0] for line in ours_lines[3:]] == [line.split(":")[0] for line in theirs_lines[3:]]


# ------------------------------------------------------------------ threads


def _in_threads(calls):
    """Run the calls at once, one thread each (released together); their results, or the first error."""
    barrier = threading.Barrier(len(calls))
    results, errors = [None] * len(calls), []

    def run(i, call):
        barrier.wait()
        try:
            results[i] = call()
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, call)) for i, call in enumerate(calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    return results


def test_threads_calling_generate_with_the_defaults_each_get_mlx_lms_output_in_one_batch(load_tiny):
    """As with ``mlx_lm.generate``, concurrent calls all succeed; here they also decode together."""
    model, tokenizer = load_tiny("llama")
    counted = tiny_models.FailingModel(model)  # never armed: it counts forward passes
    memory = AgentMemory(
        BlockPoolBatchEngine(counted, tokenizer, BlockPool(ModelCacheSpec.from_model(model), num_blocks=64))
    )
    prompts = [f"{PROMPT} {word}" for word in ("slowly", "again", "twice", "well")]
    expected = [mlx_lm.generate(model, tokenizer, p, max_tokens=12) for p in prompts]
    counted.calls = 0
    got = _in_threads(
        [lambda p=p: blockpool.generate(counted, tokenizer, p, max_tokens=12, memory=memory) for p in prompts]
    )
    assert got == expected
    alone = len(prompts) * (1 + 12)  # a prefill and 12 decode steps each, one after the other
    assert counted.calls < alone, counted.calls  # they shared forward passes: one batch
    assert [a.agent_id for a in memory.agents()] == ["default"]  # the stand-ins for the busy default agent are gone
    memory.close()
    assert memory.pool.stats().used_bytes == 0


def test_threads_share_an_agent_in_turn_and_mix_the_three_functions(memory):
    """The same named agent from two threads runs one call after the other; stream and batch calls join in."""
    model, tokenizer = memory.engine.model, memory.engine.tokenizer
    first, longer = PROMPT, PROMPT + " and then reads it back"

    def stream_three():
        return "".join(
            r.text for r in blockpool.stream_generate(model, tokenizer, "the pool", max_tokens=3, memory=memory)
        )

    calls = [
        lambda: blockpool.generate(model, tokenizer, first, max_tokens=8, agent_id="shared", memory=memory),
        lambda: blockpool.generate(model, tokenizer, longer, max_tokens=8, agent_id="shared", memory=memory),
        lambda: blockpool.batch_generate(model, tokenizer, [[5, 6, 7], [8, 9]], max_tokens=5, memory=memory).texts,
        stream_three,
    ]
    got = _in_threads(calls)
    assert got[0] == mlx_lm.generate(model, tokenizer, first, max_tokens=8)
    assert got[1] == mlx_lm.generate(model, tokenizer, longer, max_tokens=8)
    assert got[2] == mlx_lm.batch_generate(model, tokenizer, [[5, 6, 7], [8, 9]], max_tokens=5).texts
    assert got[3] == mlx_lm.generate(model, tokenizer, "the pool", max_tokens=3)
    memory.close()
    assert memory.pool.stats().used_bytes == 0
