"""Drop-in replacements for mlx-lm's ``generate``, ``stream_generate`` and ``batch_generate``.

They take the same arguments and return the same response types, plus an
``agent_id`` (``agent_ids`` for a batch) and an optional ``AgentMemory``.
Each call sends the whole prompt; the agent's cache is reused for the part
it already holds. Without ``memory``, one store per model is made on first
use, with a pool of ``BLOCKPOOL_MEMORY_BYTES`` bytes (1 GiB by default).

These are synchronous conveniences: while one runs it drives the store's
batch, so do not run one concurrently with other users of the same store.

Not supported, and refused with ``InvalidRequestError``: speculative
decoding (``draft_model``), mlx-lm's own ``prompt_cache`` / ``prompt_caches``
(the store keeps the caches), ``max_kv_size``, mlx-lm's KV quantization
arguments (use ``BlockPool(kv_bits=...)``) and ``input_embeddings``.
"""

from __future__ import annotations

import os
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchResponse, GenerationResponse, generation_stream

from blockpool.cache_conversion import to_mlx_caches
from blockpool.engine import BlockPoolBatchEngine
from blockpool.errors import InvalidRequestError
from blockpool.memory_store import AgentMemory
from blockpool.pool import BlockPool
from blockpool.spec import ModelCacheSpec

DEFAULT_AGENT = "default"
_UNSUPPORTED = ("prompt_cache", "max_kv_size", "kv_bits", "kv_group_size", "quantized_kv_start", "input_embeddings")
_PASSED_ON = ("sampler", "logits_processors", "stop")

_defaults: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_defaults_lock = threading.Lock()


@dataclass
class AgentGenerationResponse(GenerationResponse):
    """mlx-lm's ``GenerationResponse``, plus where the agent's cache came from."""

    agent_id: str = DEFAULT_AGENT
    cached_tokens: int = 0
    cache_source: str | None = None


def default_memory(model: nn.Module, tokenizer: Any) -> AgentMemory:
    """The store the drop-in functions use for ``model`` when given none."""
    with _defaults_lock:
        memory = _defaults.get(model)
        if memory is None:
            budget = int(os.environ.get("BLOCKPOOL_MEMORY_BYTES", 1 << 30))
            pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=budget)
            memory = AgentMemory(BlockPoolBatchEngine(model, tokenizer, pool))
            _defaults[model] = memory
        return memory


def stream_generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | mx.array | list[int],
    max_tokens: int = 256,
    draft_model: nn.Module | None = None,
    stream: Any = generation_stream,
    *,
    agent_id: str = DEFAULT_AGENT,
    memory: AgentMemory | None = None,
    **kwargs: Any,
) -> Iterator[AgentGenerationResponse]:
    """Like ``mlx_lm.stream_generate``: yields one response per generated token.

    ``stream`` is accepted for compatibility; generation runs on the store's
    engine. The last response has ``finish_reason`` ``"stop"`` or ``"length"``.
    """
    memory = _memory_for(model, tokenizer, memory, draft_model, kwargs)
    options = {k: kwargs.pop(k) for k in _PASSED_ON if k in kwargs}
    kwargs.pop("prefill_step_size", None)  # the engine's own setting applies
    kwargs.pop("prompt_progress_callback", None)
    if kwargs:
        raise InvalidRequestError(f"unknown arguments: {sorted(kwargs)}")
    if max_tokens == 0:
        raise InvalidRequestError("Maximum number of tokens must be non-zero")
    if isinstance(prompt, mx.array):
        prompt = prompt.tolist()
    tokens = memory.tokenize(prompt)
    tic = time.perf_counter()
    uid = memory.submit(agent_id, tokens, max_tokens=max_tokens, **options)
    n, prompt_tps, decode_start = 0, 0.0, tic
    for event in memory.stream():
        if event.uid != uid or (event.token is None and event.completion is None):
            continue
        done = event.completion
        if done is not None and done.finish_reason in ("error", "cancelled"):
            raise done.error or InvalidRequestError(f"request {uid} was cancelled")
        n += 1
        now = time.perf_counter()
        if n == 1:
            prompt_tps = len(tokens) / max(now - tic, 1e-9)
            decode_start = now
        yield AgentGenerationResponse(
            text=event.text,
            token=event.token,
            logprobs=event.logprobs,
            from_draft=False,
            prompt_tokens=len(tokens),
            prompt_tps=prompt_tps,
            generation_tokens=n,
            generation_tps=(n - 1) / (now - decode_start) if n > 1 else 0.0,
            peak_memory=mx.get_peak_memory() / 1e9,
            finish_reason=done.finish_reason if done else None,
            agent_id=agent_id,
            cached_tokens=done.cached_tokens if done else 0,
            cache_source=done.cache_source if done else None,
        )
        if done is not None:
            return


