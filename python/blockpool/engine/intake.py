"""Intake: a submit's arguments checked and turned into a :class:`~blockpool.engine.types.Request`.

Everything is validated before anything changes: the prompt (through
:mod:`blockpool.prompt`), the generation arguments, and what the request
resumes from (:func:`blockpool.engine.history.check_source`). Whether the
request could ever fit the budget is the scheduler's question; whether the
agent already has a request in flight is the engine's.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Sequence
from typing import Any

from blockpool.engine.history import History, check_source
from blockpool.engine.output import Output
from blockpool.engine.types import Params, ProgressCallback, Request
from blockpool.errors import InvalidRequestError
from blockpool.prompt import to_token_ids


def check_arguments(agent_id: Any, max_tokens: Any = 256, stop: str | Sequence[str] | None = None) -> list[str]:
    """Validate the simple request arguments; returns ``stop`` as a list.

    Raises:
        InvalidRequestError: On a bad agent id, ``max_tokens`` or ``stop``.
    """
    if not isinstance(agent_id, str) or not agent_id:
        raise InvalidRequestError(f"agent_id must be a non-empty string, got {agent_id!r}")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise InvalidRequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}")
    if isinstance(stop, str):
        stop = [stop]
    try:
        stop = list(stop or [])
    except TypeError:
        raise InvalidRequestError(f"stop must be a string or a list of strings, got {stop!r}") from None
    if not all(isinstance(s, str) and s for s in stop):
        raise InvalidRequestError("stop must be a string or a list of non-empty strings")
    return stop


def check_callables(sampler: Any, logits_processors: Any, progress: Any) -> None:
    """The sampler, processors and progress callback must be callables (or None)."""
    if logits_processors is not None and not all(callable(p) for p in logits_processors):
        raise InvalidRequestError("logits_processors must be callables")
    if sampler is not None and not callable(sampler):
        raise InvalidRequestError("sampler must be a callable")
    if progress is not None and not callable(progress):
        raise InvalidRequestError("prompt_progress_callback must be a callable")


def check_engine_sizes(completion_batch_size: Any, prefill_batch_size: Any, prefill_step_size: Any) -> None:
    """The engine's batch and chunk sizes must be integers >= 1."""
    sizes = (
        ("completion_batch_size", completion_batch_size),
        ("prefill_batch_size", prefill_batch_size),
        ("prefill_step_size", prefill_step_size),
    )
    for name, value in sizes:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InvalidRequestError(f"{name} must be an integer >= 1, got {value!r}")


def check_max_waiting(max_waiting: Any) -> None:
    """The wait queue's bound: None or an integer >= 0."""
    if max_waiting is not None and (
        isinstance(max_waiting, bool) or not isinstance(max_waiting, int) or max_waiting < 0
    ):
        raise InvalidRequestError(f"max_waiting must be None or an integer >= 0, got {max_waiting!r}")


def check_checkpoint_blocks(blocks: Any) -> None:
    """The recurrent checkpoint interval: ``"auto"``, None or an integer >= 1 (in blocks)."""
    if blocks == "auto" or blocks is None:
        return
    if isinstance(blocks, bool) or not isinstance(blocks, int) or blocks < 1:
        raise InvalidRequestError(f'checkpoint_blocks must be "auto", None or an integer >= 1, got {blocks!r}')


def batch_sizes(batching: Any, completion_batch_size: int, prefill_batch_size: int) -> dict[str, int]:
    """The batch sizes the engine runs with: what the model's once-per-model check
    (:func:`~blockpool.engine.batch_check.batch_support`) found exact, within what was asked for."""
    if not batching.decode:
        return {"completion_batch_size": 1, "prefill_batch_size": 1}
    prefill = prefill_batch_size if batching.padded_prefill else 1
    return {"completion_batch_size": completion_batch_size, "prefill_batch_size": prefill}


class Intake:
    """Makes checked requests for one engine's model, tokenizer and pool."""

    def __init__(self, spec: Any, pool: Any, tokenizer: Any, vocab_size: int | None):
        self.spec, self.pool, self.tokenizer, self.vocab_size = spec, pool, tokenizer, vocab_size

    def tokenize(self, prompt: Any, resume: bool = False) -> list[int]:
        """Token ids for a prompt (see :func:`blockpool.prompt.to_token_ids`); ``resume``: no special tokens."""
        return to_token_ids(self.tokenizer, prompt, vocab_size=self.vocab_size, resume=resume)

    def request(
        self,
        agent_id: str,
        prompt: Any,
        cache: Any,
        keep_tokens: int | None,
        max_tokens: int,
        sampler: Any,
        logits_processors: Sequence[Any] | None,
        stop: str | Sequence[str] | None,
        progress: ProgressCallback | None,
        share_prompt: Any = None,
    ) -> Request:
        """A request from submit's arguments, every one checked (its uid is set when it is queued).

        Raises:
            InvalidRequestError, IncompatibleCacheError: Nothing was changed.
        """
        stops = check_arguments(agent_id, max_tokens, stop)
        check_callables(sampler, logits_processors, progress)
        if share_prompt is not None and not callable(share_prompt):
            raise InvalidRequestError("share_prompt must be a callable")
        tokens = check_source(self.spec, self.pool, agent_id, cache, keep_tokens)
        prompt_ids = self.tokenize(prompt, resume=bool(tokens))
        detokenizer = copy.copy(self.tokenizer.detokenizer)
        detokenizer.reset()
        params = Params(max_tokens, sampler, list(logits_processors or []), stops, progress, share_prompt)
        return Request(
            -1,
            agent_id,
            prompt_ids,
            params,
            History(cache, tokens),
            Output(detokenizer),
            submitted_at=time.perf_counter(),
        )
