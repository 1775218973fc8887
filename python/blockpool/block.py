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
        blocks: For each layer, its blocks in token order. A full-attention
            layer covers tokens ``[0, total_tokens)``; a sliding-window layer
            only the blocks covering its last ``window`` tokens.
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
            lo, hi = spec.block_range(layer_id, self.total_tokens)
            if any(b.layer_id != layer_id for b in blocks):
                raise ValueError(f"layer {layer_id} holds a block of another layer")
            # A sliding layer may keep older blocks than it needs, never fewer.
            if len(blocks) < hi - lo or len(blocks) > hi:
                raise ValueError(
                    f"layer {layer_id} ({spec.layers[layer_id].attention}) holds {len(blocks)} blocks; "
                    f"{self.total_tokens} tokens need {hi - lo}"
                )
            needed = spec.kind(layer_id).first_needed(self.total_tokens)
            if self.valid_start(layer_id) > needed:
                raise ValueError(f"layer {layer_id} does not hold the tokens from position {needed} on")

    def first_block(self, layer_id: int) -> int:
        """Logical index (token position // block_tokens) of a layer's first block."""
        hi = -(-self.total_tokens // self.spec.block_tokens)
        return hi - len(self.blocks[layer_id])

    def valid_start(self, layer_id: int) -> int:
        """First position whose tokens a layer's blocks hold (0 for a layer that keeps every token)."""
        first = self.first_block(layer_id) * self.spec.block_tokens
        return max(first, self.valid_from.get(layer_id, self.spec.kind(layer_id).first_needed(self.total_tokens)))

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
