"""What the HTTP handlers share: the runner, the served names, defaults, limits and the HTTP side's tokenizer."""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import anyio

from blockpool.errors import InvalidRequestError
from blockpool.prompt import to_token_ids
from blockpool.server.api_errors import bad_request
from blockpool.server.runner import EngineRunner
from blockpool.server.schemas import Defaults
from blockpool.server.turn_output import OutputFeatures, TurnSplitter


@dataclass
class ServerState:
    """What the handlers share.

    Args:
        runner: The engine thread's owner.
        model_id: The name ``/v1/models`` lists.
        aliases: Other names a request's ``model`` may use for it.
        defaults: Values for fields a request leaves out.
        chat_template_args: Template arguments applied to every chat request
            (a request's ``chat_template_kwargs`` override them).
        max_prompt_tokens: Longest prompt accepted (None: the model's
            context, when its config states one; else no limit).
        api_key: The key every route but ``/health`` needs (None: none).
        body_timeout: Seconds a request may take to send its body.
        rank, world_size: This process's place under ``mlx.launch``.
    """

    runner: EngineRunner
    model_id: str
    aliases: set[str] = field(default_factory=set)
    defaults: Defaults = field(default_factory=Defaults)
    chat_template_args: dict[str, Any] = field(default_factory=dict)
    max_prompt_tokens: int | None = None
    api_key: str | None = None
    body_timeout: float = 30.0
    rank: int = 0
    world_size: int = 1
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        engine = self.runner.memory.engine
        # The HTTP side tokenizes with its own copy: Hugging Face tokenizers are not safe to share across threads.
        self.tokenizer = copy.deepcopy(engine.tokenizer)
        args = getattr(engine.model, "args", None)
        self.vocab_size = getattr(args, "vocab_size", None) or len(self.tokenizer)
        if self.max_prompt_tokens is None:
            self.max_prompt_tokens = context_length(args)
        self.features = OutputFeatures.of(self.tokenizer)
        self._tokenizer_lock = threading.Lock()
        self._token_texts: dict[int, str] = {}
        self.fingerprint = f"blockpool-{self.model_id}"

    @property
    def served_names(self) -> set[str]:
        return {self.model_id, "default_model", *self.aliases}

    async def tokenize(self, prompt: Any, **template: Any) -> list[int]:
        """Token ids for text or chat messages, computed off the event loop.

        Raises:
            ApiError: 400 with the reason (bad messages, a template failure, an
                empty prompt, a prompt longer than ``max_prompt_tokens``).
        """

        def work() -> list[int]:
            with self._tokenizer_lock:
                return to_token_ids(self.tokenizer, prompt, vocab_size=self.vocab_size, **template)

        try:
            tokens = await anyio.to_thread.run_sync(work)
        except InvalidRequestError as error:
            raise bad_request(str(error)) from None
        limit = self.max_prompt_tokens
        if limit is not None and len(tokens) > limit:
            raise bad_request(
                f"the prompt is {len(tokens)} tokens, more than this server accepts ({limit}: "
                "the model's context, or --max-prompt-tokens)",
                code="context_length_exceeded",
            )
        return tokens

    def splitter(self, prompt: list[int], tools: list[dict[str, Any]] | None, parse_tools: bool, prefix: str):
        """A :class:`TurnSplitter` for one request's answer (see :mod:`.turn_output`)."""
        return TurnSplitter(self.tokenizer, prompt, tools, parse_tools=parse_tools, id_prefix=prefix)

    def token_text(self, token: int) -> str:
        """One token's text (for logprobs)."""
        text = self._token_texts.get(token)
        if text is None:
            with self._tokenizer_lock:
                text = self.tokenizer.decode([token])
            self._token_texts[token] = text
        return text

    def decode(self, tokens: list[int]) -> str:
        """The text of generated tokens, end-of-sequence tokens left out."""
        eos = set(self.tokenizer.eos_token_ids)
        with self._tokenizer_lock:
            return self.tokenizer.decode([t for t in tokens if t not in eos])


def context_length(source: Any) -> int | None:
    """The positions a model says it handles (``max_position_embeddings`` and kin), or None.

    ``source`` is a model's ``args`` or its ``config.json`` as a dict (a
    ``text_config`` inside it is looked at too: multimodal configs nest it).
    """

    def get(name: str) -> Any:
        return source.get(name) if isinstance(source, dict) else getattr(source, name, None)

    for name in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length", "context_length"):
        value = get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    nested = get("text_config")
    return context_length(nested) if isinstance(nested, dict) else None
