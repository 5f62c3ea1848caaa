"""Multi-head latent attention (model/mla.py): the naive and absorbed paths compute the same attention
(float64: to rounding; fp32: 1e-5), the latent cache decodes what a full forward computes (greedy tokens
identical, alone and in a left-padded batch), its bytes per token follow the formula, and the MTP loss is
the next-token loss plus the weighted mean of the depths' cross-entropies."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import get_preset
from scratchlm.infer.engine import Engine
from scratchlm.infer.kv_cache import KVCache, LatentCache
from scratchlm.losses import multi_token_loss
from scratchlm.model import build_model
from tests.helpers import engine_greedy, prompts_of, tiny_model, uncached_greedy

MLA = dict(arch="mla", bias=False, n_head=4, n_embd=32, n_experts=4, n_active_experts=2, expert_hidden=16,
           kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, moe_first_dense=1)
VARIANTS = {
    "plain": dict(),
    "q-lora-window-bias": dict(q_lora_rank=10, sliding_window=5, bias=True),
}


def set_path(model, mode: str) -> None:
    for m in model.modules():
        if hasattr(m, "absorb"):
            m.absorb = mode


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_naive_and_absorbed_paths_agree(variant, dtype, tol):
    model = tiny_model(**{**MLA, **VARIANTS[variant]}).to(dtype)
    x = torch.randint(0, 64, (3, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        set_path(model, "never")
        naive, _ = model(x)
        set_path(model, "always")
        absorbed, _ = model(x)
    assert naive.abs().max() > 1.0  # logits of substance, not a vanishing attention
    diff = (naive - absorbed).abs().max().item()
    assert diff < tol * max(1.0, naive.abs().max().item()), diff


@pytest.mark.parametrize("path", ["decode", "never"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_latent_cache_greedy_equals_uncached_alone_and_batched(variant, path):
    model = tiny_model(block_size=32, **{**MLA, **VARIANTS[variant]}).double()
    set_path(model, path)
    prompts = prompts_of((1, 7, 13, 4))
    n = 12
    batched, batched_logits = engine_greedy(model, prompts, n)
    assert isinstance(Engine(model).new_cache(1), LatentCache)
    for r, prompt in enumerate(prompts):
        set_path(model, path)
        ref, ref_logits = uncached_greedy(model, prompt, n)
        alone, alone_logits = engine_greedy(model, [prompt], n)
        assert alone[0] == ref and batched[r] == ref
        torch.testing.assert_close(alone_logits[0], ref_logits.float(), atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(batched_logits[r], ref_logits.float(), atol=1e-6, rtol=1e-6)


def test_latent_cache_rollback_and_join_match_a_fresh_prefill():
    model = tiny_model(block_size=32, **MLA).double()
    seq = prompts_of((12,))[0]
    with torch.no_grad():
        full, _ = model(torch.tensor([seq]))
        cache = KVCache.for_model(model, 1, 32)
        model(torch.tensor([seq[:10]]), cache=cache)
        cache.truncate([6])  # drop 4 tokens, then re-feed the rest
        tail, _ = model(torch.tensor([seq[6:]]), cache=cache)
        other = KVCache.for_model(model, 1, 32)
        model(torch.tensor([seq[:3]]), cache=other)
        cache.join(other)  # rows of different lengths: the second row left-padded
        nxt, _ = model(torch.tensor([[seq[-1]], [seq[3]]]), cache=cache)
        ref3, _ = model(torch.tensor([seq[:4] + [seq[-1]]]))
    torch.testing.assert_close(tail[0], full[0, 6:], atol=1e-10, rtol=0)
    torch.testing.assert_close(nxt[1, 0], model(torch.tensor([seq[:4]]))[0][0, -1], atol=1e-10, rtol=0)
    assert ref3.shape[1] == 5


def test_cache_bytes_per_token_latent_vs_gqa():
    """MLA: layers x (kv_lora_rank + qk_rope_head_dim) x bytes; a GQA Llama of the same width:
    2 x layers x kv heads x head dim x bytes."""
    mla = build_model(_resolved("mla-tiny"))
    llama = build_model(_resolved("llama-tiny"))
    c, g = mla.config, llama.config
    latent = KVCache.for_model(mla, 2, 64)
    gqa = KVCache.for_model(llama, 2, 64)
    assert isinstance(latent, LatentCache) and type(gqa) is KVCache
    assert latent.bytes_per_token() == c.n_layer * (c.kv_lora_rank + c.qk_rope_head_dim) * 4 == 4 * 48 * 4
    assert gqa.bytes_per_token() == 2 * g.n_layer * g.n_kv_head * (g.n_embd // g.n_head) * 4 == 2 * 4 * 2 * 32 * 4
    assert latent.nbytes == 2 * 64 * latent.bytes_per_token()  # what is allocated: batch x slots x per token
    print(f"bytes/token: MLA {latent.bytes_per_token()} vs GQA {gqa.bytes_per_token()}")


def _resolved(name: str):
    cfg = get_preset(name).model
    cfg.vocab_size = 64
    return cfg


def test_multi_token_loss_by_hand():
    main, d1, d2 = torch.tensor(2.0), torch.tensor(3.0), torch.tensor(5.0)
    assert multi_token_loss(main, [d1, d2], 0.3).item() == pytest.approx(2.0 + 0.3 * 4.0)
    assert multi_token_loss(main, [d1, d2], 0.0) is main
    assert multi_token_loss(main, [], 0.3) is main


def test_model_loss_adds_the_weighted_mtp_depths():
    model = tiny_model(**MLA, mtp_depth=2, mtp_loss_weight=0.5).double()
    g = torch.Generator().manual_seed(3)
    idx, targets = torch.randint(0, 64, (2, 12), generator=g), torch.randint(0, 64, (2, 12), generator=g)
    targets[0, 7] = -1  # ignored positions stay ignored at every depth
    with torch.no_grad():
        _, loss = model(idx, targets)
        logits, _ = model(idx)
        depth_logits = model.mtp_logits(idx)
        aux = model.aux_loss()

    def ce(lg, t):
        return F.cross_entropy(lg.reshape(-1, lg.size(-1)), t.reshape(-1), ignore_index=-1)

    assert [d.shape[1] for d in depth_logits] == [11, 10]
    # depth k at position i predicts t_{i+k+1} = targets[:, i + k]
    depths = [ce(lg, targets[:, k:]) for k, lg in enumerate(depth_logits, start=1)]
    expected = ce(logits, targets) + 0.5 * (depths[0] + depths[1]) / 2 + aux
    torch.testing.assert_close(loss, expected, atol=1e-10, rtol=0)
    model.config.mtp_loss_weight = 0.0
    with torch.no_grad():
        _, plain = model(idx, targets)
    torch.testing.assert_close(plain, ce(logits, targets) + aux, atol=1e-10, rtol=0)


def test_mtp_gradients_reach_the_modules_and_the_shared_head():
    model = tiny_model(**MLA, mtp_depth=1).train()
    idx = torch.randint(0, 64, (2, 10))
    _, loss = model(idx, torch.roll(idx, -1, 1))
    loss.backward()
    assert model.mtp[0].proj.weight.grad.abs().sum() > 0
    assert model.mtp[0].block.attention.wkv_b.weight.grad.abs().sum() > 0
