"""Hostile paths, crafted files, interrupted and failed writes, reached through the real store and engine.

Every case ends with the store still usable: the agent's next turn equals
mlx-lm's own generation, and no block is leaked. Write failures are real
(a directory where the file goes, a 64 KiB filesystem in a private mount
namespace), never mocked.
"""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import mlx.core as mx
import pytest

import tiny_models
from agent_files import call_with_timeout, mount_namespace_available, raw_parts, run_on_tmpfs, write_raw_agent_file
from blockpool import (
    AgentMemory,
    BlockPool,
    BlockPoolBatchEngine,
    BlockPoolError,
    CacheCorruptionError,
    ModelCacheSpec,
    PoolExhaustedError,
)
from blockpool.persistence import TEMP_PATTERN, agent_file_name, load_agent_file
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration

TESTS_DIR = Path(__file__).resolve().parent.parent


def tokens(n: int, seed: int) -> list[int]:
    return mx.random.randint(3, 512, (n,), key=mx.random.key(seed)).tolist()


def make_memory(load_tiny, cache_dir: Path, num_blocks: int = 64):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=num_blocks)
    return model, tokenizer, pool, AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool), cache_dir=cache_dir)


def turn(memory, agent, prompt, max_tokens=6):
    memory.submit(agent, prompt, max_tokens=max_tokens)
    (done,) = list(memory.step())
    return done


def assert_usable(model, tokenizer, memory, agent, prompt):
    """The agent's next turn runs and equals mlx-lm's generation on the whole prompt."""
    done = turn(memory, agent, prompt)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 6)
    return done


def assert_set_aside_then_cold(model, tokenizer, pool, memory, directory, prompt):
    """What was at agent "a"'s path is moved aside (not deleted), nothing is held, and the agent starts cold, exact."""
    assert not (directory / agent_file_name("a")).is_symlink() and not (directory / agent_file_name("a")).exists()
    assert len(list(directory.glob("*.corrupt-*"))) == 1
    assert pool.available_blocks() == pool.total_blocks
    assert assert_usable(model, tokenizer, memory, "a", prompt).cache_source == "cold"
    memory.close()


# ------------------------------------------------------------------ what sits at an agent's path


def test_a_fifo_at_an_agents_path_does_not_hang_submit(load_tiny, tmp_path):
    model, tokenizer, pool, memory = make_memory(load_tiny, tmp_path)
    fifo = tmp_path / agent_file_name("a")
    os.mkfifo(fifo)
    prompt = tokens(40, 1)
    hung, box = call_with_timeout(lambda: memory.submit("a", prompt, max_tokens=6), 20, fifo)
    assert not hung, "submit blocked on a FIFO at the agent's path"
    assert isinstance(box.get("error"), CacheCorruptionError) and "FIFO" in str(box["error"])
    assert_set_aside_then_cold(model, tokenizer, pool, memory, tmp_path, prompt)


def test_a_symlink_at_an_agents_path_is_not_followed(load_tiny, tmp_path):
    model, tokenizer, pool, memory = make_memory(load_tiny, tmp_path / "cache")
    prompt = tokens(60, 2)
    turn(memory, "a", prompt)
    memory.close()  # the agent's real file
    cache = tmp_path / "cache"
    outside = tmp_path / "outside.safetensors"
    os.replace(cache / agent_file_name("a"), outside)  # a valid file of this agent, now outside cache_dir
    (cache / agent_file_name("a")).symlink_to(outside)

    model, tokenizer, pool, memory = make_memory(load_tiny, cache)
    with pytest.raises(CacheCorruptionError, match="symbolic link"):
        memory.submit("a", prompt, max_tokens=6)
    assert outside.exists() and load_agent_file(outside).agent_id == "a"  # the target is left alone
    assert_set_aside_then_cold(model, tokenizer, pool, memory, cache, prompt)


def test_spilling_over_a_symlink_replaces_the_link_not_its_target(load_tiny, tmp_path):
    model, tokenizer, pool, memory = make_memory(load_tiny, tmp_path / "cache")
    prompt = tokens(50, 3)
    done = turn(memory, "a", prompt)
    outside = tmp_path / "outside.txt"
    outside.write_text("someone else's file")
    link = tmp_path / "cache" / agent_file_name("a")
    link.symlink_to(outside)
    assert memory.spill("a")
    assert not link.is_symlink() and outside.read_text() == "someone else's file"
    history = prompt + done.token_ids + tokens(7, 4)
    assert assert_usable(model, tokenizer, memory, "a", history).cache_source == "disk"
    memory.close()


