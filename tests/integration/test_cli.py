"""The blockpool command and the mlx-lm drop-in functions."""

from __future__ import annotations

import inspect
import sys

import mlx.core as mx
import mlx_lm
import pytest
from cli_runner import run_cli

import blockpool
from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, InvalidRequestError, ModelCacheSpec

pytestmark = pytest.mark.integration

# mlx_lm.generate is both a function and a module: take the module.
mlx_generate_module = sys.modules["mlx_lm.generate"]


@pytest.mark.parametrize(
    "args, message",
    [
        (["inspect", "/no/such/dir"], "not found"),
        (["frobnicate"], "invalid choice"),
    ],
)
def test_bad_input_is_one_line_and_no_traceback(tmp_path, args, message):
    result = run_cli(*args, env_extra={"XDG_CACHE_HOME": str(tmp_path), "HF_HUB_OFFLINE": "1"})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("blockpool: error:") and message in lines[0]
    assert "Traceback" not in result.stderr + result.stdout


def test_inspect_lists_agents_and_flags_a_corrupt_file(load_tiny, tmp_path):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=16)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool), cache_dir=tmp_path)
    for agent in ("alpha", "beta"):
        memory.submit(agent, mx.random.randint(3, 500, (70,)).tolist(), max_tokens=4)
        list(memory.step())
    memory.close()
    files = sorted(tmp_path.glob("*.safetensors"))
    broken = bytearray(files[1].read_bytes())
    broken[-5] ^= 0x40
    files[1].write_bytes(bytes(broken))
    (tmp_path / ".x.safetensors.1.tmp").write_bytes(b"partial")

    result = run_cli("inspect", str(tmp_path))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split()[:4] == ["file", "agent", "tokens", "bytes"]
    ok = [line for line in lines if line.endswith(" ok")]
    assert len(ok) == 1 and ("alpha" in ok[0] or "beta" in ok[0]) and f" {memory.fingerprint[:16]} " in ok[0]
    assert any("corrupt: checksum mismatch" in line for line in lines)
    assert any("partial write" in line for line in lines)
    assert files[1].exists()  # inspect changes nothing


# ------------------------------------------------------------------ drop-in functions


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


@pytest.fixture
def memory(load_tiny):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=64)
    return AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool))


def test_drop_ins_equal_mlx_lm(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    prompt = "the agent reads a file and writes"
    for turn in range(2):  # the second call reuses the agent's cache
        assert blockpool.generate(model, tokenizer, prompt, max_tokens=24, agent_id="a", memory=memory) == mlx_lm.generate(
            model, tokenizer, prompt, max_tokens=24
        )
    ours = list(blockpool.stream_generate(model, tokenizer, prompt, max_tokens=24, agent_id="a", memory=memory))
    theirs = list(mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=24))
    assert [(r.text, r.token, r.finish_reason, r.generation_tokens, r.prompt_tokens) for r in ours] == [
        (r.text, r.token, r.finish_reason, r.generation_tokens, r.prompt_tokens) for r in theirs
    ]
    assert isinstance(ours[0], mlx_generate_module.GenerationResponse) and ours[-1].cache_source == "pool"
    assert all(mx.array_equal(a.logprobs, b.logprobs).item() for a, b in zip(ours, theirs))

    prompts = [tokenizer.encode(p) for p in ("the agent", "memory blocks move from the pool", "numbers like 12 345")]
    kwargs = dict(max_tokens=[12, 20, 16], return_token_ids=True, return_logprobs=True)
    mine = blockpool.batch_generate(model, tokenizer, prompts, memory=memory, **kwargs)
    ref = mlx_lm.batch_generate(model, tokenizer, prompts, **kwargs)
    assert isinstance(mine, mlx_generate_module.BatchResponse)
    assert (mine.texts, mine.token_ids, mine.logprobs) == (ref.texts, ref.token_ids, ref.logprobs)


def test_drop_ins_refuse_what_they_do_not_support(load_tiny, memory):
    model, tokenizer = load_tiny("llama")
    for kwargs in ({"draft_model": model}, {"prompt_cache": []}, {"kv_bits": 4}, {"max_kv_size": 64}, {"bogus": 1}):
        with pytest.raises(InvalidRequestError):
            blockpool.generate(model, tokenizer, "hi", memory=memory, **kwargs)
    with pytest.raises(InvalidRequestError):
        blockpool.batch_generate(model, tokenizer, [[1, 2]], prompt_caches=[[]], memory=memory)
    other, _ = load_tiny("qwen3")
    with pytest.raises(InvalidRequestError, match="another model"):
        blockpool.generate(other, tokenizer, "hi", memory=memory)
