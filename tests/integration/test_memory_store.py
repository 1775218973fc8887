"""AgentMemory on tiny real models: prefix reuse, shared prefixes, spill to disk, restarts."""

from __future__ import annotations

import queue
import random
import threading

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_logits_processors

from blockpool import (
    AgentMemory,
    BlockPool,
    BlockPoolBatchEngine,
    CacheCorruptionError,
    IncompatibleCacheError,
    InvalidRequestError,
    ModelCacheSpec,
    PoolExhaustedError,
)
from blockpool.persistence import agent_file_name
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration


def tokens(n: int, seed: int) -> list[int]:
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()


def make_memory(load_tiny, arch="llama", num_blocks=64, cache_dir=None, paged=None):
    model, tokenizer = load_tiny(arch)
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=num_blocks)
    engine = BlockPoolBatchEngine(model, tokenizer, pool, paged=paged)
    return model, tokenizer, pool, AgentMemory(engine, cache_dir=cache_dir)


def turn(memory, agent, prompt, max_tokens=8):
    memory.submit(agent, prompt, max_tokens=max_tokens)
    (done,) = list(memory.step())
    return done


# ------------------------------------------------------------------ prefix matching

CASES = {
    # name: how the second prompt relates to the first turn's history
    "extension": lambda history: history + tokens(30, 1),
    "divergence mid-block": lambda history: history[:300] + tokens(40, 2),
    "divergence inside the first block": lambda history: history[:100] + tokens(40, 3),
    "exact repeat": lambda history: list(history),
}


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "gathered"])
@pytest.mark.parametrize("arch", ["llama", "gemma3_text"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefix_reuse_equals_a_cold_run(load_tiny, arch, case, paged):
    model, tokenizer, pool, memory = make_memory(load_tiny, arch, paged=paged)
    first = tokens(500, 0)
    done = turn(memory, "a", first)
    assert done.cache_source == "cold" and done.prompt_tokens == 500  # an empty cache prefills all
    history = first + done.token_ids

    prompt = CASES[case](history)
    done = turn(memory, "a", prompt)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 8)
    reusable = min(
        len(prompt) - 1,
        next((i for i, (x, y) in enumerate(zip(history, prompt)) if x != y), min(len(history), len(prompt))),
    )
    # Window 32: a gathered sliding layer writes back only the last 32 of 508 tokens, so a prompt
    # that needs the cache cut back cannot reuse it (as with mlx-lm's RotatingKVCache, which cannot
    # be trimmed once it has wrapped). A paged one wrote every token into its blocks and keeps the
    # block its window is in (tokens 256 to 507): a cut whose window starts there is served.
    held_from = 256 if paged else len(history) - 32
    if arch == "gemma3_text" and case != "extension" and reusable - 32 < held_from:
        assert done.cache_source == "cold" and done.prompt_tokens == len(prompt)
    else:
        assert done.prompt_tokens == len(prompt) - reusable  # only the rest is prefilled
        assert done.cached_tokens == reusable
    memory.close()
    assert pool.available_blocks() == pool.total_blocks


def test_chat_messages_are_rendered_with_the_template(load_tiny):
    model, tokenizer, pool, memory = make_memory(load_tiny)
    messages = [
        {"role": "system", "content": "the agent reads a file"},
        {"role": "user", "content": "writes a short plan"},
    ]
    done = turn(memory, "chat", messages)
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 8)
    messages += [{"role": "assistant", "content": done.text}, {"role": "user", "content": "and then"}]
    again = turn(memory, "chat", messages)
    assert again.cached_tokens >= len(prompt)  # the earlier turn is reused
    memory.close()


def test_bad_requests_change_nothing(load_tiny):
    _, _, pool, memory = make_memory(load_tiny)
    turn(memory, "a", tokens(40, 4))
    before = pool.stats()
    bad = (
        {"prompt": "", "max_tokens": 4},
        {"prompt": tokens(9, 5), "max_tokens": 0},
        {"prompt": [{"content": "no role"}], "max_tokens": 4},
        {"prompt": tokens(9, 5), "max_tokenz": 4},  # a misspelt keyword
        {"prompt": tokens(9, 5), "tools": [{"type": "function"}]},  # tools with a non-chat prompt
    )
    for kwargs in bad:
        with pytest.raises(InvalidRequestError):
            memory.submit("a", **kwargs)
    with pytest.raises(PoolExhaustedError):  # can never fit: refused before anything changes
        memory.submit("a", tokens(40, 4) + tokens(9, 5), max_tokens=10**6)
    assert pool.stats() == before
    assert turn(memory, "a", tokens(40, 4) + tokens(5, 6)).cached_tokens > 0  # the cache survived every refusal
    memory.close()


# ------------------------------------------------------------------ sharing


