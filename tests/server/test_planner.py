"""The server's planner on a real store and engine: when new agents with one system prompt may go.

Agents that arrive together with one prompt wait for the first one's
prefill, and go once the store holds its blocks: at its first token when
the budget had room for the early copy (a paged engine needs none: the
prompt is in blocks already), else at its end (then they share its
finished blocks instead of prefilling the prompt again, cold).
"""

from __future__ import annotations

import asyncio

import pytest

from blockpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from blockpool.server.agents import AnonymousAgents
from blockpool.server.planner import TicketPlanner
from blockpool.server.sampling import GenerationParams
from blockpool.server.tickets import NewTicket, Submit, Ticket
from blockpool.store.memory import AgentMemory

pytestmark = pytest.mark.integration

SYSTEM = [5 + (i * 7) % 500 for i in range(600)]  # two full blocks and a part


def planner_on(memory: AgentMemory) -> tuple[TicketPlanner, list]:
    finished: list = []
    planner = TicketPlanner(
        memory, AnonymousAgents(0), {}, lambda t, o: finished.append(o), lambda t, e: finished.append(e)
    )
    return planner, finished


def ticket(key: int, agent: str, question: int, loop: asyncio.AbstractEventLoop) -> Ticket:
    return Ticket(key, agent, SYSTEM + [question, 7, 9], GenerationParams(max_tokens=6), loop, agent)


def submits(operations: list) -> list[str]:
    return [op.agent_id for op in operations if isinstance(op, Submit)]


@pytest.mark.parametrize("paged", [True, False], ids=["paged", "gathered"])
@pytest.mark.parametrize("room", [True, False], ids=["room-for-early-copy", "no-room"])
def test_agents_with_one_prompt_go_when_the_store_holds_its_blocks(load_tiny, room, paged):
    model, tokenizer = load_tiny("llama")
    pool = BlockPool(ModelCacheSpec.from_model(model), num_blocks=60)
    memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool, paged=paged))
    early = room or paged  # a paged prompt is shared with no copy, so room does not matter
    planner, finished = planner_on(memory)
    loop = asyncio.new_event_loop()
    first, second = ticket(1, "first", 11, loop), ticket(2, "second", 12, loop)

    operations = planner.plan([NewTicket(first), NewTicket(second)])
    assert submits(operations) == ["first"]  # the second waits on the first's prefill
    (op,) = [o for o in operations if isinstance(o, Submit)]
    assert op.share_prompt
    taken: list = []

    def fill_the_pool(done: int, total: int) -> None:
        if done == total and not room and not taken:  # another holder takes every free block
            for layer in range(pool.spec.num_layers):
                taken.extend(pool.allocate(pool.available_blocks(), layer, "someone-else"))

    uid = memory.submit(
        op.agent_id,
        op.tokens,
        max_tokens=op.params.max_tokens,
        share_prompt=op.share_prompt,
        prompt_progress_callback=fill_the_pool,
    )
    completion = None
    while completion is None:
        for event in memory.tick():
            assert event.uid == uid
            if event.token is not None and first.first_token_at is None:
                first.first_token_at = 1.0
                planner.first_token(first)
                # With the early copy the second may go now; without it, it still waits.
                assert submits(planner.plan([])) == (["second"] if early else [])
            if event.completion is not None:
                completion = event.completion
    assert completion.finish_reason == "length"
    pool.free(taken, "someone-else")
    planner.ended(first, completion)
    later = submits(planner.plan([]))
    assert later == ([] if early else ["second"])
    assert memory.shared_tokens(second.tokens) == len(SYSTEM)  # what the second agent takes, not prefills
    assert not finished
    memory.close()
    loop.close()
    assert pool.available_blocks() == pool.total_blocks
