"""EXP-005 on every model family of the installed mlx-lm that runs here: served exactly, or refused with a reason.

Each family's tiny model (``tests/family_configs.py``) generates through the
engine from a cold prompt of 300 tokens (two blocks, one partial), resumes
from its blocks with a follow-up turn, and decodes two prompts of different
lengths in one batch; every output equals mlx-lm's own, greedy, on a fresh
cache (paged where the engine's check allows, as ``docs/models.md``'s
attention column says, else gathered). ``docs/models.md`` lists the
families and how each layer is stored.
Deeper scenarios for one family of each cache kind are in ``test_hybrid.py``.
"""

from __future__ import annotations

import pytest

from blockpool import BlockPool, BlockPoolBatchEngine, ModelCacheSpec, UnsupportedModelError
from family_configs import FAMILY_CONFIGS
from family_models import family_model, shared_tokenizer, tokens
from mlx_lm_reference import mlx_lm_tokens
from model_table import model_table

pytestmark = pytest.mark.integration

#: Families whose caches blockpool refuses, and why (the error names the cache class).
REFUSED = {"deepseek_v41": "LayerCache"}


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_family_is_served_exactly(family):
    model, tokenizer = family_model(family), shared_tokenizer()
    if family in REFUSED:
        with pytest.raises(UnsupportedModelError, match=REFUSED[family]):
            ModelCacheSpec.from_model(model)
        return
    spec = ModelCacheSpec.from_model(model)
    pool = BlockPool(spec, memory_bytes=64 << 20)
    engine = BlockPoolBatchEngine(model, tokenizer, pool)
    found = "paged" if engine.paged.paged else f"gathered: {engine.paged.detail}"
    documented = model_table()[family]["attention"]
    assert documented.split(" (")[0] == found.split(" (")[0], (documented, found)  # the figures in () may vary
    prompt = tokens(300, 1)
    engine.submit("a", prompt, max_tokens=5)
    (first,) = list(engine.step())
    assert first.error is None and first.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 5)
    follow = prompt + first.token_ids + tokens(20, 2)
    engine.submit("a", follow[first.blocks.total_tokens :], cache=first.blocks, max_tokens=5)
    (second,) = list(engine.step())
    assert second.cached_tokens == len(prompt) + len(first.token_ids)  # resumed from its blocks
    assert second.error is None and second.token_ids == mlx_lm_tokens(model, tokenizer, follow, 5)
    pool.release(second.blocks)
    prompts = [tokens(7, 3), tokens(40, 4)]
    uids = [engine.submit(f"b{i}", p, max_tokens=5) for i, p in enumerate(prompts)]
    done = {c.uid: c for c in engine.step()}
    for uid, p in zip(uids, prompts):
        assert done[uid].error is None and done[uid].token_ids == mlx_lm_tokens(model, tokenizer, p, 5)
        pool.release(done[uid].blocks)
    pool.check_invariants()
    assert pool.stats().used_bytes == 0
