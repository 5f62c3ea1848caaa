"""The inference engine serves MoE models unchanged: KV-cached greedy generation ≡ uncached (tokens
identical, fp32 logits close at every step: helpers.LOGITS_ATOL/RTOL), alone and in a left-padded batch
of different lengths. Routing is per token and dropless, so neither the cache nor the padding rows in a
batch can change which experts a token meets (a capacity limit would: it drops by batch position)."""

from __future__ import annotations

import pytest

from tests.helpers import assert_logits_close, engine_greedy, prompts_of, tiny_model, uncached_greedy

MOE = dict(arch="moe", bias=False, n_head=4, dropless=True, std=0.3)
VARIANTS = {
    "top2-of-4-gqa": dict(n_experts=4, n_active_experts=2, expert_hidden=24, n_kv_head=2),
    "top1-of-8-shared-first-dense-qknorm-window": dict(
        n_layer=3, n_experts=8, n_active_experts=1, n_shared_experts=1, expert_hidden=16, moe_first_dense=1,
        router_norm_topk=False, qk_norm=True, n_kv_head=1, sliding_window=6),
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_moe_cached_equals_uncached_alone_and_batched(variant):
    model = tiny_model(block_size=32, **MOE, **VARIANTS[variant])
    assert model.moe_layers()
    prompts = prompts_of((1, 7, 13, 4))
    n = 16  # longest prompt + n = 29 <= block_size: within the context, no slide
    batched, batched_logits = engine_greedy(model, prompts, n)
    for r, prompt in enumerate(prompts):
        ref_tokens, ref_logits = uncached_greedy(model, prompt, n)
        alone, alone_logits = engine_greedy(model, [prompt], n)
        assert alone[0] == ref_tokens and batched[r] == ref_tokens
        assert_logits_close(alone_logits[0], ref_logits)
        assert_logits_close(batched_logits[r], ref_logits)
