"""Failures users of other MLX servers report, each tried here on the real server.

- Caches that expire after minutes idle and force a full re-prefill: here an
  agent never expires; when the pool needs room it moves to disk and comes back.
- A prefix cache thrown away whole on any token difference: here the longest
  common prefix is kept.
- The same prefix defeated because the server reorders messages (hoisting
  system messages): here messages are rendered in the order sent.
- Generated tokens that differ from the re-tokenized assistant text: here the
  agent resumes from the longest common prefix, and the output stays exact.
- Leftovers of one conversation appearing in another: a fresh agent's output
  equals a cold run, also when it shares another agent's prefix blocks.
"""

from __future__ import annotations

import pytest
from server_process import concurrently

pytestmark = pytest.mark.integration

# Long enough to fill a few 256-token blocks that fresh agents can share.
SYSTEM = " ".join(f"rule {i}: the agent keeps its notes in order and cites the file it read." for i in range(40))


@pytest.fixture(scope="module")
def server(start_server):
    # 2 MiB of KV: 32 blocks of the tiny model; a handful of agents fill it.
    return start_server("--memory-mb", "2")


def chat(server, agent, messages, max_tokens=8):
    return server.openai().chat.completions.create(
        model="default_model", messages=messages, max_tokens=max_tokens, extra_headers={"X-Agent-Id": agent}
    )


def common_prefix(a, b) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def where(server, agent) -> str:
    _, body = server.request("GET", "/v1/agents")
    return next(r["where"] for r in body["data"] if r["id"] == agent)


def test_idle_agents_never_expire_they_move_to_disk_and_resume(server, reference):
    messages = [{"role": "user", "content": "remember this conversation for later"}]
    first = chat(server, "patient", messages)
    history = reference.chat_ids(messages) + reference.chat(messages, 8)[1]
    for i in range(12):  # other agents need the room
        chat(server, f"busy-{i}", [{"role": "user", "content": f"other work number {i} " * 45}])
    assert where(server, "patient") == "disk"
    messages += [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "I am back"},
    ]
    answer = chat(server, "patient", messages)
    assert answer.model_extra["cache_source"] == "disk"
    assert answer.usage.prompt_tokens_details.cached_tokens == common_prefix(history, reference.chat_ids(messages)) > 0
    assert answer.choices[0].message.content == reference.chat(messages, 8)[0]


def test_an_edited_turn_keeps_the_longest_common_prefix(server, reference):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "summarise the parser design in three steps"},
    ]
    chat(server, "editor", messages)
    history = reference.chat_ids(messages) + reference.chat(messages, 8)[1]
    edited = [messages[0], {"role": "user", "content": "summarise the parser design in two steps"}]
    answer = chat(server, "editor", edited)
    kept = common_prefix(history, reference.chat_ids(edited))
    assert kept > len(reference.chat_ids(messages[:1] + [{"role": "user", "content": ""}])) // 2
    assert answer.usage.prompt_tokens_details.cached_tokens == kept
    assert answer.choices[0].message.content == reference.chat(edited, 8)[0]


def test_messages_are_never_reordered(server, reference):
    messages = [
        {"role": "user", "content": "first question"},
        {"role": "system", "content": "a system note that arrives mid-conversation"},
        {"role": "user", "content": "second question"},
    ]
    hoisted = [messages[1], messages[0], messages[2]]
    assert reference.chat_ids(messages) != reference.chat_ids(hoisted)  # the order matters to the template
    answer = chat(server, "in-order", messages)
    assert answer.usage.prompt_tokens == len(reference.chat_ids(messages))
    assert answer.choices[0].message.content == reference.chat(messages, 8)[0]
    messages += [
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "third"},
    ]
    again = chat(server, "in-order", messages)
    assert again.usage.prompt_tokens_details.cached_tokens >= len(reference.chat_ids(messages[:3])) - 3


def test_retokenized_assistant_text_resumes_from_the_common_prefix(server, reference):
    # Find a turn whose answer re-tokenizes differently (random weights make this common).
    for i in range(20):
        messages = [{"role": "user", "content": f"tell me about item {i} of the log"}]
        text, generated = reference.chat(messages, 10)
        follow = messages + [{"role": "assistant", "content": text}, {"role": "user", "content": "and then?"}]
        prompt_ids = reference.chat_ids(messages)
        history = prompt_ids + generated
        retokenized = reference.chat_ids(follow)
        visible = [t for t in generated if t not in reference.eos]
        if retokenized[len(prompt_ids) : len(prompt_ids) + len(visible)] != visible:
            break
    else:
        pytest.fail("no answer re-tokenized differently in 20 tries")
    chat(server, f"retok-{i}", messages, 10)
    answer = chat(server, f"retok-{i}", follow, 10)
    kept = common_prefix(history, retokenized)
    assert len(prompt_ids) <= kept < len(prompt_ids) + len(visible)
    assert answer.usage.prompt_tokens_details.cached_tokens == kept
    assert answer.choices[0].message.content == reference.chat(follow, 10)[0]


def test_no_leftovers_fresh_agents_equal_cold_runs_even_sharing_a_prefix(server, reference):
    donor = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "the donor's own question"}]
    chat(server, "donor", donor)
    fresh = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "a newcomer's question"}]
    answer = chat(server, "newcomer", fresh)
    assert answer.model_extra["cache_source"] == "shared"
    assert answer.usage.prompt_tokens_details.cached_tokens >= 256
    assert answer.choices[0].message.content == reference.chat(fresh, 8)[0]
    cold = [{"role": "user", "content": "the donor's own question"}]
    assert chat(server, "stranger", cold).choices[0].message.content == reference.chat(cold, 8)[0]


def test_agents_arriving_together_with_one_system_prompt_prefill_it_once(start_server, reference):
    server = start_server("--memory-mb", "16")  # room for the early copy of the prompt's blocks
    system = SYSTEM.replace("rule 0:", "first rule:")  # a system prompt no agent has sent yet
    conversations = {
        f"together-{i}": [{"role": "system", "content": system}, {"role": "user", "content": f"question {i}"}]
        for i in range(5)
    }
    results = {}

    def run(agent, messages):
        results[agent] = chat(server, agent, messages, max_tokens=24)

    assert not concurrently(run, list(conversations.items()))
    ids = {agent: reference.chat_ids(messages) for agent, messages in conversations.items()}
    shared = {common_prefix(a, b) for a in ids.values() for b in ids.values() if a is not b}
    assert len(shared) == 1 and min(shared) % 256 and min(shared) > 512, shared  # it ends inside a block
    cached = sorted(r.usage.prompt_tokens_details.cached_tokens for r in results.values())
    # One agent prefills the system prompt; the other four share it to the token, the part of
    # the last block too (copied on write).
    assert cached == [0] + [min(shared)] * 4, cached
    for agent, messages in conversations.items():
        assert results[agent].choices[0].message.content == reference.chat(messages, 24)[0], agent
