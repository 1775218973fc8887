"""Prompts to token ids: the one place that reads what users pass as a prompt.

A prompt is one of:

- **text** (``str``): encoded with the tokenizer. Special tokens (BOS) are
  added as mlx-lm's ``stream_generate`` adds them: unless the text already
  starts with the tokenizer's BOS token. Text appended to a cached history
  (``resume=True``) gets none: it continues a sequence that already began.
- **token ids**: a list, tuple or other sequence of ints, or a 1-D integer
  ``mx.array`` / numpy array. Each id must be in ``[0, vocab_size)``.
- **chat messages**: a sequence of ``{"role": str, "content": ...}`` dicts,
  rendered with the tokenizer's chat template and a generation prompt, as
  ``mlx_lm.server`` renders them. ``content`` is a string, ``None`` (an
  assistant message that only calls tools) or a list of OpenAI-style parts
  ``{"type": "text", "text": ...}``, joined as mlx-lm joins them. Other keys
  (``tool_calls``, ``name``, ...) go to the template unchanged; ``tools=``
  and ``chat_template_kwargs=`` go to the template as keyword arguments.

Anything else, and every malformed case (bytes, text with lone surrogates,
empty prompts, bools, floats, negative or too-large ids, non-text content
parts, a template that fails), raises ``InvalidRequestError`` saying what
was wrong. Nothing here touches the model or the pool.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import mlx.core as mx
import numpy as np

from blockpool.errors import InvalidRequestError

#: What ``to_token_ids`` accepts: text, token ids, or chat messages.
Prompt = str | Sequence[int] | mx.array | np.ndarray | Sequence[Mapping[str, Any]]

# Template arguments that to_token_ids sets itself (tools has its own parameter).
_RESERVED_TEMPLATE_ARGS = ("conversation", "messages", "tokenize", "return_dict", "return_tensors", "tools")


def to_token_ids(
    tokenizer: Any,
    prompt: Prompt,
    *,
    vocab_size: int | None = None,
    resume: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Token ids for a prompt: text, token ids, or chat messages.

    Args:
        tokenizer: The tokenizer ``mlx_lm.load`` returned (or a Hugging Face
            tokenizer).
        prompt: Text, token ids, or chat messages (see the module docstring).
        vocab_size: Ids must be below this (the model's embedding rows).
            ``None``: the tokenizer's size, ``len(tokenizer)``.
        resume: The prompt continues a cached history: text gets no special
            tokens. Chat messages are refused (a template renders a whole
            conversation, which cannot be appended to a history).
        tools: Tool definitions for the chat template (chat messages only).
        chat_template_kwargs: More keyword arguments for the chat template
            (chat messages only), e.g. ``{"enable_thinking": False}`` or
            ``{"add_generation_prompt": False}``.

    Returns:
        A non-empty list of Python ints.

    Raises:
        InvalidRequestError: The prompt is empty or malformed; the message says how.
    """
    if isinstance(prompt, str):
        _refuse_template_args(tools, chat_template_kwargs, "text")
        return _check_ids(encode_text(tokenizer, prompt, resume=resume), _vocab(tokenizer, vocab_size))
    if is_chat(prompt):
        if resume:
            raise InvalidRequestError(
                "chat messages render a whole conversation and cannot be appended to a cached history; "
                "send the whole conversation to AgentMemory.submit, or text or token ids here"
            )
        ids = render_chat(tokenizer, prompt, tools=tools, chat_template_kwargs=chat_template_kwargs)
        return _check_ids(ids, _vocab(tokenizer, vocab_size))
    _refuse_template_args(tools, chat_template_kwargs, "token ids")
    return _check_ids(as_id_list(prompt), _vocab(tokenizer, vocab_size))


def encode_text(tokenizer: Any, text: str, *, resume: bool = False) -> list[int]:
    """Encode text with mlx-lm's rule for special tokens (none when ``resume``).

    Raises:
        InvalidRequestError: Empty text, or text that is not valid Unicode
            (a lone surrogate such as ``"\\ud800"``).
    """
    if not isinstance(text, str):
        raise InvalidRequestError(f"text must be a str, got {type(text).__name__}")
    if not text:
        raise InvalidRequestError("Prompt cannot be empty")  # the seed's wording
    _check_unicode(text, "the prompt")
    bos = getattr(tokenizer, "bos_token", None)
    special = not resume and (bos is None or not text.startswith(bos))
    ids = as_id_list(tokenizer.encode(text, add_special_tokens=special))
    if not ids:
        raise InvalidRequestError("the prompt encodes to no tokens")
    return ids