def test_ten_agents_share_a_system_prompt(load_tiny):
    model, tokenizer, pool, memory = make_memory(load_tiny, num_blocks=80)
    system = tokens(2048, 6)  # 8 full blocks
    prompts = {f"agent-{i}": system + tokens(20 + i, 100 + i) for i in range(10)}
    for agent, prompt in prompts.items():
        done = turn(memory, agent, prompt)
        assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 8)
        assert done.cache_source == ("cold" if agent == "agent-0" else "shared")
    stats = pool.stats()
    per_block = pool.spec.bytes_per_block(0)
    layers = pool.spec.num_layers
    assert stats.used_blocks == (8 + 10) * layers  # one shared copy + one own block per agent
    assert memory.stats().bytes_saved_by_sharing == 9 * 8 * layers * per_block
    shared = done.blocks.blocks[0][:8]  # the last agent's blocks (the store keeps them)
    assert [pool.refcount(b) for b in shared] == [10] * 8
    memory.close()
    assert pool.available_blocks() == pool.total_blocks


def test_freeing_one_sharer_while_another_generates(load_tiny, tmp_path):
    model, tokenizer, pool, memory = make_memory(load_tiny, cache_dir=tmp_path)
    system = tokens(512, 7)
    turn(memory, "a", system + tokens(5, 8))
    prompt_b = system + tokens(9, 9)
    memory.submit("b", prompt_b, max_tokens=30)  # shares a's blocks
    events = memory.stream()
    next(e for e in events if e.token is not None)
    memory.forget("a")  # a's reference goes while b is generating
    done = next(e.completion for e in events if e.completion)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt_b, 30)
    assert all(pool.refcount(b) == 1 for b in done.blocks.all_blocks())
    assert memory.where("a") == "none" and not (tmp_path / agent_file_name("a")).exists()
    memory.close()
    assert pool.available_blocks() == pool.total_blocks


# ------------------------------------------------------------------ tiers


def test_twenty_agents_through_a_pool_for_four(load_tiny, tmp_path):
    model, tokenizer, _, unlimited = make_memory(load_tiny, num_blocks=200)
    _, _, pool, small = make_memory(load_tiny, num_blocks=8, cache_dir=tmp_path)  # 4 agents of one block per layer
    rng = random.Random(0)
    histories = {f"agent-{i}": tokens(30 + 7 * i, 200 + i) for i in range(20)}
    sources = []
    for round_ in range(3):
        order = list(histories)
        rng.shuffle(order)
        for agent in order:
            prompt = histories[agent]
            a, b = turn(unlimited, agent, prompt, 6), turn(small, agent, prompt, 6)
            assert a.token_ids == b.token_ids, (round_, agent)
            sources.append(b.cache_source)
            histories[agent] = prompt + a.token_ids + tokens(11, 1000 * round_ + hash(agent) % 97)
            pool.check_invariants()
    assert sources.count("disk") >= 30  # later rounds come back from disk
    assert small.stats().hot_agents <= 4
    small.close()
    unlimited.close()
    assert pool.available_blocks() == pool.total_blocks


def test_restart_resumes_from_disk(load_tiny, tmp_path):
    model, tokenizer, _, memory = make_memory(load_tiny, cache_dir=tmp_path)
    history = tokens(300, 10)
    done = turn(memory, "a", history)
    history += done.token_ids + tokens(15, 11)
    memory.close()  # flushes; the "process" ends

    _, _, pool, restarted = make_memory(load_tiny, cache_dir=tmp_path)
    assert restarted.where("a") == "disk"
    done = turn(restarted, "a", history)
    assert done.cache_source == "disk" and done.prompt_tokens == 15
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, history, 8)
    restarted.close()
    assert pool.available_blocks() == pool.total_blocks


def test_corrupt_file_is_set_aside_and_the_agent_goes_cold(load_tiny, tmp_path):
    _, _, pool, memory = make_memory(load_tiny, cache_dir=tmp_path)
    prompt = tokens(100, 12)
    turn(memory, "a", prompt)
    memory.close()
    path = tmp_path / agent_file_name("a")
    data = bytearray(path.read_bytes())
    data[-10] ^= 0xFF
    path.write_bytes(bytes(data))

    _, _, pool, memory = make_memory(load_tiny, cache_dir=tmp_path)
    with pytest.raises(CacheCorruptionError, match="checksum"):
        memory.submit("a", prompt, max_tokens=4)
    assert not path.exists() and len(list(tmp_path.glob("*.corrupt-*"))) == 1
    assert pool.available_blocks() == pool.total_blocks
    assert turn(memory, "a", prompt).cache_source == "cold"
    memory.close()


def test_file_from_another_model_is_incompatible(load_tiny, tmp_path):
    _, _, _, llama = make_memory(load_tiny, cache_dir=tmp_path)
    turn(llama, "a", tokens(60, 13))
    llama.close()
    _, _, pool, qwen = make_memory(load_tiny, "qwen3", cache_dir=tmp_path)
    with pytest.raises(IncompatibleCacheError):
        qwen.submit("a", tokens(60, 13), max_tokens=4)
    assert (tmp_path / agent_file_name("a")).exists()  # left where it is
    assert pool.available_blocks() == pool.total_blocks


