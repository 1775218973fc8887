"""Synthetic agent files for persistence tests: every value encodes a marker."""

from __future__ import annotations

import mlx.core as mx

from blockpool import Geometry, LayerSpec, ModelCacheSpec
from blockpool.persistence import AgentFile

SPEC = ModelCacheSpec((LayerSpec(Geometry(2, 8, 4, "bfloat16")), LayerSpec(Geometry(2, 8, 4, "bfloat16"), window=40)))


def synthetic_file(total: int = 300, marker: int = 0) -> AgentFile:
    """An agent file whose every value encodes ``marker``, to spot mixed-up data."""
    tokens = [(marker * 7 + i) % 500 for i in range(total)]
    first = [0, max(0, total - 40)]
    planes = [
        {
            "k": mx.full((1, 2, total - f, 8), float(marker), dtype=mx.bfloat16),
            "v": mx.full((1, 2, total - f, 4), float(-marker), dtype=mx.bfloat16),
        }
        for f in first
    ]
    return AgentFile(f"agent-{marker}", "fp", SPEC, tokens, first, planes, {})


def synthetic_file_matches(file: AgentFile, marker: int) -> AgentFile:
    """Return ``file`` if every value in it is what ``synthetic_file`` makes for ``marker``."""
    expected = synthetic_file(len(file.token_ids), marker)
    assert file.agent_id == expected.agent_id
    assert file.token_ids == expected.token_ids and file.first_token == expected.first_token
    for got, want in zip(file.planes, expected.planes):
        assert got.keys() == want.keys()
        for name in got:
            assert got[name].shape == want[name].shape and mx.array_equal(got[name], want[name]).item()
    return file
