"""AgentMemory: a store over the engine for callers that resend the whole conversation.

Each turn the caller submits an agent's full prompt. The store keeps every
agent's blocks itself and, per submit:

1. finds the agent's cache: hot in the pool, else on disk (loaded back into
   the pool), else none;
2. keeps the longest common token prefix of that cache and the prompt
   (freeing whole blocks past it) and, if other agents' live blocks hold a
   longer prefix (a shared system prompt), shares those blocks instead;
3. submits only the rest of the prompt to the engine. If the pool is full,
   the least recently used idle agents are written to disk and their blocks
   freed until the request fits; ``PoolExhaustedError`` is raised only when
   it cannot fit even with every idle agent spilled.

The pool is the memory budget: the store holds agents' KV only in pool
blocks, and on disk.
"""

from __future__ import annotations

import functools
import threading
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from blockpool.block import AgentBlocks
from blockpool.cache_conversion import truncate
from blockpool.engine import BlockPoolBatchEngine, CompletedGeneration, GenerationEvent
from blockpool.errors import CacheCorruptionError, InvalidRequestError, PoolExhaustedError
from blockpool.persistence import (
    agent_file_name,
    export_agent,
    import_agent,
    load_agent_file,
    model_fingerprint,
    quarantine,
    save_agent_file,
)
from blockpool.prefix_index import PrefixIndex

Prompt = str | Sequence[int] | Sequence[dict[str, Any]]


@dataclass(frozen=True)
class MemoryStats:
    """Where agents live and what sharing saves."""

    hot_agents: int
    disk_agents: int
    used_blocks: int
    shared_blocks: int
    bytes_in_use: int
    bytes_saved_by_sharing: int  # what the agents' blocks would take unshared, minus what they take