def is_chat(prompt: Any) -> bool:
    """Whether ``prompt`` is chat messages: a non-empty sequence whose first item is a mapping."""
    return (
        isinstance(prompt, Sequence)
        and not isinstance(prompt, (str, bytes, bytearray))
        and len(prompt) > 0
        and isinstance(prompt[0], Mapping)
    )


def chat_messages(messages: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Checked copies of chat messages, each ``content`` made a string for the template.

    A list of parts becomes the concatenation of its text parts (as
    ``mlx_lm.server`` does); ``None`` becomes ``""``. The caller's messages
    are not changed.

    Raises:
        InvalidRequestError: A message that is not a mapping, a role that is
            not a non-empty string, content of another type, a part that is
            not ``{"type": "text", "text": str}``, or invalid Unicode.
    """
    if not messages:
        raise InvalidRequestError("Prompt cannot be empty (no chat messages)")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidRequestError(f"chat message {i} must be a dict, got {type(message).__name__}")
        role = message.get("role")
        if not isinstance(role, str) or not role:
            raise InvalidRequestError(f"chat message {i} needs a non-empty string 'role', got {role!r}")
        content = message.get("content")
        if content is None:
            text = ""
        elif isinstance(content, str):
            text = content
        elif isinstance(content, Sequence) and not isinstance(content, (bytes, bytearray)):
            text = "".join(_text_part(part, i, j) for j, part in enumerate(content))
        else:
            raise InvalidRequestError(
                f"chat message {i}: 'content' must be a string or a list of text parts, got {type(content).__name__}"
            )
        _check_unicode(text, f"chat message {i}")
        out.append({**message, "content": text})
    return out


def render_chat(
    tokenizer: Any,
    messages: Sequence[Mapping[str, Any]],
    *,
    tools: Sequence[Mapping[str, Any]] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
) -> list[int]:
    """Render chat messages with the tokenizer's chat template, generation prompt added.

    Raises:
        InvalidRequestError: Malformed messages, bad ``tools`` or template
            arguments, no chat template, or a template that fails (with its
            reason).
    """
    checked = chat_messages(messages)
    kwargs: dict[str, Any] = {"add_generation_prompt": True}
    if chat_template_kwargs is not None:
        if not isinstance(chat_template_kwargs, Mapping) or not all(isinstance(k, str) for k in chat_template_kwargs):
            raise InvalidRequestError("chat_template_kwargs must be a dict with string keys")
        reserved = sorted(k for k in chat_template_kwargs if k in _RESERVED_TEMPLATE_ARGS)
        if reserved:
            raise InvalidRequestError(f"chat_template_kwargs may not set {reserved} (use tools= for tools)")
        kwargs.update(chat_template_kwargs)
    if tools is not None:
        if (
            isinstance(tools, (str, bytes, Mapping))
            or not isinstance(tools, Sequence)
            or not all(isinstance(t, Mapping) for t in tools)
        ):
            raise InvalidRequestError("tools must be a list of tool definitions (dicts)")
        kwargs["tools"] = [dict(t) for t in tools]
    if getattr(tokenizer, "has_chat_template", True) is False:
        raise InvalidRequestError("the tokenizer has no chat template: send text or token ids")
    try:
        rendered = tokenizer.apply_chat_template(checked, tokenize=True, **kwargs)
    except Exception as e:  # templates fail in many ways (jinja errors, raise_exception, bad kwargs)
        reason = str(e).strip() or type(e).__name__
        raise InvalidRequestError(f"the chat template failed to render the messages: {reason}") from e
    if isinstance(rendered, Mapping) and "input_ids" in rendered:  # a BatchEncoding
        rendered = rendered["input_ids"]
    if isinstance(rendered, str):  # a custom renderer that ignores tokenize=True
        rendered = tokenizer.encode(rendered, add_special_tokens=False)
    if isinstance(rendered, Sequence) and len(rendered) == 1 and isinstance(rendered[0], Sequence):
        rendered = rendered[0]  # some tokenizers return a batch of one
    return as_id_list(rendered)


def as_id_list(ids: Any) -> list[int]:
    """Token ids as a list of Python ints; the type and shape are checked, not the range.

    Accepts a sequence of ints (numpy integer scalars included), or a 1-D
    integer ``mx.array`` or numpy array.

    Raises:
        InvalidRequestError: bytes, a non-integer dtype, more than one
            dimension, bools, floats, or anything that is not a token id.
    """
    if isinstance(ids, (bytes, bytearray, memoryview)):
        raise InvalidRequestError(
            f"a {type(ids).__name__} prompt is ambiguous: decode it to text, or pass token ids as a list of ints"
        )
    if isinstance(ids, mx.array):
        if not mx.issubdtype(ids.dtype, mx.integer):
            raise InvalidRequestError(f"token ids must be integers, got an mx.array of {ids.dtype}")
        if ids.ndim != 1:
            raise InvalidRequestError(f"token ids must be 1-D, got an mx.array of shape {tuple(ids.shape)}")
        return ids.tolist()
    if isinstance(ids, np.ndarray):
        if ids.dtype == np.bool_ or not np.issubdtype(ids.dtype, np.integer):
            raise InvalidRequestError(f"token ids must be integers, got a numpy array of {ids.dtype}")
        if ids.ndim != 1:
            raise InvalidRequestError(f"token ids must be 1-D, got a numpy array of shape {ids.shape}")
        return [int(t) for t in ids]
    if isinstance(ids, str) or not isinstance(ids, Sequence):
        raise InvalidRequestError(f"a prompt must be text, token ids or chat messages, got {type(ids).__name__}")
    if set(map(type, ids)) <= {int}:  # the common case, checked at C speed (bool is its own type)
        return list(ids)
    out = []
    for t in ids:
        if isinstance(t, (bool, np.bool_)) or not isinstance(t, (int, np.integer)):
            raise InvalidRequestError(f"token ids must be ints, got {t!r} ({type(t).__name__})")
        out.append(int(t))
    return out


def vocab_size_of(model: Any) -> int | None:
    """The number of token ids a model embeds (``model.args.vocab_size``), or None if it does not say."""
    size = getattr(getattr(model, "args", None), "vocab_size", None)
    return size if isinstance(size, int) and not isinstance(size, bool) and size > 0 else None


def _check_ids(ids: list[int], vocab_size: int | None) -> list[int]:
    if not ids:
        raise InvalidRequestError("Prompt cannot be empty")  # the seed's wording
    if min(ids) >= 0 and (vocab_size is None or max(ids) < vocab_size):
        return ids
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        bound = f"[0, {vocab_size})" if vocab_size is not None else "[0, vocab size)"
        raise InvalidRequestError(f"token ids must be in {bound}, got {bad[:5]}")
    return ids


def _vocab(tokenizer: Any, vocab_size: int | None) -> int | None:
    if vocab_size is not None:
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise InvalidRequestError(f"vocab_size must be a positive int, got {vocab_size!r}")
        return vocab_size
    try:
        return len(tokenizer)
    except TypeError:  # a tokenizer without a length: the range is not checked above 0
        return None


def _text_part(part: Any, message: int, index: int) -> str:
    if not isinstance(part, Mapping):
        raise InvalidRequestError(f"chat message {message}, part {index}: expected a dict, got {type(part).__name__}")
    kind = part.get("type")
    if kind != "text":
        raise InvalidRequestError(
            f"chat message {message}, part {index}: only text parts are supported, got type {kind!r}"
        )
    text = part.get("text")
    if not isinstance(text, str):
        raise InvalidRequestError(
            f"chat message {message}, part {index}: 'text' must be a string, got {type(text).__name__}"
        )
    return text


def _check_unicode(text: str, what: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidRequestError(
            f"{what} is not valid Unicode: {text[e.start : e.end]!r} at position {e.start} (a lone surrogate?)"
        ) from None


def _refuse_template_args(tools: Any, chat_template_kwargs: Any, kind: str) -> None:
    if tools is not None or chat_template_kwargs is not None:
        raise InvalidRequestError(f"tools and chat_template_kwargs apply to chat messages only, not to {kind}")


__all__ = [
    "Prompt",
    "as_id_list",
    "chat_messages",
    "encode_text",
    "is_chat",
    "render_chat",
    "to_token_ids",
    "vocab_size_of",
]
