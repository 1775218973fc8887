"""EXP-005 in depth for one family of each cache kind: recurrent state, composite layers, chunked attention.

For each family: single agents at block edges, a batch of different
lengths, three turns resumed from the pool and from disk, shared prefixes
that diverge inside a block and at a block boundary, a prompt that diverges
from the agent's own history, and preemption under a tight budget. Every
output equals mlx-lm's, greedy, on a fresh cache; and reuse really happens:
the tokens recomputed are at most the distance back to the last checkpoint.
"""

from __future__ import annotations

import pytest
from mlx_lm.sample_utils import make_logits_processors

from blockpool import AgentMemory, BlockPool, BlockPoolBatchEngine, ModelCacheSpec
from family_models import family_model, shared_tokenizer, tokens
from mlx_lm_reference import mlx_lm_tokens

pytestmark = pytest.mark.integration

B = 256
FAMILIES = [
    "qwen3_5",  # gated delta net (ArraysCache, 2 slots) + full attention
    "mamba2",  # recurrent state only
    "lfm2",  # short convolutions (ArraysCache, 1 slot) + attention
    "kimi_linear",  # ArraysCache of 4 slots
    "nemotron_h",  # Mamba-2 + attention; mlx-lm's padded prefill is off: prompts prefilled one at a time
    "falcon_h1",  # CacheList(ArraysCache, KVCache) per layer
    "deepseek_v32",  # CacheList(KVCache, KVCache): MLA latent + indexer keys
    "longcat_flash_ngram",  # an n-gram slot of token ids that grows, + CacheList
    "recurrent_gemma",  # recurrence + sliding window
    "llama4",  # chunked attention + full attention (one sequence at a time)
]


def engine_for(family, budget=64 << 20, **options):
    model, tokenizer = family_model(family), shared_tokenizer()
    pool = BlockPool(ModelCacheSpec.from_model(model), memory_bytes=budget)
    return model, tokenizer, pool, BlockPoolBatchEngine(model, tokenizer, pool, checkpoint_blocks=1, **options)