class AgentMemory:
    """Keeps every agent's cache, reusing prefixes, sharing common ones, spilling to disk.

    Args:
        engine: The engine to generate with; its pool is the memory budget.
        cache_dir: Where idle agents are spilled and persisted. Without one,
            an evicted agent's cache is dropped (it will be prefilled again).
    """

    def __init__(self, engine: BlockPoolBatchEngine, cache_dir: str | Path | None = None):
        self.engine, self.pool = engine, engine.pool
        self.spec = engine.pool.spec
        self.cache_dir = Path(cache_dir) if cache_dir is not None else None
        if self.cache_dir is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._hot: OrderedDict[str, AgentBlocks] = OrderedDict()  # least recently used first
        self._busy: dict[int, str] = {}  # uid -> agent
        self._sources: dict[int, str] = {}  # uid -> "pool", "disk", "shared" or "cold"
        self._index = PrefixIndex(self.pool)

    @functools.cached_property
    def fingerprint(self) -> str:
        """The model fingerprint stored in and checked against agent files (computed on first use)."""
        return model_fingerprint(self.engine.model, self.spec)

    # ------------------------------------------------------------ requests

    def submit(self, agent_id: str, prompt: Prompt, **generation_args: Any) -> int:
        """Submit an agent's full prompt; only what its cache lacks is prefilled.

        Args:
            agent_id: The agent.
            prompt: The whole conversation so far: text, token ids, or chat
                messages (``[{"role": ..., "content": ...}]``) rendered with
                the tokenizer's chat template.
            generation_args: ``max_tokens``, ``sampler``,
                ``logits_processors`` and ``stop``, as for the engine.

        Raises:
            InvalidRequestError, PoolExhaustedError, CacheCorruptionError,
            IncompatibleCacheError.
        """
        self.engine.check_request(agent_id, generation_args.get("max_tokens", 256), generation_args.get("stop"))
        tokens = self.tokenize(prompt)
        with self._lock:
            if agent_id in self._busy.values():
                raise InvalidRequestError(f"agent {agent_id!r} already has a generation in flight")
            cached, source = self._take(agent_id)
            base, reused, shared = self._reuse(agent_id, cached, tokens)
            if shared:
                source = "shared"
            elif reused == 0:
                source = "cold"
            try:
                uid = self._submit_fitting(agent_id, tokens[reused:], base, generation_args)
            except BaseException:
                if base is not None:
                    self._hot[agent_id] = base  # keep what we have; the request failed
                raise
            self._busy[uid] = agent_id
            self._sources[uid] = source
            return uid

    def cancel(self, uid: int, *, free_blocks: bool = False) -> bool:
        """Cancel a request (see :meth:`BlockPoolBatchEngine.cancel`)."""
        return self.engine.cancel(uid, free_blocks=free_blocks)

    def step(self) -> Iterator[CompletedGeneration]:
        """Run until every request has finished, yielding each completion.

        ``completion.blocks`` stay owned by the store; do not free them.
        ``completion.cache_source`` says where the agent's cache came from.
        """
        for event in self.stream():
            if event.completion is not None:
                yield event.completion

    def stream(self) -> Iterator[GenerationEvent]:
        """Like :meth:`step`, also yielding each token."""
        for event in self.engine.stream():
            if event.completion is not None:
                event.completion = self._on_completion(event.completion)
            yield event

    # ------------------------------------------------------------ tiers

    def where(self, agent_id: str) -> str:
        """``"pool"``, ``"disk"`` or ``"none"``: where an agent's cache is now."""
        with self._lock:
            if agent_id in self._hot or agent_id in self._busy.values():
                return "pool"
            return "disk" if self._path(agent_id) is not None and self._path(agent_id).exists() else "none"

    def spill(self, agent_id: str) -> bool:
        """Move an idle agent from the pool to disk now. False if it is not hot, or busy.

        Without a ``cache_dir`` its cache is dropped instead.
        """
        with self._lock:
            if agent_id not in self._hot or agent_id in self._busy.values():
                return False
            self._spill(agent_id)
            return True

    def forget(self, agent_id: str) -> None:
        """Drop an agent's cache from the pool and from disk.

        Raises:
            InvalidRequestError: The agent has a generation in flight.
        """
        with self._lock:
            if agent_id in self._busy.values():
                raise InvalidRequestError(f"agent {agent_id!r} has a generation in flight")
            blocks = self._hot.pop(agent_id, None)
            if blocks is not None:
                self.pool.release(blocks)
            path = self._path(agent_id)
            if path is not None and path.exists():
                path.unlink()

    def flush(self) -> int:
        """Write every idle hot agent to disk. Returns how many were written."""
        if self.cache_dir is None:
            return 0
        with self._lock:
            for agent_id, blocks in self._hot.items():
                self._save(agent_id, blocks)
            return len(self._hot)

    def close(self) -> None:
        """Cancel what is in flight, flush, and give every block back to the pool."""
        with self._lock:
            uids = list(self._busy)
        for uid in uids:
            self.engine.cancel(uid)
        for _ in self.step():
            pass
        with self._lock:
            self.flush()
            for blocks in self._hot.values():
                self.pool.release(blocks)
            self._hot.clear()

    def stats(self) -> MemoryStats:
        """Agents per tier, and the bytes shared blocks save."""
        with self._lock:
            pool = self.pool.stats()
            per_agent = sum(a.bytes for a in pool.agents.values())
            disk = 0
            if self.cache_dir is not None:
                disk = sum(1 for _ in self.cache_dir.glob("*.safetensors"))
            return MemoryStats(len(self._hot), disk, pool.used_blocks, pool.shared_blocks, pool.used_bytes, per_agent - pool.used_bytes)

    # ------------------------------------------------------------ internals

    def tokenize(self, prompt: Prompt) -> list[int]:
        """Token ids for a full prompt: text, token ids, or chat messages.

        Raises:
            InvalidRequestError: An empty prompt, bad ids, or malformed messages.
        """
        if isinstance(prompt, Sequence) and not isinstance(prompt, str) and prompt and isinstance(prompt[0], dict):
            for message in prompt:
                if not (isinstance(message, dict) and isinstance(message.get("role"), str) and isinstance(message.get("content"), str)):
                    raise InvalidRequestError(f"chat messages need a string role and content, got {message!r}")
            try:
                tokens = self.engine.tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True)
            except Exception as e:
                raise InvalidRequestError(f"cannot render the chat messages: {e}") from e
            return self.engine.tokenize(list(tokens))
        return self.engine.tokenize(prompt)

    def _path(self, agent_id: str) -> Path | None:
        return None if self.cache_dir is None else self.cache_dir / agent_file_name(agent_id)

    def _take(self, agent_id: str) -> tuple[AgentBlocks | None, str]:
        """The agent's cache, moved into the pool if it was on disk."""
        if agent_id in self._hot:
            return self._hot.pop(agent_id), "pool"
        path = self._path(agent_id)
        if path is None or not path.exists():
            return None, "cold"
        try:
            file = load_agent_file(path, self.fingerprint, self.spec)
        except CacheCorruptionError as e:
            moved = quarantine(path)
            raise CacheCorruptionError(f"{e} (moved aside to {moved.name})") from e
        if file.agent_id != agent_id:
            moved = quarantine(path)
            raise CacheCorruptionError(f"{path} holds agent {file.agent_id!r}, not {agent_id!r} (moved aside to {moved.name})")
        while True:
            try:
                return import_agent(self.pool, file), "disk"
            except PoolExhaustedError:
                if not self._evict_one(agent_id):
                    raise

    def _reuse(self, agent_id: str, cached: AgentBlocks | None, tokens: list[int]) -> tuple[AgentBlocks | None, int, bool]:
        """Cut the cache to what the prompt shares with it, or share a longer live prefix.

        Returns the handle to resume from, how many prompt tokens it covers
        (always fewer than the prompt: at least one token is prefilled), and
        whether it came from other agents' blocks.
        """
        limit = len(tokens) - 1
        own = 0
        if cached is not None:
            own = min(_common_prefix(cached.token_ids, tokens), limit)
            trimmed = truncate(self.pool, cached, own)
            if trimmed is None:  # a sliding layer cannot serve that prefix
                self.pool.release(cached)
                own = 0
            cached = trimmed
        length, blocks = self._index.lookup(tokens, limit)
        if length > own:
            try:
                self.pool.share([blk for layer in blocks.values() for blk in layer], agent_id)
            except Exception:
                return cached, own, False
            if cached is not None:
                self.pool.release(cached)
            valid = {i: max(0, length - layer.window) for i, layer in enumerate(self.spec.layers) if layer.window is not None}
            return AgentBlocks(agent_id, self.spec, blocks, length, list(tokens[:length]), valid_from=valid), length, True
        return cached, own, False

    def _submit_fitting(self, agent_id: str, rest: list[int], base: AgentBlocks | None, args: dict[str, Any]) -> int:
        while True:
            try:
                return self.engine.submit(agent_id, rest, cache=base, **args)
            except PoolExhaustedError:
                if not self._evict_one(agent_id):
                    raise

    def _evict_one(self, keep: str) -> bool:
        """Spill the least recently used idle agent other than ``keep``. False if there is none."""
        busy = set(self._busy.values())
        for agent_id in self._hot:
            if agent_id != keep and agent_id not in busy:
                self._spill(agent_id)
                return True
        return False

    def _spill(self, agent_id: str) -> None:
        blocks = self._hot.pop(agent_id)
        if self.cache_dir is not None:
            self._save(agent_id, blocks)
        self.pool.release(blocks)

    def _save(self, agent_id: str, blocks: AgentBlocks) -> None:
        save_agent_file(self._path(agent_id), export_agent(self.pool, blocks, self.fingerprint))

    def _on_completion(self, completion: CompletedGeneration) -> CompletedGeneration:
        with self._lock:
            self._busy.pop(completion.uid, None)
            source = self._sources.pop(completion.uid, None)
            if completion.blocks is not None:
                self._hot[completion.agent_id] = completion.blocks
                self._hot.move_to_end(completion.agent_id)
                self._index.register(completion.blocks)
            return replace(completion, cache_source=source)


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
