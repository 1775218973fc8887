"""Request bodies of the three generation endpoints, as pydantic models.

Which fields exist, their types and ranges follow OpenAI's API and
``mlx_lm.server`` (which adds ``top_k``, ``min_p``, the penalties with their
context sizes, XTC and ``chat_template_kwargs``). Types are strict: ``"10"``
is not a number and ``1`` is not a boolean. Numbers must be finite (JSON's
``NaN`` and ``Infinity``, which Python's reader accepts, are refused), and
every integer has an upper bound, so no value reaches the sampler or the
engine that they cannot handle. Unknown fields are ignored, as
OpenAI-compatible servers do, so that clients that send more still work.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from blockpool.server.api_errors import ApiError, bad_request
from blockpool.server.sampling import GenerationParams

_STRICT = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)

TOKENS_LIMIT = 2**31 - 1  # the engine's token counts are 32-bit
WINDOW_LIMIT = 2**20  # penalty windows: far past any context, and inside a 32-bit slice
_TOKEN_ID = re.compile(r"-?[0-9]+")  # str.isdigit also accepts "²", which int() refuses


class StreamOptions(BaseModel):
    """OpenAI's ``stream_options``."""

    model_config = _STRICT
    include_usage: bool = False


class SamplingFields(BaseModel):
    """The fields both OpenAI endpoints share."""

    model_config = _STRICT
    model: str | None = None
    max_tokens: int | None = Field(None, ge=1, le=TOKENS_LIMIT)
    max_completion_tokens: int | None = Field(None, ge=1, le=TOKENS_LIMIT)
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=TOKENS_LIMIT)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    n: int | None = Field(None, ge=0, le=128)
    logit_bias: dict[str, float] | None = None
    repetition_penalty: float | None = Field(None, ge=0)
    repetition_context_size: int | None = Field(None, ge=0, le=WINDOW_LIMIT)
    presence_penalty: float | None = None
    presence_context_size: int | None = Field(None, ge=0, le=WINDOW_LIMIT)
    frequency_penalty: float | None = None
    frequency_context_size: int | None = Field(None, ge=0, le=WINDOW_LIMIT)
    xtc_probability: float | None = Field(None, ge=0, le=1)
    xtc_threshold: float | None = Field(None, ge=0, le=1)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[dict[str, Any]] = Field(min_length=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: one prompt, as text or token ids."""

    prompt: str | list[int] | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool | None = False
    suffix: str | None = None


class AnthropicMessage(BaseModel):
    """One turn of Anthropic's Messages API."""

    model_config = _STRICT
    role: Literal["user", "assistant"]
    content: str | list[dict[str, Any]]


class MessagesRequest(BaseModel):
    """``POST /v1/messages``: Anthropic's Messages API."""

    model_config = _STRICT
    model: str
    max_tokens: int = Field(ge=1, le=TOKENS_LIMIT)
    messages: list[AnthropicMessage] = Field(min_length=1)
    system: str | list[dict[str, Any]] | None = None
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(None, ge=0)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=TOKENS_LIMIT)
    stream: bool | None = False
    metadata: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: dict[str, Any] | None = None
    thinking: dict[str, Any] | None = None