@pytest.mark.parametrize("agent_id", ["../x", "/abs/path", "nul\x00byte", "y" * 10_000])
def test_odd_agent_ids_persist_inside_the_directory(load_tiny, tmp_path, agent_id):
    _, _, _, memory = make_memory(load_tiny, cache_dir=tmp_path / "cache")
    turn(memory, agent_id, tokens(40, 14))
    memory.close()
    files = list((tmp_path / "cache").iterdir())
    assert [f.parent for f in files] == [tmp_path / "cache"] and list(tmp_path.iterdir()) == [tmp_path / "cache"]
    _, _, _, memory = make_memory(load_tiny, cache_dir=tmp_path / "cache")
    assert turn(memory, agent_id, tokens(40, 14) + tokens(3, 15)).cache_source == "disk"
    memory.close()


def test_agents_in_flight_are_never_evicted(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    sizing = BlockPoolBatchEngine(model, tokenizer, BlockPool(ModelCacheSpec.from_model(model), num_blocks=64))
    budget = sizing.request_bytes(0, 10, 300)  # each request alone needs the whole budget
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=budget)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool), cache_dir=tmp_path)
    no_eos = make_logits_processors(logit_bias={0: -1e9})  # both run their full length
    a = memory.submit("a", tokens(10, 16), max_tokens=300, logits_processors=no_eos)
    b = memory.submit("b", tokens(10, 17), max_tokens=300, logits_processors=no_eos)  # waits, no error
    with pytest.raises(InvalidRequestError):
        memory.forget("a")
    places = set()
    done = {}
    for event in memory.stream():
        if a not in done:
            places.add(memory.where("a"))
        if event.completion:
            done[event.uid] = event.completion
    assert places == {"pool"}  # never spilled while it ran
    assert [done[a].finish_reason, done[b].finish_reason] == ["length", "length"]
    assert done[b].queued_seconds > 0 and done[a].uid < done[b].uid
    assert done[b].token_ids == mlx_lm_tokens(model, tokenizer, tokens(10, 17), 300, logits_processors=no_eos)
    assert memory.where("a") == "disk"  # "b" needed all the room once "a" was idle
    memory.close()
    assert pool.available_blocks() == pool.total_blocks


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "gathered"])
def test_hybrid_model_shares_only_windows_it_really_holds(load_tiny, paged):
    """Gemma-like: a gathered sliding layer writes back only its last 32 tokens, so most shared
    boundaries are unusable; a paged one keeps the whole block its window is in, so the
    boundary's window is there. Whatever is reused, the output equals a cold run."""
    model, tokenizer, pool, memory = make_memory(load_tiny, "gemma3_text", paged=paged)
    system = tokens(512, 20)
    sources = []
    for i in range(3):
        prompt = system + tokens(12 + i, 30 + i)
        done = turn(memory, f"agent-{i}", prompt)
        assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 8)
        sources.append(done.cache_source)
    # gathered: the donor's window ends past the boundary
    assert sources == (["cold", "shared", "shared"] if paged else ["cold", "cold", "cold"])
    memory.close()
    assert pool.available_blocks() == pool.total_blocks


def test_spills_and_loads_while_other_agents_generate(load_tiny, tmp_path):
    """Submits (which spill and load agents) run on this thread while another steps the batch."""
    model, tokenizer, pool, memory = make_memory(load_tiny, num_blocks=12, cache_dir=tmp_path)
    finished: queue.Queue = queue.Queue()
    stop = threading.Event()
    errors: list[BaseException] = []

    def generate() -> None:
        try:
            while not stop.is_set():
                for completion in memory.step():
                    finished.put(completion)
                stop.wait(0.005)
        except BaseException as e:  # surfaced below
            errors.append(e)

    worker = threading.Thread(target=generate)
    worker.start()
    prompts = {f"agent-{i}": tokens(40 + 9 * i, 300 + i) for i in range(8)}
    answered = []  # (prompt, completion)
    try:
        for round_ in range(3):
            in_flight: dict[int, list[int]] = {}
            for agent, prompt in prompts.items():  # more than fit: they wait for room, none fails
                in_flight[memory.submit(agent, prompt, max_tokens=10)] = prompt
            while in_flight:
                done = finished.get(timeout=120)
                answered.append((in_flight.pop(done.uid), done))
            for prompt, done in answered[-len(prompts) :]:
                prompts[done.agent_id] = prompt + done.token_ids + tokens(5, 50 * round_ + len(prompt))
    finally:
        stop.set()
        worker.join()
    assert not errors
    assert {done.cache_source for _, done in answered[8:]} >= {"disk"}
    for prompt, done in answered:
        assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 10), done.agent_id
    memory.close()
    assert pool.available_blocks() == pool.total_blocks
