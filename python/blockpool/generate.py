"""Drop-in replacements for mlx-lm's ``generate``, ``stream_generate`` and ``batch_generate``.

They take the same arguments and return the same response types, plus an
``agent_id`` (``agent_ids`` for a batch) and an optional ``AgentMemory``.
Each call sends the whole prompt; the agent's cache is reused for the part
it already holds. Greedy output equals mlx-lm's.

Without ``memory``, the store for that model and tokenizer is used: made on
first use with a pool of ``BLOCKPOOL_MEMORY_BYTES`` bytes (1 GiB by
default) and no cache directory, kept on the model object, and released with
the model (see :func:`default_memory`).

Beyond mlx-lm: ``stop`` (a string or a list of strings) ends generation
before the first stop string, in all three functions.

Threads: like mlx-lm's, these functions may be called from several
threads at once, and their requests join one batch
(:mod:`blockpool.shared_drive`): each call waits on its own tokens while
one of them runs the model. A call for an agent another thread's call is
using waits for it to end; calls with the default agent (or a batch's
default ``batch-i`` agents) run as a stand-in agent meanwhile, dropped when
the call ends. Do not drive the same store yourself (``step``, ``stream``,
``tick``) while drop-in calls run on it. Leaving a ``stream_generate`` loop
early cancels its request; the agent keeps the cache it had before the call.

Not supported, and refused with ``InvalidRequestError``: speculative
decoding (``draft_model``), mlx-lm's own ``prompt_cache`` / ``prompt_caches``
(the store keeps the caches), ``max_kv_size``, mlx-lm's KV quantization
arguments (use ``BlockPool(kv_bits=...)``), ``input_embeddings``,
``stop_tokens`` and ``max_tokens=-1`` (unbounded: the pool reserves for the
limit). ``stream`` and ``prefill_step_size`` (``completion_batch_size``,
``prefill_batch_size`` for a batch) are accepted and ignored: the store's
engine has its own.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchResponse, GenerationResponse, generation_stream
from mlx_lm.tokenizer_utils import TokenizerWrapper

from blockpool.cache_conversion import to_mlx_caches
from blockpool.engine import BlockPoolBatchEngine
from blockpool.errors import InvalidRequestError
from blockpool.pool import BlockPool
from blockpool.prompt import to_token_ids, vocab_size_of
from blockpool.shared_drive import SharedDrive, shared_drive
from blockpool.spec import ModelCacheSpec
from blockpool.store import AgentMemory

DEFAULT_AGENT = "default"
DEFAULT_MEMORY_BYTES = 1 << 30
_UNSUPPORTED = (
    "prompt_cache",
    "max_kv_size",
    "kv_bits",
    "kv_group_size",
    "quantized_kv_start",
    "input_embeddings",
    "stop_tokens",
)
# The stores default_memory made, kept in the model object's own __dict__ (not in the module tree,
# so parameters() never sees them): the store refers to the model, and the model to the store,
# and the pair is freed together once the caller drops the model.
_STORES_ATTRIBUTE = "_blockpool_default_stores"
_defaults_lock = threading.Lock()


@dataclass
class AgentGenerationResponse(GenerationResponse):
    """mlx-lm's ``GenerationResponse``, plus the agent and where its cache came from.

    ``cached_tokens`` and ``cache_source`` are set on the last response
    (``finish_reason`` not None); earlier responses carry 0 and None.
    """

    agent_id: str = DEFAULT_AGENT
    cached_tokens: int = 0
    cache_source: str | None = None


def default_memory(model: nn.Module, tokenizer: Any) -> AgentMemory:
    """The store the drop-in functions use for ``model`` and ``tokenizer`` when given none.

    One per model and tokenizer, made on first use: a pool of
    ``BLOCKPOOL_MEMORY_BYTES`` bytes (1 GiB by default) and no cache
    directory (an agent evicted from the pool is prefilled again). It is
    kept on the model object, so it lives as long as the model and is
    garbage-collected with it.

    Raises:
        InvalidRequestError: ``BLOCKPOOL_MEMORY_BYTES`` is not a positive
            whole number, or ``model`` cannot hold a store (not an MLX module).
    """
    try:
        attributes = vars(model)
    except TypeError:
        raise InvalidRequestError(f"cannot keep a default store on a {type(model).__name__}: pass memory=") from None
    with _defaults_lock:
        stores: list[tuple[Any, AgentMemory]] = attributes.setdefault(_STORES_ATTRIBUTE, [])
        for known, memory in stores:
            if known is tokenizer:
                return memory
        pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=_budget_from_env())
        wrapped = tokenizer if isinstance(tokenizer, TokenizerWrapper) else TokenizerWrapper(tokenizer)
        memory = AgentMemory(BlockPoolBatchEngine(model, wrapped, pool))
        stores.append((tokenizer, memory))
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

    Args:
        model, tokenizer: As ``mlx_lm.load`` returned them.
        prompt: Text, token ids (list or ``mx.array``), or chat messages.
        max_tokens: Most tokens to generate (at least 1).
        draft_model: Must be None (speculative decoding is not supported).
        stream: Accepted for compatibility; generation runs on the store's engine.
        agent_id: The agent whose cache to reuse and extend.
        memory: The store to use; by default :func:`default_memory`.
        kwargs: ``sampler``, ``logits_processors``, ``stop`` (a string or a
            list of strings) and ``prompt_progress_callback(processed, total)``
            (called as mlx-lm calls it, over the tokens actually prefilled).

    Yields:
        ``AgentGenerationResponse``; the last has ``finish_reason`` ``"stop"``
        (EOS, whose token it carries, or a stop string) or ``"length"``.

    Raises:
        InvalidRequestError: An unsupported or malformed argument or prompt.
        GenerationError: The model failed while generating.
    """
    _refuse_unsupported(draft_model, kwargs)
    options = _options(
        kwargs, ("sampler", "logits_processors", "stop", "prompt_progress_callback"), ("prefill_step_size",)
    )
    _check_max_tokens(max_tokens)
    tokens = to_token_ids(tokenizer, prompt, vocab_size=vocab_size_of(model))
    memory = _memory_for(model, tokenizer, memory)
    drive = shared_drive(memory)
    tic = time.perf_counter()
    requested = agent_id
    instead = _stand_in(agent_id) if agent_id == DEFAULT_AGENT else None
    uid, agent_id = drive.submit(agent_id, tokens, instead=instead, max_tokens=max_tokens, **options)
    finished = False
    try:
        n, prompt_tps, first_token_at = 0, 0.0, tic
        for event in drive.events([uid]):
            done = event.completion
            if done is not None and done.finish_reason in ("error", "cancelled"):
                finished = True
                raise done.error or InvalidRequestError(f"request {uid} of agent {agent_id!r} was cancelled")
            if event.token is None:
                continue
            n += 1
            if n == 1:
                first_token_at = time.perf_counter()
                prompt_tps = len(tokens) / max(first_token_at - tic, 1e-9)
            finished = done is not None
            yield AgentGenerationResponse(
                text=event.text,
                token=event.token,
                logprobs=event.logprobs,
                from_draft=False,
                prompt_tokens=len(tokens),
                prompt_tps=prompt_tps,
                generation_tokens=n,
                generation_tps=n / max(time.perf_counter() - first_token_at, 1e-9),
                peak_memory=mx.get_peak_memory() / 1e9,
                finish_reason=done.finish_reason if done else None,
                agent_id=agent_id,
                cached_tokens=done.cached_tokens if done else 0,
                cache_source=done.cache_source if done else None,
            )
            if finished:
                return
    finally:
        if not finished:  # the caller left early, or the engine raised: end the request
            _abandon(drive, uid)
        if agent_id != requested:
            _forget_stand_in(memory, agent_id)


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
    """Like ``mlx_lm.generate``: the whole response as text.

    Takes :func:`stream_generate`'s arguments. With ``verbose``, prints as
    mlx-lm does, plus how many prompt tokens came from the agent's cache.
    """
    if verbose:
        print("=" * 10)
    text = ""
    response = None
    for response in stream_generate(model, tokenizer, prompt, agent_id=agent_id, memory=memory, **kwargs):
        if verbose:
            print(response.text, end="", flush=True)
        text += response.text
    if verbose:
        print()
        print("=" * 10)
        if not text or response is None:
            print("No text generated for this prompt")
            return text
        print(
            f"Prompt: {response.prompt_tokens} tokens ({response.cached_tokens} "
            f"from the {response.cache_source} cache), "
            f"{response.prompt_tps:.3f} tokens-per-sec"
        )
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

    Every prompt (token ids, text or chat messages) is checked before any is
    submitted. ``kwargs``: ``sampler``, ``logits_processors`` and ``stop``
    (a string or a list of strings). As in mlx-lm, a final EOS is not in
    ``token_ids`` or ``logprobs``; a request ended by a stop string keeps
    its tokens, and its text ends before the stop string.
    ``return_prompt_caches`` returns each agent's cache rebuilt as mlx-lm
    caches (copies; the store keeps the blocks).

    Raises:
        InvalidRequestError: An unsupported or malformed argument or prompt;
            nothing was submitted.
        GenerationError: The model failed while generating.
    """
    if prompt_caches is not None:
        raise InvalidRequestError("prompt_caches is not supported: the store keeps each agent's cache")
    _refuse_unsupported(None, kwargs)
    options = _options(
        kwargs,
        ("sampler", "logits_processors", "stop"),
        ("completion_batch_size", "prefill_batch_size", "prefill_step_size", "stream"),
    )
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise InvalidRequestError(f"prompts must be a list of prompts, got {type(prompts).__name__}")
    token_lists = [to_token_ids(tokenizer, p, vocab_size=vocab_size_of(model)) for p in prompts]
    given_ids = agent_ids
    agent_ids = list(agent_ids) if agent_ids is not None else [f"batch-{i}" for i in range(len(prompts))]
    if len(agent_ids) != len(prompts) or len(set(agent_ids)) != len(agent_ids):
        raise InvalidRequestError("agent_ids must name each prompt once")
    if isinstance(max_tokens, Sequence):
        limits = list(max_tokens)
        if len(limits) != len(prompts):
            raise InvalidRequestError(f"max_tokens has {len(limits)} entries for {len(prompts)} prompts")
    else:
        limits = [max_tokens] * len(prompts)
    for limit in limits:
        _check_max_tokens(limit)
    memory = _memory_for(model, tokenizer, memory)

    drive = shared_drive(memory)
    uids: dict[int, str] = {}
    stand_ins = []
    try:
        for tokens, agent, limit in zip(token_lists, agent_ids, limits):
            instead = _stand_in(agent) if given_ids is None else None  # default ids: batch-i
            uid, used = drive.submit(agent, tokens, instead=instead, max_tokens=limit, **options)
            uids[uid] = used
            if used != agent:
                stand_ins.append(used)
        return _batch_response(
            memory, drive, uids, tokenizer, options, verbose, return_prompt_caches, return_token_ids, return_logprobs
        )
    finally:
        for uid in uids:  # all or nothing: a request left unfinished (a failed submit, an interrupt) is taken back
            _abandon(drive, uid)
        for agent in stand_ins:
            _forget_stand_in(memory, agent)


def _batch_response(
    memory: AgentMemory,
    drive: SharedDrive,
    uids: dict[int, str],
    tokenizer: Any,
    options: dict[str, Any],
    verbose: bool,
    return_prompt_caches: bool,
    return_token_ids: bool,
    return_logprobs: bool,
) -> BatchResponse:
    """Run a batch's requests to their ends and build mlx-lm's response."""
    done = {}
    logprobs: dict[int, list[float]] = {uid: [] for uid in uids}
    with memory.engine.stats() as stats:
        for event in drive.events(list(uids)):
            if return_logprobs and event.token is not None and event.logprobs is not None:
                logprobs[event.uid].append(event.logprobs[event.token].item())
            if event.completion is not None:
                done[event.uid] = event.completion
                if verbose:
                    print(f"[batch_generate] Finished processing {len(done)}/{len(uids)} ...", end="\r")
    if verbose:
        print(f"[batch_generate] Finished processing {len(done)}/{len(uids)}")
    order = list(uids)
    for uid in order:
        if done[uid].finish_reason in ("error", "cancelled"):
            raise done[uid].error or InvalidRequestError(f"request {uid} was cancelled")
    eos = set(memory.engine.tokenizer.eos_token_ids)
    tokens = {}
    for uid in order:
        ids = done[uid].token_ids
        # As mlx-lm: a token that ends the sequence with "stop" (EOS) is not returned.
        tokens[uid] = ids[:-1] if done[uid].finish_reason == "stop" and ids and ids[-1] in eos else ids
    stop_given = bool(options.get("stop"))
    texts = [done[uid].text if stop_given else tokenizer.decode(tokens[uid]) for uid in order]
    caches = [to_mlx_caches(memory.pool, done[uid].blocks) for uid in order] if return_prompt_caches else None
    if verbose:
        print(f"[batch_generate] Prompt: {stats.prompt_tokens} tokens, {stats.prompt_tps:.3f} tokens-per-sec")
        print(
            f"[batch_generate] Generation: {stats.generation_tokens} tokens, {stats.generation_tps:.3f} tokens-per-sec"
        )
        print(f"[batch_generate] Peak memory: {stats.peak_memory:.3f} GB")
    return BatchResponse(
        texts=texts,
        stats=stats,
        caches=caches,
        token_ids=[tokens[uid] for uid in order] if return_token_ids else None,
        logprobs=[logprobs[uid][: len(tokens[uid])] for uid in order] if return_logprobs else None,
    )


# ------------------------------------------------------------------ internals


def _refuse_unsupported(draft_model: Any, kwargs: dict) -> None:
    """Refuse what the store cannot do; drop the unsupported keywords left at their mlx-lm default (None)."""
    if draft_model is not None:
        raise InvalidRequestError("speculative decoding (draft_model) is not supported")
    refused = sorted(k for k in _UNSUPPORTED if kwargs.get(k) is not None)
    if refused:
        raise InvalidRequestError(f"not supported by blockpool: {refused}")
    for k in _UNSUPPORTED:
        kwargs.pop(k, None)


def _memory_for(model: nn.Module, tokenizer: Any, memory: AgentMemory | None) -> AgentMemory:
    if memory is not None and not isinstance(memory, AgentMemory):
        raise InvalidRequestError(f"memory must be an AgentMemory, got {type(memory).__name__}")
    memory = memory if memory is not None else default_memory(model, tokenizer)
    if memory.engine.model is not model:
        raise InvalidRequestError("the AgentMemory was made for another model")
    return memory


def _options(kwargs: dict, passed: tuple[str, ...], ignored: tuple[str, ...]) -> dict[str, Any]:
    """The generation options to pass on; ``stop`` as a list. Refuses unknown keywords."""
    unknown = sorted(k for k in kwargs if k not in passed and k not in ignored)
    if unknown:
        raise InvalidRequestError(f"unknown arguments: {unknown}")
    options = {k: kwargs[k] for k in passed if kwargs.get(k) is not None}
    stop = options.get("stop")
    if isinstance(stop, str):
        options["stop"] = [stop]
    elif stop is not None and (not isinstance(stop, Sequence) or not all(isinstance(s, str) and s for s in stop)):
        raise InvalidRequestError(f"stop must be a string or a list of non-empty strings, got {stop!r}")
    callback = options.get("prompt_progress_callback")
    if callback is not None and not callable(callback):
        raise InvalidRequestError("prompt_progress_callback must be callable (processed, total)")
    # API_PLAN: the engine's submit takes prompt_progress_callback; AgentMemory passes it on.
    return options


def _check_max_tokens(max_tokens: Any) -> None:
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if max_tokens == -1:
        raise InvalidRequestError("max_tokens=-1 (no limit) is not supported: the pool reserves room for max_tokens")
    if max_tokens < 1:
        raise InvalidRequestError(f"Maximum number of tokens must be at least 1, got {max_tokens}")


def _abandon(drive: SharedDrive, uid: int) -> None:
    """Cancel a request and run the store until it has ended (its cache is kept as before)."""
    try:
        drive.memory.cancel(uid)
        for _ in drive.events([uid]):
            pass
    except Exception:  # already leaving on an error: that error is the one to report
        pass


def _stand_in(agent_id: str) -> str:
    """For a default agent busy with another thread's call: a fresh agent to run as meanwhile."""
    return f"{agent_id}~{uuid.uuid4().hex[:12]}"


def _forget_stand_in(memory: AgentMemory, agent_id: str) -> None:
    """A stand-in agent lives for one call (its blocks stay findable for their prefix until needed)."""
    with contextlib.suppress(InvalidRequestError):
        memory.forget(agent_id)


def _budget_from_env() -> int:
    raw = os.environ.get("BLOCKPOOL_MEMORY_BYTES")
    if raw is None:
        return DEFAULT_MEMORY_BYTES
    try:
        value = int(raw)
    except ValueError:
        value = 0
    if value <= 0:
        raise InvalidRequestError(f"BLOCKPOOL_MEMORY_BYTES must be a positive whole number of bytes, got {raw!r}")
    return value


__all__ = ["AgentGenerationResponse", "batch_generate", "default_memory", "generate", "stream_generate"]
