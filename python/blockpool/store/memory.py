"""AgentMemory: a store over the engine for callers that resend the whole conversation.

Each turn the caller submits an agent's full prompt. The store keeps every
agent's cache itself and, per submit:

1. finds the agent's cache: hot in the pool, else on disk (read and
   verified by the submitting thread, never the engine's), else none;
2. resumes from the longest common token prefix of that cache and the
   prompt or, if other agents' blocks hold a longer prefix, shares those
   blocks instead (:mod:`.resume`);
3. submits only the rest of the prompt to the engine, which queues it until
   there is room.

Everything is validated before anything changes: a refused submit leaves
the agent's cache as it was.

The pool is the memory budget. The store keeps a queued request's cache
until the engine admits it (the engine fetches it then), so that while
requests wait, their caches can move too: when the pool is short it asks
the store for room, which spills caches to disk in the background
(:mod:`.spill`). With ``durable=True`` every completed turn is also written
behind, and the agent's next submit waits for that write. Where each
agent's cache is lives in :mod:`.tiers`; its files in :mod:`.agent_files`;
shared prefixes in :mod:`.prefix_index`.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from blockpool.block import AgentBlocks
from blockpool.engine import BlockPoolBatchEngine, CompletedGeneration, GenerationEvent
from blockpool.errors import InvalidRequestError
from blockpool.prompt import Prompt, to_token_ids
from blockpool.store.agent_files import AgentFiles
from blockpool.store.prefix_index import PrefixIndex
from blockpool.store.resume import choose_resume, common_prefix, queue_own
from blockpool.store.spill import Spiller
from blockpool.store.tiers import AgentInfo, Tiers

#: Generation arguments the store passes to the engine.
GENERATION_ARGS = ("max_tokens", "sampler", "logits_processors", "stop", "prompt_progress_callback")


@dataclass(frozen=True)
class MemoryStats:
    """Where agents live and what sharing saves."""

    hot_agents: int
    disk_agents: int
    used_blocks: int
    shared_blocks: int
    bytes_in_use: int
    bytes_saved_by_sharing: int  # what the agents' blocks would take unshared, minus what they take
    checkpoint_bytes: int = 0  # recurrent-state snapshots idle agents keep besides their last one


class AgentMemory:
    """Keeps every agent's cache, reusing prefixes, sharing common ones, spilling to disk.

    Args:
        engine: The engine to generate with; its pool is the memory budget.
        cache_dir: Where idle agents are spilled and persisted. Without one,
            an evicted agent's cache is dropped (it will be prefilled again).
        durable: Write every agent's file after each of its completions
            (in the background); its next submit waits for that write.
        deterministic: Do all disk work synchronously, so that what runs
            when depends only on the sequence of calls (for several ranks
            that must stay in lockstep).
    """

    def __init__(
        self,
        engine: BlockPoolBatchEngine,
        cache_dir: str | Path | None = None,
        *,
        durable: bool = False,
        deterministic: bool = False,
    ):
        if not isinstance(engine, BlockPoolBatchEngine):
            raise InvalidRequestError(f"engine must be a BlockPoolBatchEngine, got {type(engine).__name__}")
        if durable and cache_dir is None:
            raise InvalidRequestError("durable=True needs a cache_dir")
        self.engine, self.pool, self.spec = engine, engine.pool, engine.pool.spec
        self.durable, self.deterministic = durable, deterministic
        self._files = AgentFiles(cache_dir, engine.model, self.spec)
        self._early_prompts: deque[tuple[AgentBlocks, list[int]]] = deque()  # see _index_prompt
        self.cache_dir = self._files.cache_dir
        self._lock = threading.RLock()
        self._tiers = Tiers(self.pool)
        self._spiller = Spiller(self._tiers, self.pool, engine, self._files, self._lock, deterministic)
        self._index = PrefixIndex(self.pool)
        self.write_errors = self._spiller.errors  # background write failures, oldest first
        self.pool.add_reclaimer(self._spiller.reclaim)
        self._closed = False

    @property
    def fingerprint(self) -> str:
        """The model fingerprint stored in and checked against agent files (computed on first use)."""
        return self._files.fingerprint

    # ------------------------------------------------------------ requests

    def submit(
        self,
        agent_id: str,
        prompt: Prompt,
        *,
        tools: Sequence[dict[str, Any]] | None = None,
        chat_template_kwargs: dict[str, Any] | None = None,
        share_prompt: bool = False,
        **generation_args: Any,
    ) -> int:
        """Submit an agent's full prompt; only what its cache lacks is prefilled.

        Args:
            agent_id: The agent.
            prompt: The whole conversation so far: text, token ids, or chat
                messages (``[{"role": ..., "content": ...}]``, content as a
                string or a list of text parts) rendered with the tokenizer's
                chat template.
            tools: Tool definitions for the chat template (chat prompts only).
            chat_template_kwargs: Other chat template arguments (chat prompts only).
            share_prompt: For an agent without a cache of its own: index the
                prompt's full blocks for other agents as soon as it is
                prefilled, not when it completes (the engine's
                ``share_prompt``), so that agents arriving together with one
                system prompt prefill it once. On a gathered engine the
                prompt's KV is held twice while the request decodes (a paged
                one shares the blocks it writes in); skipped when the budget
                has no room.
            generation_args: ``max_tokens``, ``sampler``, ``logits_processors``,
                ``stop`` and ``prompt_progress_callback``, as for the engine.

        Returns:
            The request's uid.

        Raises:
            InvalidRequestError, PoolExhaustedError, CacheCorruptionError,
            IncompatibleCacheError: nothing was changed (a corrupt file is
            moved aside, and the agent starts cold next time).
        """
        unknown = sorted(set(generation_args) - set(GENERATION_ARGS))
        if unknown:
            raise InvalidRequestError(
                f"unknown generation arguments {unknown}; expected some of {list(GENERATION_ARGS)}"
            )
        self.engine.check_request(agent_id, generation_args.get("max_tokens", 256), generation_args.get("stop"))
        tokens = self.tokenize(prompt, tools=tools, chat_template_kwargs=chat_template_kwargs)
        self._spiller.wait_for_write(agent_id)
        with self._lock:
            in_memory = self._tiers.in_memory(agent_id)
        # Verified, but only its header kept (token ids, layout): the data is read when there is room for
        # it (a prefetch below, or at admission), so a submit never holds a file the budget does not count.
        loaded = None if in_memory else self._files.load_header(agent_id)  # outside the lock: the engine never waits
        with self._lock:
            if self._closed:
                raise InvalidRequestError("the store is closed")
            if self._tiers.is_busy(agent_id):
                raise InvalidRequestError(f"agent {agent_id!r} already has a generation in flight")
            return self._submit_locked(agent_id, tokens, loaded, generation_args, share_prompt)

    def _submit_locked(
        self, agent_id: str, tokens: list[int], loaded: Any, generation_args: dict[str, Any], share_prompt: bool
    ) -> int:
        self._index_early_prompts_locked()
        tiers = self._tiers
        hot, unwritten = tiers.hot.get(agent_id), tiers.unwritten.get(agent_id)
        if hot is not None and loaded is not None:  # the file holds more than the hot prefix: take the better
            if common_prefix(loaded.token_ids, tokens) <= common_prefix(hot.token_ids, tokens):
                loaded = None
            else:
                tiers.drop_hot(agent_id)
                tiers.disk_ahead.discard(agent_id)
                hot = None
        file = unwritten[0] if unwritten is not None else (loaded if hot is None else None)
        resume = choose_resume(tokens, hot, file, self._index)
        queued, source, newly_shared = None, None, []
        if resume.kind == "shared":
            fields = self._index.handle_fields(resume.keep)
            source = AgentBlocks(agent_id, self.spec, resume.shared, resume.keep, list(tokens[: resume.keep]), **fields)
            # Some of the prefix may be the agent's own blocks (its hot handle holds them already).
            own = set(hot.all_blocks()) if hot is not None else set()
            newly_shared = [b for b in source.all_blocks() if b not in own]
            self.pool.share(newly_shared, agent_id)
        elif resume.kind != "cold":
            queued, source = queue_own(self.pool, self._spiller, agent_id, tokens[: resume.keep], hot, file, unwritten)
            tiers.queued[agent_id] = queued
        if share_prompt and resume.kind in ("cold", "shared") and len(tokens) - resume.keep >= self.spec.block_tokens:
            generation_args = {**generation_args, "share_prompt": self._index_prompt}
        try:
            uid = self.engine.submit(agent_id, tokens[resume.keep :], cache=source, **generation_args)
        except BaseException:
            if newly_shared:
                self.pool.free(newly_shared, agent_id)
            if queued is not None:
                tiers.queued.pop(agent_id, None)
                if queued.charge is not None and unwritten is None:
                    self.pool.charge(queued.charge, 0)
            raise
        # Committed.
        if queued is not None:
            queued.uid = uid
            tiers.hot.pop(agent_id, None)
            tiers.unwritten.pop(agent_id, None)
            self._spiller.prefetch(agent_id)  # read it back now if the budget has room (hides the disk read)
        elif hot is not None:  # superseded by a longer shared prefix, or nothing in common
            tiers.hot.pop(agent_id)
            kept = set(source.all_blocks()) if source is not None else set()
            self.pool.free([b for b in hot.all_blocks() if b not in kept], agent_id)
        tiers.busy[uid] = agent_id
        tiers.sources[uid] = resume.kind
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
            if self._early_prompts:
                with self._lock:
                    self._index_early_prompts_locked()
            if event.completion is not None:
                event.completion = self._on_completion(event.completion)
            yield event

    def tick(self) -> list[GenerationEvent]:
        """One engine iteration (see :meth:`BlockPoolBatchEngine.tick`), completions recorded."""
        events = self.engine.tick()
        if self._early_prompts:
            with self._lock:
                self._index_early_prompts_locked()
        for event in events:
            if event.completion is not None:
                event.completion = self._on_completion(event.completion)
        return events

    # ------------------------------------------------------------ tiers

    def where(self, agent_id: str) -> str:
        """``"pool"``, ``"disk"`` or ``"none"``: where an agent's cache is now."""
        with self._lock:
            if self._tiers.in_pool(agent_id):
                return "pool"
            return "disk" if self._files.exists(agent_id) else "none"

    def shared_tokens(self, tokens: Sequence[int]) -> int:
        """How many leading tokens of ``tokens`` a new agent would take from other agents' blocks
        now (whole blocks; 0 when the pool holds none of it)."""
        with self._lock:
            self._index_early_prompts_locked()
            return self._index.lookup(tokens, len(tokens))[0]

    def agents(self) -> list[AgentInfo]:
        """Every agent the store knows, with where it lives, its tokens and its bytes."""
        with self._lock:
            seen = {info.agent_id: info for info in self._tiers.infos(self.engine.request_tokens)}
        for agent_id, tokens, size in self._files.listing():
            if agent_id not in seen:
                seen[agent_id] = AgentInfo(agent_id, "disk", tokens, size, True)
        return sorted(seen.values(), key=lambda a: a.agent_id)

    def file_bytes(self) -> dict[str, int]:
        """Bytes of each agent's file on disk (empty without a ``cache_dir``)."""
        return {agent_id: size for agent_id, _, size in self._files.listing()}

    def spill(self, agent_id: str) -> bool:
        """Move an idle agent from the pool to disk now, waiting for the write.

        Without a ``cache_dir`` its cache is dropped instead.

        Returns:
            False if it is not idle in the pool.

        Raises:
            PersistenceError: The write failed; the agent stays in memory.
        """
        with self._lock:
            if agent_id not in self._tiers.hot or self._tiers.is_busy(agent_id):
                return False
            future = self._spiller.spill_locked(agent_id)
        if future is not None:
            future.result()
        return True

    def forget(self, agent_id: str) -> None:
        """Drop an agent's cache from the pool and from disk.

        Raises:
            InvalidRequestError: The agent has a generation in flight.
        """
        self._spiller.wait_for_write(agent_id)
        with self._lock:
            tiers = self._tiers
            if tiers.is_busy(agent_id):
                raise InvalidRequestError(f"agent {agent_id!r} has a generation in flight")
            tiers.forget(agent_id)
            self._files.remove(agent_id)

    def flush(self) -> int:
        """Write every idle hot agent whose file is not current, now. Returns how many were written.

        Raises:
            PersistenceError: A write failed (the agent stays hot).
        """
        return self._spiller.flush()

    def wait_durable(self, agent_id: str | None = None, timeout: float | None = None) -> bool:
        """Wait for background writes (of one agent, or all) to end.

        Returns:
            Whether they all ended within ``timeout`` (``timeout=0`` only checks).
        """
        return self._spiller.wait(agent_id, timeout)

    def close(self) -> None:
        """Cancel what is in flight, persist every agent, and give every byte back to the pool.

        Raises:
            PersistenceError: Some agent could not be written; the others were.
        """
        with self._lock:
            uids = list(self._tiers.busy)
        for uid in uids:
            self.engine.cancel(uid)
        for _ in self.step():
            pass
        error = None
        try:
            self.flush()
        except Exception as e:  # still give the memory back
            error = e
        self.wait_durable()
        with self._lock:
            self._tiers.release_all()
            self._closed = True
        self.pool.remove_reclaimer(self._spiller.reclaim)
        self.pool.drop_cached()  # the prefix index dies with the store
        self._spiller.shutdown()
        if error is not None:
            raise error

    def stats(self) -> MemoryStats:
        """Agents per tier, the bytes shared blocks save, and the bytes recurrent checkpoints hold."""
        with self._lock:
            pool = self.pool.stats()
            per_agent = sum(a.bytes for a in pool.agents.values())
            return MemoryStats(
                len(self._tiers.hot),
                self._files.count(),
                pool.used_blocks,
                pool.shared_blocks,
                pool.used_bytes,
                max(0, per_agent - pool.block_bytes),
                self._tiers.checkpoint_bytes(),
            )

    def tokenize(self, prompt: Prompt, **template_args: Any) -> list[int]:
        """Token ids for a full prompt: text, token ids, or chat messages (see :mod:`blockpool.prompt`)."""
        return to_token_ids(self.engine.tokenizer, prompt, vocab_size=self.engine.vocab_size, **template_args)

    # ------------------------------------------------------------ completions

    def _index_prompt(self, blocks: AgentBlocks) -> None:
        # Called by the engine, mid-step: the store's lock may be held by a thread that waits on the
        # engine, so the blocks are only noted here (with their generations) and indexed by the next
        # submit or event the store handles, which is before anyone sees this request's first token.
        self._early_prompts.append((blocks, [self.pool.generation(b) for b in blocks.all_blocks()]))

    def _index_early_prompts_locked(self) -> None:
        while self._early_prompts:
            blocks, generations = self._early_prompts.popleft()
            # A block freed (a cancel) or written since (the running request's last one, in place) is
            # not indexed: its generation moved on.
            stale = {b for b, g in zip(blocks.all_blocks(), generations) if not self.pool.is_live(b, g)}
            self._index.register(blocks, skip=stale)

    def _on_completion(self, completion: CompletedGeneration) -> CompletedGeneration:
        agent_id, blocks = completion.agent_id, completion.blocks
        with self._lock:
            source, kept = self._tiers.complete(completion)
            if kept:
                self._index.register(blocks)
                if completion.finish_reason in ("cancelled", "error"):
                    # The agent's cache is its history cut back to the failed prompt's common prefix; its file,
                    # if it has one, holds the longer finished turn: keep that one.
                    if self._files.exists(agent_id):
                        self._tiers.disk_ahead.add(agent_id)
                elif self.durable:
                    self._spiller.write_turn_locked(agent_id, blocks)
            return replace(completion, cache_source=source)
