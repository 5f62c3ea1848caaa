"""The GPT and the baselines: shapes, causality, explicit attention ≡ SDPA, sinusoidal values,
GPT-2 init, parameter and FLOP accounting; the baselines in the shared loop and with a document mask."""

from __future__ import annotations

import contextlib
import math
from dataclasses import replace

import pytest
import torch

from scratchlm.config import GPTConfig, ModelConfig, switch_arch
from scratchlm.errors import UserError
from scratchlm.infer.kv_cache import KVCache
from scratchlm.model import build_model, padded_vocab
from scratchlm.model.gpt import GPT
from scratchlm.model.layers import DocumentMask, explicit_attention, sdpa_attention, sinusoidal_positions
from scratchlm.train.loop import forward_backward
from tests.helpers import counted_training_flops


def tiny(arch: str = "gpt", **kw) -> ModelConfig:
    base = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=4, n_embd=32)
    return replace(switch_arch(base, arch), **kw)  # a baseline keeps the sizes it has (vocab, block, ...)


@pytest.mark.parametrize("arch", ["gpt", "bigram", "mlp"])
def test_shapes_and_loss(arch):
    torch.manual_seed(0)
    model = build_model(tiny(arch=arch))
    idx, targets = torch.randint(0, 64, (2, 3, 16))
    logits, loss = model(idx, targets)
    assert (logits is None) == (arch == "gpt")  # the GPT's loss is fused with its head: no logits built
    assert model(idx)[0].shape == (3, 16, 64)
    # At initialisation every model predicts close to uniform: loss ≈ ln V.
    assert abs(loss.item() - math.log(64)) < 0.3
    assert model(idx)[1] is None


@pytest.mark.parametrize("arch,kw", [("gpt", {}), ("gpt", {"pos_emb": "sinusoidal"}),
                                     ("gpt", {"attn_impl": "explicit"}), ("mlp", {})])
def test_changing_a_future_token_never_changes_earlier_logits(arch, kw):
    torch.manual_seed(0)
    model = build_model(tiny(arch=arch, **kw)).eval()
    idx = torch.randint(0, 64, (2, 16))
    for t in (0, 7, 15):
        changed = idx.clone()
        changed[:, t] = (changed[:, t] + 1) % 64
        a, b = model(idx)[0], model(changed)[0]
        assert torch.equal(a[:, :t], b[:, :t])
        assert (a[:, t:] - b[:, t:]).abs().max() > 1e-4  # ...and does change the rest, beyond rounding


def test_explicit_attention_equals_sdpa():
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 8, dtype=torch.float64) for _ in range(3))
    out, w = explicit_attention(q, k, v)
    # float64 sums of <= 10 terms of order 1: two orders agree to ~1e-15.
    torch.testing.assert_close(out, sdpa_attention(q, k, v), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 10, dtype=torch.float64), atol=1e-12, rtol=0)
    assert torch.all(w.triu(1) == 0)  # no weight on the future


def test_explicit_model_equals_sdpa_model():
    torch.manual_seed(0)
    a = build_model(tiny(attn_impl="sdpa"))
    b = build_model(tiny(attn_impl="explicit"))
    b.load_state_dict(a.state_dict())
    idx = torch.randint(0, 64, (2, 16))
    # fp32 logits of about +-1 after 2 layers, two summation orders: see tests/helpers.py.
    torch.testing.assert_close(a(idx)[0], b(idx)[0], atol=1e-4, rtol=1e-5)


def test_attention_by_hand_on_a_tiny_example():
    # One head, D = 1: q = k = 1 everywhere makes every visible score equal, so position t
    # averages v over positions 0..t.
    q = k = torch.ones(1, 1, 3, 1)
    v = torch.tensor([1.0, 2.0, 6.0]).view(1, 1, 3, 1)
    out, w = explicit_attention(q, k, v)
    torch.testing.assert_close(out.view(3), torch.tensor([1.0, 1.5, 3.0]), atol=1e-6, rtol=0)  # fp32, 3 terms
    torch.testing.assert_close(w[0, 0, 2], torch.full((3,), 1 / 3), atol=1e-7, rtol=0)


