"""The one swap the docs-as-tests make: where models come from.

Every ```python block of README.md and docs/*.md runs as written
(tests/docs/test_docs_examples.py), with one exception, made here and
nowhere else: ``mlx_lm.load(...)`` (also reached as ``mlx_lm.utils.load``)
ignores the model it is asked for and loads the tiny random-weight llama
that ``tests/tiny_models.py`` writes, through the real ``mlx_lm.load``. So
``load("mlx-community/Qwen3-4B-4bit")`` in an example runs offline, in
seconds, on the same code path. The fixture records what each example asked
for, so a test can show that the swap happened.
"""

from __future__ import annotations

import mlx_lm
import mlx_lm.utils
import pytest

import tiny_models

#: The architecture every documented ``load(...)`` gets.
DOC_MODEL_ARCH = "llama"


@pytest.fixture(scope="session")
def doc_model_dir(tmp_path_factory):
    """The tiny model directory the examples load (written once per session)."""
    return tiny_models.write_model_dir(tmp_path_factory.mktemp("doc-model"), DOC_MODEL_ARCH)


@pytest.fixture
def tiny_model_for_docs(doc_model_dir, monkeypatch) -> list[str]:
    """Swap ``mlx_lm.load`` for the tiny model; returns the list of models the examples asked for."""
    real_load = mlx_lm.utils.load
    requested: list[str] = []

    def load(path_or_hf_repo, *args, **kwargs):
        requested.append(str(path_or_hf_repo))
        return real_load(str(doc_model_dir), *args, **kwargs)

    monkeypatch.setattr(mlx_lm, "load", load)
    monkeypatch.setattr(mlx_lm.utils, "load", load)
    return requested
