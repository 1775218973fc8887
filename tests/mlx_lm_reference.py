"""What mlx-lm itself generates: the oracle for output equivalence (EXP-005)."""

from __future__ import annotations

from mlx_lm.generate import stream_generate
from mlx_lm.models.cache import make_prompt_cache


def mlx_lm_tokens(model, tokenizer, prompt: list[int], max_tokens: int, **kwargs) -> list[int]:
    """Single-sequence generation with a fresh prompt cache, as ``mlx_lm.stream_generate`` does it.

    Stops at EOS (which it includes) or after ``max_tokens`` tokens.
    """
    cache = make_prompt_cache(model)
    return [
        r.token for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens, prompt_cache=cache, **kwargs)
    ]


def mlx_lm_text(tokenizer, tokens: list[int]) -> str:
    """The text mlx-lm's streaming detokenizer makes of ``tokens``."""
    detokenizer = tokenizer.detokenizer
    detokenizer.reset()
    for token in tokens:
        detokenizer.add_token(token)
    detokenizer.finalize()
    return detokenizer.text