def forgets_old_tokens(spec, *kinds: str) -> bool:
    """Whether some layer keeps only recent tokens (of these kinds): it cannot serve an older prefix."""
    return any(layer.attention in kinds for layer in spec.layers)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_agents_at_block_edges_and_a_batch(family):
    model, tokenizer, pool, engine = engine_for(family)
    for n in (1, 255, 256, 257, 700):
        prompt = tokens(n, n)
        engine.submit(f"a{n}", prompt, max_tokens=4)
        (done,) = list(engine.step())
        assert done.error is None and done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 4), n
        pool.release(done.blocks)
    prompts = [tokens(n, 10 + n) for n in (3, 120, 300)]
    uids = [engine.submit(f"b{i}", p, max_tokens=6) for i, p in enumerate(prompts)]
    done = {c.uid: c for c in engine.step()}
    for uid, prompt in zip(uids, prompts):
        assert done[uid].token_ids == mlx_lm_tokens(model, tokenizer, prompt, 6)
        pool.release(done[uid].blocks)
    pool.check_invariants()
    assert pool.stats().used_bytes == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_three_turns_from_the_pool_then_from_disk(family, tmp_path):
    model, tokenizer, pool, engine = engine_for(family)
    memory = AgentMemory(engine, cache_dir=tmp_path)
    history, sources = tokens(300, 1), []
    for turn in range(3):
        if turn == 2:
            assert memory.spill("a")  # its last turn comes back from disk
        done = _turn(memory, "a", history, 5)
        assert done.token_ids == mlx_lm_tokens(model, tokenizer, history, 5), turn
        if turn:
            assert done.prompt_tokens == 12  # only the new tokens are computed: the rest resumed exactly
        sources.append(done.cache_source)
        history = history + done.token_ids + tokens(12, 20 + turn)
    assert sources == ["cold", "pool", "disk"]
    memory.close()
    assert pool.stats().used_bytes == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_prefixes_that_diverge_resume_from_the_last_checkpoint(family):
    model, tokenizer, pool, engine = engine_for(family)
    memory = AgentMemory(engine)
    donor = tokens(600, 2)
    first = _turn(memory, "donor", donor, 4)
    assert first.token_ids == mlx_lm_tokens(model, tokenizer, donor, 4)
    # A sliding window ending at a block boundary needs tokens the donor no longer holds; a chunk
    # starting there needs none. Inside a block, layers that keep their tokens share up to the
    # divergence (the donor's last block, copied on write); a recurrent state or a chunk the donor
    # left exists only at block ends.
    window = forgets_old_tokens(pool.spec, "sliding")
    inside = B if pool.spec.state_layers or forgets_old_tokens(pool.spec, "chunked") else 300
    cases = [
        ("inside-a-block", donor[:300] + tokens(50, 3), 0 if window else inside),
        ("at-a-boundary", donor[:512] + tokens(50, 4), 0 if window else 2 * B),
    ]
    for agent, prompt, shared in cases:
        done = _turn(memory, agent, prompt, 4)
        assert done.token_ids == mlx_lm_tokens(model, tokenizer, prompt, 4), agent
        assert done.cached_tokens == shared and done.prompt_tokens == len(prompt) - shared, agent
        assert done.cache_source == ("shared" if shared else "cold")
    # The donor returns with a prompt that leaves its own history at 300: it resumes from its checkpoint at 256
    # (layers that keep every token resume at 300; a chunked one at its chunk's start, 288; a sliding one that
    # lost the window cannot resume at all).
    diverged = donor[:300] + tokens(40, 5)
    if window:
        expected = 0
    elif pool.spec.state_layers:
        expected = B
    else:
        expected = 288 if forgets_old_tokens(pool.spec, "chunked") else 300
    done = _turn(memory, "donor", diverged, 4)
    assert done.token_ids == mlx_lm_tokens(model, tokenizer, diverged, 4)
    assert done.cached_tokens == expected and done.prompt_tokens == len(diverged) - expected
    memory.close()
    assert pool.stats().used_bytes == 0


@pytest.mark.parametrize("family", FAMILIES)
def test_preemption_under_a_tight_budget_stays_exact(family):
    model, tokenizer = family_model(family), shared_tokenizer()
    spec = ModelCacheSpec.from_model(model)
    sizing = BlockPoolBatchEngine(model, tokenizer, BlockPool(spec, num_blocks=256), checkpoint_blocks=1)
    # Room for either alone to its end, for both while short, not for both past a block: one is preempted.
    budget = sizing.request_bytes(0, 24, 400)
    _, _, pool, engine = engine_for(family, budget)
    no_eos = make_logits_processors(logit_bias={tokenizer.eos_token_id: -1e9})
    prompts = [tokens(20, 30), tokens(24, 31)]
    uids = [engine.submit(f"p{i}", p, max_tokens=400, logits_processors=no_eos) for i, p in enumerate(prompts)]
    done = {}
    for completion in engine.step():
        done[completion.uid] = completion
        pool.release(completion.blocks)  # the caller frees each finished agent: the preempted one needs the room
    for uid, prompt in zip(uids, prompts):
        assert done[uid].token_ids == mlx_lm_tokens(model, tokenizer, prompt, 400, logits_processors=no_eos)
    grows = any(layer.attention == "full" for layer in spec.layers)  # recurrent state and windows do not grow
    if engine.batching.decode and grows:
        assert sum(done[u].preemptions for u in uids) > 0  # the budget really was too small for both at once
    pool.check_invariants()
    assert pool.stats().used_bytes == 0


def _turn(memory, agent, prompt, max_tokens):
    memory.submit(agent, prompt, max_tokens=max_tokens)
    (done,) = list(memory.step())
    assert done.error is None, done.error
    return done