def test_a_checksum_valid_file_that_contradicts_itself_is_set_aside(load_tiny, tmp_path):
    """The issue's example: a full-attention layer whose first stored token is not 0.
    Before: a raw ValueError on every submit, never quarantined."""
    model, tokenizer, pool, memory = make_memory(load_tiny, tmp_path)
    prompt = tokens(300, 5)
    turn(memory, "a", prompt)
    memory.close()
    path = tmp_path / agent_file_name("a")
    tensors, metadata = raw_parts(load_agent_file(path))
    metadata["first_token"] = json.dumps([0, 256])  # layer 1 is full attention: it must start at 0
    tensors["layers.1.k"] = tensors["layers.1.k"][:, :, 256:]
    tensors["layers.1.v"] = tensors["layers.1.v"][:, :, 256:]
    write_raw_agent_file(path, tensors, metadata)

    model, tokenizer, pool, memory = make_memory(load_tiny, tmp_path)
    with pytest.raises(CacheCorruptionError, match="full-attention layer 1 starts at token 256"):
        memory.submit("a", prompt, max_tokens=6)
    assert_set_aside_then_cold(model, tokenizer, pool, memory, tmp_path, prompt)


# ------------------------------------------------------------------ interrupted saves

_KILLED_WRITER = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    from pathlib import Path
    from agent_files import synthetic_file
    from blockpool.persistence import save_agent_file
    out = Path(sys.argv[1])
    print("ready", flush=True)
    while True:
        save_agent_file(out / "big.safetensors", synthetic_file(20000, 1))
    """
)


def interrupted_save(directory: Path, tmp_path: Path) -> list[str]:
    """Kill a process in the middle of saving (SIGKILL) until it leaves a temporary file behind."""
    script = tmp_path / "killed_writer.py"
    script.write_text(_KILLED_WRITER.format(tests=str(TESTS_DIR)))
    for _ in range(20):
        child = subprocess.Popen([sys.executable, str(script), str(directory)], stdout=subprocess.PIPE, text=True)
        assert child.stdout.readline().strip() == "ready"
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not [n for n in os.listdir(directory) if TEMP_PATTERN.match(n)]:
            time.sleep(0.001)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        left = [n for n in os.listdir(directory) if TEMP_PATTERN.match(n)]
        if left:
            return left
    raise AssertionError("no save was interrupted in 20 tries")


def test_a_store_removes_the_temp_files_of_interrupted_saves_at_start(load_tiny, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    left = interrupted_save(cache, tmp_path)
    model, tokenizer, pool, memory = make_memory(load_tiny, cache)
    assert [n for n in os.listdir(cache) if TEMP_PATTERN.match(n)] == [], left
    assert_usable(model, tokenizer, memory, "a", tokens(30, 6))
    memory.close()


# ------------------------------------------------------------------ writes that fail


def test_a_failed_spill_keeps_the_agent(load_tiny, tmp_path):
    model, tokenizer, pool, memory = make_memory(load_tiny, tmp_path)
    prompt = tokens(70, 7)
    done = turn(memory, "a", prompt)
    obstacle = tmp_path / agent_file_name("a")
    obstacle.mkdir()  # a directory where the agent's file goes: a real write failure
    with pytest.raises(BlockPoolError) as info:
        memory.spill("a")
    assert isinstance(info.value, OSError)  # PersistenceError: typed, and still an OSError with its errno
    assert memory.where("a") == "pool"  # not dropped
    assert not [n for n in os.listdir(tmp_path) if TEMP_PATTERN.match(n)]
    obstacle.rmdir()
    history = prompt + done.token_ids + tokens(5, 8)
    again = assert_usable(model, tokenizer, memory, "a", history)
    assert again.cache_source in ("pool", "disk") and again.cached_tokens == len(prompt) + len(done.token_ids)
    memory.close()
    pool.check_invariants()
    assert pool.available_blocks() == pool.total_blocks  # nothing leaked


def smallest_pool_for(load_tiny, prompt, max_tokens) -> int:
    """The fewest blocks a pool needs for this one request (the engine refuses what could never fit)."""
    model, tokenizer = load_tiny("llama")
    for num_blocks in range(2, 64):
        pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=num_blocks)
        memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool))
        try:
            uid = memory.submit("probe", prompt, max_tokens=max_tokens)
        except PoolExhaustedError:
            continue
        memory.cancel(uid)
        list(memory.step())
        return num_blocks
    raise AssertionError("no pool of under 64 blocks fits the request")


def test_an_eviction_that_cannot_write_keeps_the_agent(load_tiny, tmp_path):
    prompt_a, prompt_b = tokens(10, 9), tokens(200, 10)
    num_blocks = smallest_pool_for(load_tiny, prompt_b, 100)  # "b" fits only once "a" is out of the pool
    model, tokenizer, pool, memory = make_memory(load_tiny, tmp_path, num_blocks=num_blocks)
    done = turn(memory, "a", prompt_a)
    (tmp_path / agent_file_name("a")).mkdir()
    try:
        memory.submit("b", prompt_b, max_tokens=100)
    except BlockPoolError as e:  # refused with a typed error (not a raw OSError) ...
        assert type(e) is not OSError
    else:  # ... or accepted: then it ends (generated or failed), it does not wait forever
        hung, box = call_with_timeout(lambda: list(memory.step()), 120)
        assert not hung, "the request waits forever for room a failed spill cannot make"
        assert "error" not in box, box
    assert memory.where("a") == "pool"  # "a" is not lost
    (tmp_path / agent_file_name("a")).rmdir()
    history = prompt_a + done.token_ids + tokens(4, 11)
    assert assert_usable(model, tokenizer, memory, "a", history).cache_source in ("pool", "disk")
    memory.close()
    pool.check_invariants()
    assert pool.available_blocks() == pool.total_blocks


_FULL_DISK_STORE = textwrap.dedent(
    """
    import errno, json, os, sys
    sys.path.insert(0, {tests!r})
    from mlx_lm import load
    from mlx_lm_reference import mlx_lm_tokens
    import mlx.core as mx
    from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
    from blockpool.persistence import PersistenceError
    model_dir, cache_dir = sys.argv[1], sys.argv[2]
    model, tokenizer = load(model_dir)
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool), cache_dir=cache_dir)
    prompts = {{a: mx.random.randint(3, 500, (300,), key=mx.random.key(i)).tolist() for i, a in enumerate("abc")}}
    history = {{}}
    for agent, prompt in prompts.items():
        memory.submit(agent, prompt, max_tokens=4)
        (done,) = list(memory.step())
        history[agent] = prompt + done.token_ids
    outcome = {{}}
    try:
        memory.flush()  # three agents of ~300 tokens do not fit in 64 KiB
    except PersistenceError as e:
        outcome["error"], outcome["errno"] = type(e).__name__, e.errno
    outcome["where"] = [memory.where(a) for a in prompts]
    outcome["temp_files"] = [n for n in os.listdir(cache_dir) if n.endswith(".tmp")]
    prompt = history["c"] + [7, 8, 9]
    memory.submit("c", prompt, max_tokens=6)
    (done,) = list(memory.step())
    outcome["source"] = done.cache_source
    outcome["exact"] = done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 6)
    print(json.dumps(outcome))
    """
)


@pytest.mark.skipif(
    not mount_namespace_available(), reason="needs Linux user+mount namespaces (unshare -rm) for a real tiny filesystem"
)
def test_a_full_disk_during_flush_raises_a_typed_error_and_loses_nothing(tmp_path):
    """A 64 KiB tmpfs in a private mount namespace: the disk fills up for real while the store flushes."""
    model_dir = tiny_models.write_model_dir(tmp_path / "model", "llama")
    cache = tmp_path / "cache"
    cache.mkdir()
    script = tmp_path / "store.py"
    script.write_text(_FULL_DISK_STORE.format(tests=str(TESTS_DIR)))
    outcome = run_on_tmpfs(cache, "64k", [sys.executable, str(script), str(model_dir), str(cache)])
    assert outcome["error"] == "PersistenceError" and outcome["errno"] == errno.ENOSPC, outcome
    assert outcome["where"] == ["pool", "pool", "pool"] and outcome["temp_files"] == [], outcome
    assert outcome["source"] == "pool" and outcome["exact"], outcome
