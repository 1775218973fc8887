"""The server's parts on their own: sampling, agent identity, request checks, the Messages mapping, the app."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.sample_utils import make_sampler
from pydantic import ValidationError

from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from blockpool.server import anthropic_format
from blockpool.server.agent_limits import AgentLimits
from blockpool.server.agents import ANONYMOUS_PREFIX, AnonymousAgents, agent_identity, is_anonymous
from blockpool.server.api_errors import ApiError, bad_request, from_validation
from blockpool.server.app import ServerState, create_app
from blockpool.server.distributed import Lockstep
from blockpool.server.runner import EngineRunner, Outcome
from blockpool.server.sampling import GenerationParams, KeyedSampler, make_request_processors, make_request_sampler
from blockpool.server.schemas import (
    ChatCompletionRequest,
    Defaults,
    MessagesRequest,
    agent_from_metadata,
    anthropic_params,
    check_model,
    openai_params,
    stop_list,
)
from blockpool.store.tiers import AgentInfo


@pytest.mark.parametrize("options", [{}, {"top_p": 0.9}, {"min_p": 0.05}, {"top_k": 20}, {"top_p": 0.8, "top_k": 50}])
def test_keyed_sampler_draws_what_mlx_lm_draws_after_seeding(options):
    logits = mx.random.normal((1, 512), key=mx.random.key(3)) * 3
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    mx.random.seed(42)
    reference = make_sampler(0.8, **options)
    expected = [reference(logprobs).item() for _ in range(12)]
    mx.random.seed(7)  # the keyed sampler ignores the global state
    keyed = KeyedSampler(42, 0.8, **options)
    got = []
    for _ in range(12):
        got.append(keyed(logprobs).item())
        mx.random.uniform()
    assert got == expected


def test_request_samplers_and_processors():
    assert make_request_sampler(GenerationParams(max_tokens=4), []) is None  # greedy: the batch's shared argmax
    assert isinstance(make_request_sampler(GenerationParams(max_tokens=4, temperature=0.5, seed=1), []), KeyedSampler)
    assert callable(make_request_sampler(GenerationParams(max_tokens=4, temperature=0.5, xtc_probability=0.5), [0]))
    assert make_request_processors(GenerationParams(max_tokens=4)) == []
    assert (
        len(make_request_processors(GenerationParams(max_tokens=4, logit_bias={1: 2.0}, repetition_penalty=1.1))) == 2
    )


def test_agent_identity_header_first_then_user():
    assert agent_identity(None, None) is None
    assert agent_identity("planner", "someone") == "planner"
    assert agent_identity(None, "someone") == "someone"
    for bad in ("", " ", "x" * 300, "tab\there", ANONYMOUS_PREFIX + "1"):
        with pytest.raises(ApiError) as refused:
            agent_identity(bad, None)
        assert refused.value.status == 400


def test_anonymous_agents_resume_the_conversation_they_continue():
    kept = AnonymousAgents(2)
    first = kept.claim([1, 2, 3])
    assert is_anonymous(first)
    assert kept.keep(first, [1, 2, 3, 4, 5]) == []
    assert kept.claim([1, 2, 3, 4, 5, 6, 7]) == first  # continues it: same agent
    assert kept.claim([9, 9]) != first
    other = kept.claim([1, 7])  # shares less than half of a kept history: a new agent
    kept.keep(first, [1, 2, 3, 4, 5, 6, 7, 8])
    kept.keep(other, [1, 7, 8])
    assert kept.keep("third", [5]) == [first]  # past the limit the oldest goes
    kept.discard(other)
    assert len(kept) == 1 and "third" in kept


def test_a_refused_anonymous_request_gives_its_conversation_back():
    kept = AnonymousAgents(2)
    first = kept.claim([1, 2, 3])
    kept.keep(first, [1, 2, 3, 4])
    assert kept.claim([1, 2, 3, 4, 5]) == first and len(kept) == 0
    assert kept.unclaim(first) == [] and first in kept  # kept again, as it was
    assert kept.claim([1, 2, 3, 4, 9]) == first
    fresh = kept.claim([7, 7, 7])
    assert kept.unclaim(fresh) == [fresh]  # a new id: nothing to keep, drop it
    assert kept.unclaim("never-claimed") == []


def test_agent_limits_pick_the_least_recently_used_idle_agents():
    class Memory:  # the two questions AgentLimits asks of the store, answered from a table
        def __init__(self, rows):
            self.rows = rows

        def agents(self):
            return [AgentInfo(a, where, 10, size, True) for a, where, size in self.rows]

        def file_bytes(self):
            return {a: size for a, where, size in self.rows if where != "running"}

    limits = AgentLimits(max_agents=2)
    for agent in ("b", "c", "d"):
        limits.used(agent)
    memory = Memory([("a", "disk", 5), ("b", "pool", 5), ("c", "running", 5), ("d", "pool", 5)])
    # "a" was never used this run (oldest), "b" is the least recent; "c" runs; "d" is busy.
    assert limits.over(memory, busy={"d"}) == ["a", "b"]
    assert AgentLimits().over(memory, set()) == []
    by_disk = AgentLimits(max_disk_bytes=8)
    assert by_disk.over(memory, busy=set()) == ["a", "b"]


def test_request_checks_fill_defaults_and_refuse_bad_fields():
    request = ChatCompletionRequest.model_validate({"messages": [{"role": "user", "content": "x"}]})
    params = openai_params(request, Defaults(), 512, logprobs=False, top_logprobs=0)
    assert (params.max_tokens, params.temperature, params.stop) == (512, 0.0, [])
    request = ChatCompletionRequest.model_validate(
        {"messages": [{}], "top_k": 900, "logit_bias": {"5": 1}, "stop": "s"}
    )
    params = openai_params(request, Defaults(max_tokens=8), 512, logprobs=True, top_logprobs=2)
    assert (params.top_k, params.logit_bias, params.stop, params.max_tokens) == (0, {5: 1.0}, ["s"], 8)
    with pytest.raises(ApiError, match="n=1"):
        openai_params(
            ChatCompletionRequest.model_validate({"messages": [{}], "n": 3}),
            Defaults(),
            512,
            logprobs=False,
            top_logprobs=0,
        )
    with pytest.raises(ValidationError) as invalid:
        ChatCompletionRequest.model_validate({"messages": [{}], "temperature": "hot"})
    error = from_validation(invalid.value)
    assert error.status == 400 and "temperature" in error.message and error.param == "temperature"
    assert stop_list(["a", "b"]) == ["a", "b"]
    with pytest.raises(ApiError):
        stop_list([""])
    check_model(None, {"m"})
    with pytest.raises(ApiError) as missing:
        check_model("other", {"m"})
    assert missing.value.status == 404 and missing.value.openai_body()["error"]["code"] == "model_not_found"
    assert agent_from_metadata(None) is None and agent_from_metadata({"user_id": "u"}) == "u"
    assert bad_request("no").anthropic_body() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "no"},
    }
    messages = MessagesRequest.model_validate(
        {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "x"}], "top_k": 3}
    )
    assert (
        anthropic_params(messages, Defaults(), 512).max_tokens,
        anthropic_params(messages, Defaults(), 512).top_k,
    ) == (5, 3)


def test_messages_map_to_chat_in_order():
    request = MessagesRequest.model_validate(
        {
            "model": "m",
            "max_tokens": 5,
            "system": [{"type": "text", "text": "be "}, {"type": "text", "text": "brief"}],
            "tools": [{"name": "read", "description": "read a file", "input_schema": {"type": "object"}}],
            "messages": [
                {"role": "user", "content": "hi"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "calling"},
                        {"type": "tool_use", "id": "t1", "name": "read", "input": {"p": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "t1", "content": "file text"},
                        {"type": "text", "text": "thanks"},
                    ],
                },
            ],
        }
    )
    chat, tools = anthropic_format.to_chat(request)
    assert [m["role"] for m in chat] == ["system", "user", "assistant", "tool", "user"]
    assert chat[0]["content"] == "be brief" and chat[3] == {
        "role": "tool",
        "tool_call_id": "t1",
        "content": "file text",
    }
    assert chat[2]["tool_calls"][0]["function"] == {"name": "read", "arguments": {"p": 1}}
    assert tools == [
        {
            "type": "function",
            "function": {"name": "read", "description": "read a file", "parameters": {"type": "object"}},
        }
    ]
    with pytest.raises(ApiError, match="image"):
        anthropic_format.to_chat(
            MessagesRequest.model_validate(
                {"model": "m", "max_tokens": 1, "messages": [{"role": "user", "content": [{"type": "image"}]}]}
            )
        )
    outcome = Outcome("a", "abc", [1], "stop", 3, 0, 1, None, None, 0.0)
    assert anthropic_format.stop_details(outcome, ["XY"], "abcXYz") == ("stop_sequence", "XY")
    assert anthropic_format.stop_details(outcome, ["XY"], "abc") == ("end_turn", None)


def test_lockstep_of_one_process_passes_operations_through():
    lockstep = Lockstep()
    assert not lockstep.distributed
    assert lockstep.share([1, "two"]) == [1, "two"]
    assert isinstance(lockstep.agree_seed(), int)


def test_the_app_in_process_answers_and_stops_its_engine_thread(model_dir, tmp_path):
    from mlx_lm import load
    from starlette.testclient import TestClient

    model, tokenizer = load(str(model_dir))
    engine = BlockPoolBatchEngine(model, tokenizer, BlockPool(ModelCacheSpec.from_model(model), memory_bytes=8 << 20))
    runner = EngineRunner(AgentMemory(engine, cache_dir=tmp_path, durable=True))
    state = ServerState(runner, "tiny")
    with TestClient(create_app(state)) as client:
        answer = client.post(
            "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4},
            headers={"X-Agent-Id": "in-process"},
        )
        assert answer.status_code == 200 and answer.json()["usage"]["completion_tokens"] >= 1
        assert client.get("/health").json()["status"] == "ok"
        assert [a["id"] for a in client.get("/v1/agents").json()["data"]] == ["in-process"]
    assert not runner.alive  # the lifespan stopped it, and the agent was persisted
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
