"""The Llama-family model: RMSNorm, GQA, sliding window, QK-norm, causality, FLOP accounting, and the
LayerNorm-vs-RMSNorm swap of the norms experiment (RoPE is tested in tests/model/test_layers.py)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from scratchlm.config import ModelConfig, RopeConfig, model_config
from scratchlm.errors import UserError
from scratchlm.experiments.norms import with_layernorm
from scratchlm.model import build_model
from scratchlm.model.layers import RMSNorm, causal_mask, explicit_attention, sdpa_attention
from scratchlm.model.llama import Llama, ffn_hidden
from tests.helpers import counted_training_flops


def cfg(**kw) -> ModelConfig:
    base = dict(arch="llama", vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=2, n_embd=32, bias=False)
    base.update(kw)
    return model_config(**base)


def test_rmsnorm_matches_its_formula():
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(0.5, 2.0, 8))
    expected = x / torch.sqrt((x**2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected, atol=1e-5, rtol=1e-6)  # fp32, values ~4, mean of 8 squares


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1}, {"n_kv_head": 4}, {"qk_norm": True}, {"sliding_window": 5},
                                {"tie_embeddings": False}])
def test_causal_and_loss_near_uniform(kw):
    torch.manual_seed(0)
    model = build_model(cfg(**kw)).eval()
    idx, targets = torch.randint(0, 64, (2, 2, 24))
    _, loss = model(idx, targets)
    assert model(idx)[0].shape == (2, 24, 64) and abs(loss.item() - math.log(64)) < 0.3
    changed = idx.clone()
    changed[:, 10] = (changed[:, 10] + 1) % 64
    assert torch.equal(model(idx)[0][:, :10], model(changed)[0][:, :10])


def test_gqa_shrinks_keys_and_values():
    model = Llama(cfg(n_head=8, n_kv_head=2, n_embd=64))
    att = model.layers[0].attention
    assert att.wq.weight.shape == (64, 64) and att.wk.weight.shape == (16, 64) and att.wv.weight.shape == (16, 64)
    assert ffn_hidden(model.config) == 192  # 8/3 x 64 = 170.7 -> next multiple of 64


def test_gqa_equals_explicitly_repeated_heads():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    k, v = torch.randn(2, 1, 2, 6, 8, dtype=torch.float64).unbind(0)
    repeated = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    # float64, sums of 6 terms: agreement to ~1e-15.
    torch.testing.assert_close(sdpa_attention(q, k, v), sdpa_attention(q, *repeated), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(explicit_attention(q, k, v)[0], sdpa_attention(q, *repeated), atol=1e-12, rtol=1e-12)


def test_sliding_window_mask_against_a_reference():
    T, window = 12, 4
    mask = causal_mask(T, window)
    for i in range(T):
        for j in range(T):
            assert bool(mask[i, j]) == (j <= i and i - j < window)
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 1, 2, T, 8, dtype=torch.float64).unbind(0)
    out, w = explicit_attention(q, k, v, window=window)
    torch.testing.assert_close(out, sdpa_attention(q, k, v, window=window), atol=1e-12, rtol=1e-12)  # float64
    assert torch.all(w[..., ~mask] == 0)


def test_sliding_window_limits_what_a_token_sees():
    torch.manual_seed(0)
    model = build_model(cfg(sliding_window=4, n_layer=1)).eval()
    idx = torch.randint(0, 64, (1, 20))
    changed = idx.clone()
    changed[0, 2] = (changed[0, 2] + 1) % 64
    a, b = model(idx)[0], model(changed)[0]
    assert (a[0, 5] - b[0, 5]).abs().max() > 1e-4  # position 5 still sees position 2 (5 - 2 < 4)
    # One layer: later positions never see it. Only rows of the same product differ: exactly equal.
    torch.testing.assert_close(a[0, 6:], b[0, 6:], atol=0, rtol=0)


@pytest.mark.parametrize("kw", [{}, {"n_kv_head": 1, "qk_norm": True},
                                {"tie_embeddings": False}])
def test_flops_per_token_equals_counted_matmul_flops(kw):
    # As the GPT's test (explicit attention so FlopCounterMode sees QKᵀ and AV). With GQA the
    # queries still have H heads of D = C / H, so attention costs what the formula's L·C·T says.
    torch.manual_seed(0)
    model = Llama(cfg(attn_impl="explicit", block_size=16, **kw))
    forward, both = counted_training_flops(model, 16)
    assert both == 3 * forward
    norm_gains = sum(p.numel() for p in model.parameters() if p.dim() < 2)  # in no matmul
    assert both == 16 * (model.flops_per_token() - 6 * norm_gains)


def test_bad_llama_settings():
    with pytest.raises(UserError, match="n_kv_head=3 does not divide"):
        Llama(cfg(n_kv_head=3))
    with pytest.raises(UserError, match="rope.scaling"):
        Llama(cfg(rope=RopeConfig(scaling="dynamic")))
    with pytest.raises(UserError, match="odd"):
        Llama(cfg(n_embd=36, n_head=4, n_kv_head=4))


def test_layernorm_swap_replaces_every_norm():
    model = with_layernorm(Llama(cfg()))
    assert not any(isinstance(m, RMSNorm) for m in model.modules())
    assert sum(isinstance(m, nn.LayerNorm) for m in model.modules()) == 2 * 2 + 1
    assert torch.isfinite(model(torch.randint(0, 64, (1, 8)))[0]).all()
