"""Shared prefixes: full blocks keyed by a hash chained over their tokens, as vLLM does.

Block ``j`` of a sequence is keyed by ``h_j = sha256(h_{j-1} || tokens of
block j)``, so equal keys mean equal token prefixes, and agents whose
prompts start the same can hold the same physical blocks (reference counted
in the pool). Only full blocks are indexed: a shared block is never written.

The index holds no references of its own. Each entry remembers the block's
generation (bumped by the pool at every allocation and write), so an entry
whose block was dropped, reused or written since is recognised as stale and
ignored. Indexed blocks are marked cacheable: when their last holder frees
them the pool keeps them (least recently freed first) until it needs the
memory, so a prefix outlives the agents that held it, e.g. while they sit
on disk. A sliding-window layer's block may hold only its later tokens
(older ones were never stored); each entry records from which position its
tokens are valid, and a prefix is only shared if every window it needs is.
A recurrent layer's checkpoint is indexed with the block that ends at its
position, so a prefix of a hybrid model is shared only at a checkpoint.
Which units a layer records and needs is its cache kind's rule
(``index_units``, ``lookup_units``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from blockpool.block import AgentBlocks, KVBlock
from blockpool.pool import BlockPool


def chain_hashes(tokens: Sequence[int], num_blocks: int, block_tokens: int) -> list[bytes]:
    """The chained keys of the first ``num_blocks`` full blocks of ``tokens``."""
    keys, parent = [], b""
    if num_blocks <= 0:
        return keys
    data = np.asarray(tokens[: num_blocks * block_tokens], dtype=np.int64).tobytes()  # one conversion
    step = block_tokens * 8
    for j in range(num_blocks):
        parent = hashlib.sha256(parent + data[j * step : (j + 1) * step]).digest()
        keys.append(parent)
    return keys


class PrefixIndex:
    """Which live blocks hold which token prefixes."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self._entries: dict[
            bytes, dict[int, tuple[KVBlock, int, int]]
        ] = {}  # key -> layer -> (block, generation, valid from)

    def register(self, agent: AgentBlocks) -> None:
        """Index what an agent holds of its full blocks (and the checkpoints that end at them)."""
        b = agent.spec.block_tokens
        keys = chain_hashes(agent.token_ids, agent.total_tokens // b, b)
        indexed = []
        for layer_id in range(agent.spec.num_layers):
            for j, (block, valid) in agent.spec.kind(layer_id).index_units(agent, layer_id).items():
                if j >= len(keys):
                    continue
                entry = self._entries.setdefault(keys[j], {})
                known = entry.get(layer_id)
                indexed.append(block)
                if known is None or not self._alive(*known):
                    entry[layer_id] = (block, self.pool.generation(block), valid)
        self.pool.mark_cacheable(indexed)
        if len(self._entries) > 4 * self.pool.total_blocks:
            self._prune()

    def lookup(self, tokens: Sequence[int], limit: int) -> tuple[int, dict[int, list[KVBlock]]]:
        """The longest prefix of ``tokens`` (at most ``limit`` tokens, whole blocks) that live blocks hold.

        Returns:
            Its length, and per layer the blocks an agent resuming at that
            length needs (every block for a full layer, the window's blocks
            for a sliding one, the checkpoint at that length for a recurrent
            one). ``(0, {})`` when nothing matches.
        """
        spec = self.pool.spec
        b = spec.block_tokens
        keys = chain_hashes(tokens, max(0, limit) // b, b)
        # Layers that keep every block need every block of the chain: it ends where one is missing.
        required = [i for i in range(spec.num_layers) if spec.kind(i).chain_required()]
        chain: list[dict[int, tuple[KVBlock, int]]] = []
        for key in keys:
            entry = self._entries.get(key, {})
            live = {layer: (blk, valid) for layer, (blk, gen, valid) in entry.items() if self._alive(blk, gen)}
            if not live or not all(layer in live for layer in required):
                break
            chain.append(live)
        for j in range(len(chain) - 1, -1, -1):  # longest first
            length = (j + 1) * b
            blocks: dict[int, list[KVBlock]] = {}
            for layer_id in range(spec.num_layers):
                found = spec.kind(layer_id).lookup_units(chain[: j + 1], layer_id, length, b)
                if found is None:
                    break
                blocks[layer_id] = found
            else:
                return length, blocks
        return 0, {}

    def handle_fields(self, length: int) -> dict[str, dict[int, Any]]:
        """For a prefix :meth:`lookup` returned: the handle's ``valid_from`` (token layers) and
        ``positions`` (recurrent layers: the checkpoint at ``length``)."""
        spec = self.pool.spec
        valid_from = {
            i: spec.kind(i).first_needed(length) for i in range(spec.num_layers) if spec.kind(i).storage == "tokens"
        }
        return {"valid_from": valid_from, "positions": {i: [length] for i in spec.state_layers}}

    def _alive(self, block: KVBlock, generation: int, valid_from: int = 0) -> bool:
        return self.pool.is_live(block, generation)

    def _prune(self) -> None:
        for key in list(self._entries):
            live = {layer: v for layer, v in self._entries[key].items() if self._alive(*v)}
            if live:
                self._entries[key] = live
            else:
                del self._entries[key]
