"""The pool's books: which blocks exist, who holds them, and what they held when.

Per block id: its layer, its refcount (0 for a *cached-free* block: no
holder, kept findable for its prefix until its memory is needed, least
recently freed first, as vLLM's free queue), its generation (bumped when it
is allocated or written, so that a stale prefix-index entry is recognised)
and whether it holds data. Per agent: the ids it holds. Per agent also the
generation of its newest handle, so that an older handle is recognised as
stale.

No tensors and no bytes here, and no locking: the pool calls in under its
own lock. Every operation is all or nothing: it validates first and raises
:class:`~blockpool.errors.BlockOperationError` before changing anything.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence

from blockpool.block import KVBlock
from blockpool.errors import BlockOperationError
from blockpool.pool.types import AgentUsage


class BlockBooks:
    """Block records and holders. Every method expects the pool's lock to be held."""

    def __init__(self) -> None:
        self.layer: dict[int, int] = {}
        self.refs: dict[int, int] = {}  # 0: cached-free
        self.generation: dict[int, int] = {}
        self.written: set[int] = set()
        self.cacheable: set[int] = set()
        self.cached: OrderedDict[int, None] = OrderedDict()  # cached-free, least recently freed first
        self.held: dict[str, set[int]] = {}
        self._ids = itertools.count()
        self._free_ids: list[int] = []
        self._handle_generation = itertools.count(1)
        self._current: dict[str, int] = {}  # agent -> generation of its newest handle

    # ------------------------------------------------------------ lookups

    def key(self, block: KVBlock) -> int:
        """The id of a live block, or -1."""
        return block.block_id if self.layer.get(block.block_id) == block.layer_id else -1

    def is_live(self, block: KVBlock, generation: int) -> bool:
        """Whether a block still holds what it held at ``generation`` (held, or cached-free)."""
        key = block.block_id
        return self.layer.get(key) == block.layer_id and self.generation.get(key) == generation and key in self.written

    def holds(self, agent_id: str, blocks: Iterable[KVBlock]) -> bool:
        held = self.held.get(agent_id, set())
        return all(self.layer.get(b.block_id) == b.layer_id and b.block_id in held for b in blocks)

    def validated(self, blocks: Iterable[KVBlock], check_layer) -> dict[int, KVBlock]:
        """Live, distinct blocks by id; ``BlockOperationError`` otherwise."""
        keys: dict[int, KVBlock] = {}
        for block in blocks:
            if not isinstance(block, KVBlock):
                raise BlockOperationError(f"expected KVBlock, got {type(block).__name__}")
            check_layer(block.layer_id)
            if not isinstance(block.block_id, int) or block.block_id not in self.layer:
                raise BlockOperationError(f"{block} is free (or not a block of this pool)")
            if self.layer[block.block_id] != block.layer_id:
                raise BlockOperationError(f"{block} belongs to layer {self.layer[block.block_id]}")
            if block.block_id in keys:
                raise BlockOperationError(f"{block} is named twice")
            keys[block.block_id] = block
        return keys

    def owned(self, layer_id: int, blocks: Sequence[KVBlock]) -> list[int]:
        """The ids of held blocks of one layer; ``BlockOperationError`` for a free or foreign one."""
        keys = []
        for block in blocks:
            if (
                not isinstance(block, KVBlock)
                or block.layer_id != layer_id
                or self.layer.get(block.block_id) != layer_id
            ):
                raise BlockOperationError(f"{block} is not a block of layer {layer_id}")
            if self.refs.get(block.block_id, 0) == 0:
                raise BlockOperationError(f"{block} is free; allocate it before using it")
            keys.append(block.block_id)
        return keys

    def usage(self, layer_bytes: Sequence[int]) -> dict[str, AgentUsage]:
        """Blocks and bytes per agent (a shared block counts for each holder)."""
        return {
            agent: AgentUsage(len(held), sum(layer_bytes[self.layer[i]] for i in held))
            for agent, held in self.held.items()
        }

    def shared(self) -> int:
        """Blocks held by more than one agent."""
        return sum(1 for r in self.refs.values() if r > 1)

    # ------------------------------------------------------------ changes

    def allocate(self, counts: Mapping[int, int], agent_id: str) -> dict[int, list[KVBlock]]:
        """New blocks for an agent (the caller checked the budget)."""
        held = self.held.setdefault(agent_id, set())
        out: dict[int, list[KVBlock]] = {}
        for layer_id, n in counts.items():
            blocks = []
            for _ in range(n):
                key = self._free_ids.pop() if self._free_ids else next(self._ids)
                self.layer[key] = layer_id
                self.refs[key] = 1
                self.generation[key] = self.generation.get(key, 0) + 1
                held.add(key)
                blocks.append(KVBlock(layer_id, key))
            out[layer_id] = blocks
        if not held:
            self.held.pop(agent_id, None)
        return out

    def share(self, keys: Mapping[int, KVBlock], agent_id: str) -> None:
        """Give an agent a reference to held or cached-free blocks."""
        held = self.held.get(agent_id, set())
        for key, block in keys.items():
            if self.refs.get(key, 0) == 0 and key not in self.cached:
                raise BlockOperationError(f"cannot share {block}: it is free")
            if key in held:
                raise BlockOperationError(f"agent {agent_id!r} already holds {block}")
        held = self.held.setdefault(agent_id, set())
        for key in keys:
            self.cached.pop(key, None)
            self.refs[key] = self.refs.get(key, 0) + 1
            held.add(key)

    def free(self, keys: Mapping[int, KVBlock], agent_id: str) -> list[int]:
        """Drop an agent's references. Returns the ids that left the pool (their data and bytes go too);
        a block with no holder whose prefix is indexed waits in the cached-free queue instead."""
        held = self.held.get(agent_id, set())
        for key, block in keys.items():
            if key not in held:
                state = "free" if self.refs.get(key, 0) == 0 else "held by other agents only"
                raise BlockOperationError(f"agent {agent_id!r} does not hold {block} (it is {state})")
        gone = []
        for key in keys:
            held.discard(key)
            self.refs[key] -= 1
            if self.refs[key] == 0:
                if key in self.cacheable and key in self.written:
                    self.cached[key] = None
                else:
                    gone.append(key)
        if not held:
            self.held.pop(agent_id, None)
        return gone

    def drop(self, key: int) -> int:
        """Forget a block with no holder; returns its layer."""
        self.cached.pop(key, None)
        self.cacheable.discard(key)
        self.written.discard(key)
        del self.refs[key]
        self._free_ids.append(key)
        return self.layer.pop(key)

    def mark_written(self, keys: Iterable[int]) -> None:
        for key in keys:
            self.written.add(key)
            self.generation[key] += 1

    # ------------------------------------------------------------ handle generations

    def new_handle_generation(self, agent_id: str | None = None) -> int:
        generation = next(self._handle_generation)
        if agent_id is not None:
            self._current[agent_id] = generation
        return generation

    def is_current(self, agent_id: str, generation: int | None) -> bool:
        return generation is None or self._current.get(agent_id, generation) <= generation

    # ------------------------------------------------------------ checks

    def check(self) -> None:
        """Raise ``AssertionError`` if the records disagree with each other."""
        holders: dict[int, int] = {}
        for held in self.held.values():
            for key in held:
                holders[key] = holders.get(key, 0) + 1
        assert set(self.refs) == set(self.layer), "a block without a layer record"
        for key, refs in self.refs.items():
            assert holders.get(key, 0) == refs, "refcounts disagree with holders"
            assert (refs == 0) == (key in self.cached), "a block with no holder is not cached (or a held one is)"
        assert set(self.refs).isdisjoint(self._free_ids), "a live block id is on the free list"
        assert len(set(self._free_ids)) == len(self._free_ids), "a block id is free twice"
        assert self.written <= set(self.refs), "a dropped block is marked written"