@dataclass(frozen=True)
class Defaults:
    """What a request gets for a field it leaves out (the ``serve`` flags)."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0


def stop_list(stop: str | list[str] | None, param: str = "stop") -> list[str]:
    """``stop`` as a list of non-empty strings.

    Raises:
        ApiError: An empty stop string.
    """
    stops = [stop] if isinstance(stop, str) else list(stop or [])
    if any(not s for s in stops):
        raise bad_request(f"{param} strings must not be empty", param)
    return stops


def openai_params(
    request: SamplingFields, defaults: Defaults, vocab_size: int, *, logprobs: bool, top_logprobs: int
) -> GenerationParams:
    """The generation parameters of an OpenAI request, defaults filled in.

    Raises:
        ApiError: ``n`` other than 1, a ``logit_bias`` key that is not a
            token id of this model, or an empty stop string.
    """
    if request.n not in (None, 1):
        raise bad_request("only n=1 is supported", "n")
    bias = None
    if request.logit_bias:
        bias = {}
        for key, value in request.logit_bias.items():
            if not _TOKEN_ID.fullmatch(key) or not 0 <= int(key) < vocab_size:
                raise bad_request(f"logit_bias keys must be token ids in [0, {vocab_size}), got {key!r}", "logit_bias")
            bias[int(key)] = float(value)
    max_tokens = request.max_completion_tokens or request.max_tokens or defaults.max_tokens
    return GenerationParams(
        max_tokens=max_tokens,
        temperature=_given(request.temperature, defaults.temperature),
        top_p=_given(request.top_p, defaults.top_p),
        top_k=_top_k(_given(request.top_k, defaults.top_k), vocab_size),
        min_p=_given(request.min_p, defaults.min_p),
        xtc_probability=_given(request.xtc_probability, 0.0),
        xtc_threshold=_given(request.xtc_threshold, 0.1),
        seed=request.seed,
        logit_bias=bias,
        repetition_penalty=_given(request.repetition_penalty, 0.0),
        repetition_context_size=_given(request.repetition_context_size, 20),
        presence_penalty=_given(request.presence_penalty, 0.0),
        presence_context_size=_given(request.presence_context_size, 20),
        frequency_penalty=_given(request.frequency_penalty, 0.0),
        frequency_context_size=_given(request.frequency_context_size, 20),
        stop=stop_list(request.stop),
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


def anthropic_params(request: MessagesRequest, defaults: Defaults, vocab_size: int) -> GenerationParams:
    """The generation parameters of a Messages request, defaults filled in."""
    return GenerationParams(
        max_tokens=request.max_tokens,
        temperature=_given(request.temperature, defaults.temperature),
        top_p=_given(request.top_p, defaults.top_p),
        top_k=_top_k(_given(request.top_k, defaults.top_k), vocab_size),
        min_p=defaults.min_p,
        stop=stop_list(request.stop_sequences, "stop_sequences"),
    )


def agent_from_metadata(metadata: dict[str, Any] | None) -> str | None:
    """Anthropic's ``metadata.user_id``, the Messages API's counterpart of OpenAI's ``user``.

    Raises:
        ApiError: ``user_id`` is present but not a string.
    """
    if not metadata or metadata.get("user_id") is None:
        return None
    user_id = metadata["user_id"]
    if not isinstance(user_id, str):
        raise bad_request("metadata.user_id must be a string", "metadata.user_id")
    return user_id


def openai_tool_choice(choice: str | dict[str, Any] | None) -> bool:
    """Whether an OpenAI request's tools are offered to the model and its calls parsed.

    ``"auto"`` (or no choice) offers them; ``"none"`` renders no tools.

    Raises:
        ApiError: ``"required"`` or a named function: this server cannot force a call.
    """
    if choice in (None, "auto"):
        return True
    if choice == "none":
        return False
    raise bad_request(
        f"tool_choice {choice!r} is not supported: this server cannot force a tool call (use 'auto' or 'none')",
        "tool_choice",
    )


def anthropic_tool_choice(choice: dict[str, Any] | None) -> bool:
    """Whether a Messages request's tools are offered (``{"type": "auto"}``, the default) or not (``"none"``).

    Raises:
        ApiError: ``any`` or ``tool`` (a forced call), or another type.
    """
    kind = None if choice is None else choice.get("type")
    if choice is None or kind == "auto":
        return True
    if kind == "none":
        return False
    raise bad_request(
        f"tool_choice type {kind!r} is not supported: this server cannot force a tool call (use 'auto' or 'none')",
        "tool_choice",
    )


def _given(value: Any, default: Any) -> Any:
    return default if value is None else value


def _top_k(top_k: int, vocab_size: int) -> int:
    # mlx-lm's top-k filter refuses k >= vocab size; keeping every token is no filter.
    return 0 if top_k >= vocab_size else top_k


def check_model(requested: str | None, served: set[str]) -> None:
    """Accept a request's ``model`` if it names the served model (or is left out).

    Raises:
        ApiError: 404 ``model_not_found`` for any other name.
    """
    if requested in (None, "") or requested in served:
        return
    names = ", ".join(sorted(served))
    raise ApiError(
        404, f"model {requested!r} is not served here (serving: {names})", param="model", code="model_not_found"
    )
