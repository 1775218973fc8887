"""Fixtures for the server tests: a tiny model on disk, mlx-lm's own output for it, and servers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from server_process import ServerProcess, stop_all  # noqa: E402

import tiny_models  # noqa: E402
from mlx_lm_reference import mlx_lm_text, mlx_lm_tokens  # noqa: E402


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    """The tests' tiny llama as a model directory (what ``--model`` gets)."""
    return tiny_models.write_model_dir(tmp_path_factory.mktemp("server-model"), "llama")


class Reference:
    """What mlx-lm itself generates for the served model: the oracle."""

    def __init__(self, model_dir: Path):
        from mlx_lm import load

        self.model, self.tokenizer = load(str(model_dir))
        self.eos = set(self.tokenizer.eos_token_ids)

    def chat_ids(self, messages: list[dict], **template) -> list[int]:
        """The prompt ids of chat messages, rendered as mlx_lm.server renders them."""
        return list(self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, **template))

    def text_ids(self, text: str) -> list[int]:
        from blockpool.prompt import encode_text

        return encode_text(self.tokenizer, text)

    def generate(self, prompt: list[int], max_tokens: int, **kwargs) -> tuple[str, list[int]]:
        """mlx-lm's greedy (or given sampler's) tokens for a prompt, and their text without the EOS."""
        tokens = mlx_lm_tokens(self.model, self.tokenizer, prompt, max_tokens, **kwargs)
        visible = tokens[:-1] if tokens and tokens[-1] in self.eos else tokens
        return mlx_lm_text(self.tokenizer, visible), tokens

    def chat(self, messages: list[dict], max_tokens: int, **kwargs) -> tuple[str, list[int]]:
        return self.generate(self.chat_ids(messages), max_tokens, **kwargs)


@pytest.fixture(scope="session")
def reference(model_dir) -> Reference:
    return Reference(model_dir)


@pytest.fixture(scope="module")
def start_server(model_dir, tmp_path_factory):
    """``start_server(*flags, cache_dir=None, launch=None)``: a running ``blockpool serve``; all stop at the end."""
    started: list[ServerProcess] = []

    def start(*flags: str, cache_dir: Path | None = None, launch: list[str] | None = None) -> ServerProcess:
        base = tmp_path_factory.mktemp("serve")
        server = ServerProcess.blockpool(
            model_dir, cache_dir or base / "cache", base / "server.log", *flags, launch=launch
        )
        started.append(server)
        return server.start()

    yield start
    stop_all(started)


@pytest.fixture(scope="session")
def tool_model_dir(tmp_path_factory) -> Path:
    """A tiny llama trained to call tools and to think (``tests/tool_model.py``), with a json_tools parser."""
    import tool_model

    return tool_model.write_tool_model_dir(tmp_path_factory.mktemp("tool-model"))
