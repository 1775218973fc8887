"""Block handles: one block (:class:`KVBlock`) and one agent's cache (:class:`AgentBlocks`)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from blockpool.spec import ModelCacheSpec


@dataclass(frozen=True)
class KVBlock:
    """A handle to one block: one layer's K and V for ``block_tokens`` tokens.

    ``block_id`` indexes the pool arrays of the layer's geometry. Handles are
    plain values; the pool owns the memory and the ownership records.
    """

    layer_id: int
    block_id: int


@dataclass
class AgentBlocks:
    """One agent's cache in the pool: its blocks per layer and the tokens they hold.

    Attributes:
        agent_id: The agent the blocks belong to.
        spec: The model cache layout the blocks were made for.
        blocks: For each layer (cache entry), its blocks in order. A
            full-attention layer covers tokens ``[0, total_tokens)``; a
            sliding-window or chunked layer only the blocks covering the
            tokens it keeps; a recurrent layer holds state snapshots, one per
            position in ``positions``.
        total_tokens: Tokens in the agent's history.
        token_ids: The history's token ids, ``len == total_tokens``.
        ring_index: For sliding layers whose mlx-lm cache was a full ring,
            the ring's write index, so the cache is rebuilt in the same
            physical order and decoding continues bit for bit.
        valid_from: Per layer, the first position whose tokens the blocks
            really hold (a sliding layer's first block may hold older
            positions that were never written). Defaults to the first
            position the layer needs.
        pool_id: The pool that issued the handle (None for a handle built
            by hand). The engine refuses a handle from another pool.
        generation: Issued by the pool, increasing per agent. A handle is
            consumed when it is submitted; the engine refuses a consumed
            handle or one older than the agent's newest (stale).
        positions: For recurrent layers, the position each snapshot was
            taken after, increasing; the last is ``total_tokens``.
    """

    agent_id: str
    spec: ModelCacheSpec
    blocks: dict[int, list[KVBlock]]
    total_tokens: int
    token_ids: list[int]
    ring_index: dict[int, int] = field(default_factory=dict)
    valid_from: dict[int, int] = field(default_factory=dict)
    pool_id: str | None = None
    generation: int | None = None
    consumed: bool = field(default=False, compare=False, repr=False)
    positions: dict[int, list[int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        """Raise ``ValueError`` unless the handle is self-consistent."""
        spec = self.spec
        if len(self.token_ids) != self.total_tokens:
            raise ValueError(f"{len(self.token_ids)} token ids for {self.total_tokens} tokens")
        if sorted(self.blocks) != list(range(spec.num_layers)):
            raise ValueError(f"blocks must cover layers 0..{spec.num_layers - 1}")
        for layer_id, blocks in self.blocks.items():
            if any(b.layer_id != layer_id for b in blocks):
                raise ValueError(f"layer {layer_id} holds a block of another layer")
            spec.kind(layer_id).check(self, layer_id)

    def first_block(self, layer_id: int) -> int:
        """Logical index (token position // block_tokens) of a token layer's first block (0 for a state layer)."""
        if self.spec.kind(layer_id).storage != "tokens":
            return 0
        return -(-self.total_tokens // self.spec.block_tokens) - len(self.blocks[layer_id])

    def valid_start(self, layer_id: int) -> int:
        """First position whose tokens a token layer's blocks hold (0 for a layer that keeps every token);
        for a state layer, its last snapshot's position."""
        kind = self.spec.kind(layer_id)
        if kind.storage != "tokens":
            return self.positions.get(layer_id, [0])[-1] if self.positions.get(layer_id) else 0
        return kind.valid_start(self, layer_id)

    def all_blocks(self) -> Iterator[KVBlock]:
        """Every block of every layer."""
        for blocks in self.blocks.values():
            yield from blocks

    @property
    def num_blocks(self) -> int:
        return sum(len(b) for b in self.blocks.values())

    @classmethod
    def empty(cls, agent_id: str, spec: ModelCacheSpec) -> AgentBlocks:
        """An agent with no history."""
        return cls(agent_id, spec, {i: [] for i in range(spec.num_layers)}, 0, [])