def test_sinusoidal_values():
    pe = sinusoidal_positions(50, 8)
    assert pe.shape == (50, 8)
    p, i = 7, 2  # PE[p, 2i] = sin(p / 10000^(2i/d)), PE[p, 2i+1] = cos(same)
    angle = p / 10000 ** (2 * i / 8)
    assert pe[p, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
    assert pe[p, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)
    assert torch.equal(pe[0], torch.tensor([0.0, 1.0] * 4))


def test_gpt2_init_and_tied_head():
    torch.manual_seed(0)
    cfg = tiny(n_layer=8, n_embd=128, vocab_size=512)
    model = GPT(cfg)
    assert model.lm_head.weight is model.wte.weight
    proj = torch.cat([b.attn.c_proj.weight.flatten() for b in model.h])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.h[0].mlp.c_fc.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert torch.all(model.h[0].attn.c_attn.bias == 0)


def test_param_count_matches_the_formula():
    cfg = tiny()
    model = GPT(cfg)
    C, L, V, T = 32, 2, 64, 16
    per_block = (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C) + 4 * C
    assert model.num_params() == V * C + L * per_block + 2 * C  # wte (tied head) + blocks + ln_f
    assert model.num_params(non_embedding=False) == model.num_params() + T * C


@pytest.mark.parametrize("kw", [{}, {"bias": False, "n_layer": 3, "block_size": 8},
                                {"tie_embeddings": False}])
def test_flops_per_token_equals_counted_matmul_flops(kw):
    # Explicit attention: FlopCounterMode has no formula for the CPU SDPA kernel, but counts the two
    # bmm (QKᵀ and AV) of the explicit path, over the full T x T square (causality is not credited,
    # as in the formula). The same weights run either way.
    torch.manual_seed(0)
    model = GPT(tiny(attn_impl="explicit", **kw))
    T = model.config.block_size
    forward, both = counted_training_flops(model, T)
    assert both == 3 * forward  # the backward of a matmul is two matmuls of its size
    # The formula charges 6 FLOPs per token to every non-embedding parameter; biases and norm gains
    # take part in no matmul, so the counter does not see them. Everything else must match exactly.
    outside_matmuls = sum(p.numel() for p in model.parameters() if p.dim() < 2)
    assert both == T * (model.flops_per_token() - 6 * outside_matmuls)


def test_gpt2_124m_has_124m_parameters():
    from scratchlm.config import get_preset

    cfg = get_preset("gpt2-124m").model
    cfg.vocab_size = padded_vocab(cfg, 50257)
    assert cfg.vocab_size == 50304
    with torch.device("meta"):
        model = GPT(cfg)
    assert model.num_params(non_embedding=False) == pytest.approx(124.5e6, rel=0.01)


def test_bad_model_settings():
    with pytest.raises(UserError, match="not divisible by model.n_head"):
        GPT(tiny(n_embd=30))
    with pytest.raises(UserError, match="model.arch"):
        build_model(tiny(arch="lstm"))
    with pytest.raises(UserError, match="smaller than the tokenizer"):
        padded_vocab(tiny(vocab_size=10), 65)
    assert padded_vocab(tiny(vocab_size=0), 65) == 128


@pytest.mark.parametrize("arch", ["bigram", "mlp"])
def test_baselines_take_a_step_of_the_shared_training_loop(arch):
    # The loop calls model(x, y, doc_mask=...) on every model; the baselines once took no such keyword.
    torch.manual_seed(0)
    model = build_model(tiny(arch=arch))
    x, y = torch.randint(0, 64, (2, 3, 16))
    loss = forward_backward(model, [(x, y)], contextlib.nullcontext(), None)
    assert math.isfinite(loss.item())
    assert all(p.grad is not None for p in model.parameters())


def test_mlp_baseline_with_a_document_mask_predicts_each_document_as_alone():
    # float64: the packed and the lone forward multiply matrices of different heights, so their
    # roundings may differ by a few ulps; 1e-12 is far below any context leak (logits ~ 1e-2).
    torch.manual_seed(0)
    model = build_model(tiny(arch="mlp", mlp_context=3)).double()
    a, b = torch.randint(0, 64, (5,)), torch.randint(0, 64, (7,))
    packed = model(torch.cat([a, b])[None], doc_mask=DocumentMask(torch.tensor([[0] * 5 + [1] * 7])))[0]
    torch.testing.assert_close(packed[0, :5], model(a[None])[0][0], atol=1e-12, rtol=0)
    torch.testing.assert_close(packed[0, 5:], model(b[None])[0][0], atol=1e-12, rtol=0)
    assert not torch.allclose(model(torch.cat([a, b])[None])[0][0, 5:], packed[0, 5:])  # unmasked, b reads a


def test_a_forward_takes_a_cache_or_a_document_mask_not_both():
    model = build_model(tiny())
    idx = torch.randint(0, 64, (1, 4))
    with pytest.raises(ValueError, match="not both"):
        model(idx, cache=KVCache.for_model(model, 1), doc_mask=DocumentMask(torch.zeros(1, 4, dtype=torch.long)))