def generate(
    model: nn.Module,
    tokenizer: Any,
    prompt: str | list[int],
    verbose: bool = False,
    *,
    agent_id: str = DEFAULT_AGENT,
    memory: AgentMemory | None = None,
    **kwargs: Any,
) -> str:
    """Like ``mlx_lm.generate``: the whole response as text."""
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, agent_id=agent_id, memory=memory, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose and response is not None:
        print()
        print("=" * 10)
        print(f"Prompt: {response.prompt_tokens} tokens ({response.cached_tokens} from the {response.cache_source} cache), "
              f"{response.prompt_tps:.3f} tokens-per-sec")
        print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
        print(f"Peak memory: {response.peak_memory:.3f} GB")
    return text


def batch_generate(
    model: nn.Module,
    tokenizer: Any,
    prompts: list[list[int]],
    prompt_caches: list[list[Any]] | None = None,
    max_tokens: int | list[int] = 128,
    verbose: bool = False,
    return_prompt_caches: bool = False,
    return_token_ids: bool = False,
    return_logprobs: bool = False,
    *,
    agent_ids: list[str] | None = None,
    memory: AgentMemory | None = None,
    **kwargs: Any,
) -> BatchResponse:
    """Like ``mlx_lm.batch_generate``; prompt ``i`` runs as agent ``agent_ids[i]`` (``batch-i`` by default).

    ``return_prompt_caches`` returns each agent's cache rebuilt as mlx-lm
    caches (copies; the store keeps the blocks).
    """
    if prompt_caches is not None:
        raise InvalidRequestError("prompt_caches is not supported: the store keeps each agent's cache")
    memory = _memory_for(model, tokenizer, memory, None, kwargs)
    options = {k: kwargs.pop(k) for k in ("sampler", "logits_processors") if k in kwargs}
    for ignored in ("completion_batch_size", "prefill_batch_size", "prefill_step_size"):
        kwargs.pop(ignored, None)  # the engine's own settings apply
    if kwargs:
        raise InvalidRequestError(f"unknown arguments: {sorted(kwargs)}")
    agent_ids = agent_ids or [f"batch-{i}" for i in range(len(prompts))]
    if len(agent_ids) != len(prompts) or len(set(agent_ids)) != len(agent_ids):
        raise InvalidRequestError("agent_ids must name each prompt once")
    limits = [max_tokens] * len(prompts) if isinstance(max_tokens, int) else list(max_tokens)
    uids = {}
    for prompt, agent, limit in zip(prompts, agent_ids, limits):
        uids[memory.submit(agent, prompt, max_tokens=limit, **options)] = agent
    done = {}
    logprobs: dict[int, list[float]] = {uid: [] for uid in uids}
    with memory.engine.stats() as stats:
        for event in memory.stream():
            if event.uid not in uids:
                continue
            if return_logprobs and event.token is not None and event.logprobs is not None:
                logprobs[event.uid].append(event.logprobs[event.token].item())
            if event.completion is not None:
                done[event.uid] = event.completion
                if verbose:
                    print(f"[batch_generate] Finished processing {len(done)}/{len(uids)} ...", end="\r")
    if verbose:
        print(f"[batch_generate] Finished processing {len(done)}/{len(uids)}")
        print(f"[batch_generate] Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
        print(f"[batch_generate] Generation: {stats.generation_tokens} tokens, {stats.generation_tps:.3f} tokens-per-sec")
    order = list(uids)
    for uid in order:
        if done[uid].finish_reason in ("error", "cancelled"):
            raise done[uid].error or InvalidRequestError(f"request {uid} was cancelled")
    # As mlx-lm: a token that ends the sequence with "stop" (EOS) is not returned.
    tokens = {uid: done[uid].token_ids[:-1] if done[uid].finish_reason == "stop" else done[uid].token_ids for uid in order}
    caches = [to_mlx_caches(memory.pool, done[uid].blocks) for uid in order] if return_prompt_caches else None
    return BatchResponse(
        texts=[tokenizer.decode(tokens[uid]) for uid in order],
        stats=stats,
        caches=caches,
        token_ids=[tokens[uid] for uid in order] if return_token_ids else None,
        logprobs=[logprobs[uid][: len(tokens[uid])] for uid in order] if return_logprobs else None,
    )


def _memory_for(model, tokenizer, memory, draft_model, kwargs) -> AgentMemory:
    if draft_model is not None:
        raise InvalidRequestError("speculative decoding (draft_model) is not supported")
    refused = sorted(k for k in _UNSUPPORTED if kwargs.get(k) is not None)
    if refused:
        raise InvalidRequestError(f"not supported by blockpool: {refused}")
    for k in _UNSUPPORTED:
        kwargs.pop(k, None)
    memory = memory if memory is not None else default_memory(model, tokenizer)
    if memory.engine.model is not model:
        raise InvalidRequestError("the AgentMemory was made for another model")
    return memory


__all__ = ["AgentGenerationResponse", "batch_generate", "default_memory", "generate", "stream_generate"]
