"""Shared prefixes: full blocks keyed by a hash chained over their tokens, as vLLM does.

Block ``j`` of a sequence is keyed by ``h_j = sha256(h_{j-1} || tokens of
block j)``, so equal keys mean equal token prefixes, and agents whose
prompts start the same can hold the same physical blocks (reference counted
in the pool). A shared block is never written: the pool refuses to write a
block with more than one holder, and a handle whose last, partly used block
is shared gets a copy of it before it grows.

A prompt that diverges inside a block also shares the part before the
divergence: each block is also recorded under its parent's key with its own
tokens, so after the chain of whole blocks ends, the block whose tokens
start like the prompt's next ones gives its first tokens (at least
:data:`MIN_PARTIAL_TOKENS`). This is what ``mlx_lm.server``'s prompt cache
gets by matching to the token.

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
(``index_units``, ``partial_units``, ``lookup_units``); a recurrent layer
records none inside a block, so a hybrid model shares whole blocks only.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Sequence
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


#: The fewest tokens worth sharing from inside a block (sharing costs the follower a copy of it).
MIN_PARTIAL_TOKENS = 16

Entry = dict[int, tuple[KVBlock, int, int]]  # layer -> (block, generation, valid from)


class PrefixIndex:
    """Which live blocks hold which token prefixes."""

    def __init__(self, pool: BlockPool):
        self.pool = pool
        self._entries: dict[bytes, Entry] = {}  # chain key of a whole block -> its blocks
        # Parent's chain key (b"" for the first block) -> a block's own tokens (int32 bytes) -> its blocks.
        self._children: dict[bytes, dict[bytes, Entry]] = {}

    def register(self, agent: AgentBlocks, skip: Collection[KVBlock] = ()) -> None:
        """Index what an agent holds of its blocks (and the checkpoints that end at them), but ``skip``
        (blocks rewritten or freed since the handle was made)."""
        b = agent.spec.block_tokens
        keys = chain_hashes(agent.token_ids, agent.total_tokens // b, b)
        indexed = []
        for layer_id in range(agent.spec.num_layers):
            kind = agent.spec.kind(layer_id)
            for j, (block, valid) in kind.index_units(agent, layer_id).items():
                if j < len(keys) and block not in skip:
                    self._record(self._entries.setdefault(keys[j], {}), layer_id, block, valid)
                    indexed.append(block)
            for j, (block, valid) in kind.partial_units(agent, layer_id).items():
                if block in skip:
                    continue
                parent = keys[j - 1] if j else b""
                own = _token_bytes(agent.token_ids[j * b : min((j + 1) * b, agent.total_tokens)])
                self._record(self._children.setdefault(parent, {}).setdefault(own, {}), layer_id, block, valid)
        self.pool.mark_cacheable(indexed)
        if len(self._entries) + sum(map(len, self._children.values())) > 4 * self.pool.total_blocks:
            self._prune()

    def _record(self, entry: Entry, layer_id: int, block: KVBlock, valid: int) -> None:
        known = entry.get(layer_id)
        if known is None or not self._alive(*known):
            entry[layer_id] = (block, self.pool.generation(block), valid)

    def lookup(self, tokens: Sequence[int], limit: int) -> tuple[int, dict[int, list[KVBlock]]]:
        """The longest prefix of ``tokens`` (at most ``limit`` tokens) that live blocks hold.

        Returns:
            Its length, and per layer the blocks an agent resuming at that
            length needs (every block for a full layer, the window's blocks
            for a sliding one, the checkpoint at that length for a recurrent
            one; the last block may hold more tokens than the prefix, and is
            then copied before it is written). ``(0, {})`` when nothing matches.
        """
        spec = self.pool.spec
        b = spec.block_tokens
        keys = chain_hashes(tokens, max(0, limit) // b, b)
        # Layers that keep every block need every block of the chain: it ends where one is missing.
        required = [i for i in range(spec.num_layers) if spec.kind(i).chain_required()]
        chain: list[dict[int, tuple[KVBlock, int]]] = []
        for key in keys:
            live = self._live(self._entries.get(key, {}))
            if not live or not all(layer in live for layer in required):
                break
            chain.append(live)
        partial = self._partial(tokens, limit, keys[len(chain) - 1] if chain else b"", len(chain) * b)
        if partial is not None:
            found = self._units(chain + [partial[1]], partial[0])
            if found is not None:
                return partial[0], found
        for j in range(len(chain) - 1, -1, -1):  # longest first
            found = self._units(chain[: j + 1], (j + 1) * b)
            if found is not None:
                return (j + 1) * b, found
        return 0, {}

    def _partial(
        self, tokens: Sequence[int], limit: int, parent: bytes, start: int
    ) -> tuple[int, dict[int, tuple[KVBlock, int]]] | None:
        # The recorded block under ``parent`` whose tokens start most like tokens[start:limit].
        wanted = np.asarray(tokens[start : min(limit, start + self.pool.spec.block_tokens)], dtype=np.int32)
        best, best_live = 0, None
        for own, entry in self._children.get(parent, {}).items():
            n = common_length(np.frombuffer(own, dtype=np.int32), wanted)
            if n >= max(best + 1, MIN_PARTIAL_TOKENS):
                live = self._live(entry)
                if live:
                    best, best_live = n, live
        return None if best_live is None else (start + best, best_live)

    def _units(self, chain: list[dict[int, tuple[KVBlock, int]]], length: int) -> dict[int, list[KVBlock]] | None:
        # Per layer, the blocks a prefix of ``length`` tokens needs along ``chain``; None if one is missing.
        spec = self.pool.spec
        blocks: dict[int, list[KVBlock]] = {}
        for layer_id in range(spec.num_layers):
            found = spec.kind(layer_id).lookup_units(chain, layer_id, length, spec.block_tokens)
            if found is None:
                return None
            blocks[layer_id] = found
        return blocks

    def _live(self, entry: Entry) -> dict[int, tuple[KVBlock, int]]:
        return {layer: (blk, valid) for layer, (blk, gen, valid) in entry.items() if self._alive(blk, gen)}

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
        self._entries = _pruned(self._entries, self._alive)
        children = {parent: _pruned(entries, self._alive) for parent, entries in self._children.items()}
        self._children = {parent: entries for parent, entries in children.items() if entries}


def _pruned(entries: dict[Any, Entry], alive: Any) -> dict[Any, Entry]:
    # The entries with their live layers, those with none left out.
    out = {}
    for key, entry in entries.items():
        live = {layer: v for layer, v in entry.items() if alive(*v)}
        if live:
            out[key] = live
    return out


def _token_bytes(tokens: Sequence[int]) -> bytes:
    return np.asarray(tokens, dtype=np.int32).tobytes()


def common_length(a: np.ndarray, b: np.ndarray) -> int:
    """The length of the longest common prefix of two token arrays."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if differ.size else n
