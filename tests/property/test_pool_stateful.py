"""Hypothesis state machine: random allocate/reserve/free/share/charge sequences across agents.

The books must balance after every step: refcounts equal holders, the bytes of
blocks, working charges and cached-free blocks add up, and freeing everything
returns the pool to where it started."""

from __future__ import annotations

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from blockpool import BlockOperationError, BlockPool, Geometry, LayerSpec, ModelCacheSpec, PoolExhaustedError

AGENTS = st.sampled_from([f"agent-{i}" for i in range(5)])
SPEC = ModelCacheSpec(
    (
        LayerSpec(Geometry(1, 4, 4, "float16")),
        LayerSpec(Geometry(1, 4, 4, "float16"), 64),
        LayerSpec(Geometry(1, 8, 2, "float32")),
    )
)
TOTAL = 24


class PoolMachine(RuleBasedStateMachine):
    def __init__(self):
        super().__init__()
        self.pool = BlockPool(SPEC, num_blocks=TOTAL)
        self.held: dict[str, set] = {}
        self.owners = [object(), object()]

    def _snapshot(self):
        return (self.pool.stats().used_bytes, {a: self.pool.used_blocks(a) for a in self.held})

    @rule(owner=st.integers(0, 1), fraction=st.floats(0, 1.2))
    def charge_working_bytes(self, owner, fraction):
        before = self._snapshot()
        nbytes = int(self.pool.total_bytes * fraction)
        if self.pool.charge(self.owners[owner], nbytes):
            assert self.pool.working_bytes(self.owners[owner]) == nbytes
        else:
            assert self._snapshot() == before  # refused: nothing changed
            assert nbytes > self.pool.working_bytes(self.owners[owner])

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def index_some(self, data):
        agent = data.draw(st.sampled_from(sorted(a for a, h in self.held.items() if h)))
        blocks = data.draw(st.lists(st.sampled_from(sorted(self.held[agent], key=repr)), unique=True, min_size=1))
        self.pool.mark_cacheable(blocks)  # only written blocks are kept after their last free

    @rule(agent=AGENTS, layer=st.integers(0, 2), n=st.integers(0, 12))
    def allocate(self, agent, layer, n):
        before = self._snapshot()
        try:
            got = self.pool.allocate(n, layer, agent)
        except PoolExhaustedError as e:
            assert e.requested == n and e.available < n
            assert self._snapshot() == before  # an exhausted allocation changes nothing
            return
        assert len(got) == n
        mine = self.held.setdefault(agent, set())
        assert not mine & set(got)
        mine.update(got)

    @rule(agent=AGENTS, counts=st.dictionaries(st.integers(0, 2), st.integers(0, 8), max_size=3))
    def reserve(self, agent, counts):
        before = self._snapshot()
        try:
            got = self.pool.reserve(counts, agent)
        except PoolExhaustedError:
            assert self._snapshot() == before
            return
        for layer, blocks in got.items():
            assert len(blocks) == counts[layer] and all(b.layer_id == layer for b in blocks)
            self.held.setdefault(agent, set()).update(blocks)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data())
    def free_some(self, data):
        agent = data.draw(st.sampled_from(sorted(a for a, h in self.held.items() if h)))
        blocks = data.draw(st.lists(st.sampled_from(sorted(self.held[agent], key=repr)), unique=True, min_size=1))
        self.pool.free(blocks, agent)
        self.held[agent] -= set(blocks)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data(), target_agent=AGENTS)
    def share(self, data, target_agent):
        owner = data.draw(st.sampled_from(sorted(a for a, h in self.held.items() if h)))
        block = data.draw(st.sampled_from(sorted(self.held[owner], key=repr)))
        if block in self.held.get(target_agent, set()):
            before = self._snapshot()
            try:
                self.pool.share([block], target_agent)
            except BlockOperationError:
                assert self._snapshot() == before
                return
            raise AssertionError("sharing a block twice to one agent must fail")
        self.pool.share([block], target_agent)
        self.held.setdefault(target_agent, set()).add(block)

    @precondition(lambda self: any(self.held.values()))
    @rule(data=st.data(), other=AGENTS)
    def foreign_or_double_free_fails(self, data, other):
        owner = data.draw(st.sampled_from(sorted(a for a, h in self.held.items() if h)))
        block = data.draw(st.sampled_from(sorted(self.held[owner], key=repr)))
        if block in self.held.get(other, set()):
            return
        before = self._snapshot()
        try:
            self.pool.free([block], other)
        except BlockOperationError:
            assert self._snapshot() == before
            return
        raise AssertionError("freeing a block the agent does not hold must fail")

    @invariant()
    def books_balance(self):
        self.pool.check_invariants()
        stats = self.pool.stats()
        physical = set().union(*self.held.values()) if self.held else set()
        assert stats.block_bytes == sum(self.pool.bytes_per_block(b.layer_id) for b in physical)
        assert stats.used_bytes == stats.block_bytes + stats.working_bytes + stats.transient_bytes
        assert self.pool.available_blocks() + self.pool.used_blocks() == TOTAL
        for agent, blocks in self.held.items():
            assert self.pool.used_blocks(agent) == len(blocks)
        for block in physical:
            assert self.pool.refcount(block) == sum(block in h for h in self.held.values())

    def teardown(self):
        for agent, blocks in self.held.items():
            self.pool.free(blocks, agent)
        for owner in self.owners:
            self.pool.charge(owner, 0)
        assert self.pool.available_blocks() == TOTAL and self.pool.stats().used_bytes == 0  # back to where it started
        self.pool.check_invariants()


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(max_examples=60, stateful_step_count=40, deadline=None)
