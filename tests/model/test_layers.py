"""The model's shared layers.

- DocumentMask (packed training): its mask against a hand-written rule, with and without a sliding
  window, and GPT's attention dropout applied through it in training only. Packed ≡ one by one on
  whole models is in tests/sft/test_data.py.
- RoPE: scores depend only on the offset (and rotation keeps lengths), the context-extension schemes'
  frequencies, and, as the converter relies on it, our frequencies (and YaRN's attention scale) equal
  what transformers computes from the same config fields (those tests skip without transformers, a
  dev dependency, and fail so in CI)."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.config import GPTConfig
from scratchlm.model import build_model
from scratchlm.model.layers import DocumentMask, RoPE, rope_frequencies


@pytest.mark.parametrize("window", [0, 3])
def test_document_mask_against_a_reference(window):
    docs = torch.tensor([[0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, -2, -2]])
    dm = DocumentMask(docs)
    T = docs.size(1)
    mask = dm.mask(window)
    assert mask.shape == (1, 1, T, T)
    for i in range(T):
        for j in range(T):
            allowed = docs[0, i] == docs[0, j] and j <= i and (window == 0 or i - j < window)
            assert bool(mask[0, 0, i, j]) == allowed, (i, j)
    assert dm.positions(T).tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 0, 1]]


def gpt_with_attention_dropout(p: float) -> torch.nn.Module:
    """A tiny GPT whose only dropout is the attention's (embedding, residual and MLP dropout off), so
    train and eval mode differ only if attention dropout is applied."""
    torch.manual_seed(0)
    model = build_model(GPTConfig(vocab_size=32, block_size=16, n_layer=2, n_head=2, n_embd=16, dropout=p))
    model.drop.p = 0.0
    for block in model.h:
        block.attn.resid_drop.p = block.mlp.drop.p = 0.0
    return model


def test_gpt_attention_dropout_applies_through_document_mask_in_training_only():
    idx = torch.randint(0, 32, (2, 12), generator=torch.Generator().manual_seed(1))
    docs = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    model = gpt_with_attention_dropout(0.5)
    torch.manual_seed(2)
    train = model.train()(idx, doc_mask=DocumentMask(docs))[0]
    evaluated = model.eval()(idx, doc_mask=DocumentMask(docs))[0]
    # Half the attention weights dropped (the rest doubled) moves the logits far beyond rounding.
    assert (train - evaluated).abs().max() > 1e-3
    # Eval mode is deterministic: the same call twice gives the same bits.
    assert torch.equal(evaluated, model(idx, doc_mask=DocumentMask(docs))[0])

    # With dropout 0, train and eval run the same operations in the same order: equal bits.
    model = gpt_with_attention_dropout(0.0)
    assert torch.equal(model.train()(idx, doc_mask=DocumentMask(docs))[0],
                       model.eval()(idx, doc_mask=DocumentMask(docs))[0])


def test_rope_score_depends_only_on_the_offset():
    torch.manual_seed(0)
    rope = RoPE(16, theta=10000.0)
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)  # (B, H, T, D) each

    def score(m: int, n: int) -> float:
        pq = rope(q, torch.tensor([[m]]))
        pk = rope(k, torch.tensor([[n]]))
        return (pq * pk).sum().item()

    base = score(7, 3)
    for shift in (1, 10, 100, 1000):
        # fp32 angles m·θ are rounded to ~m·2⁻²⁴ rad (plus cos/sin's own rounding): with two rotated
        # vectors the score may move by about |q||k|·2·m·2⁻²³ at position m (4e-3 at m = 1007).
        bound = q.norm().item() * k.norm().item() * 2 * (7 + shift) * 2**-23
        assert score(7 + shift, 3 + shift) == pytest.approx(base, abs=bound)
    assert abs(score(9, 3) - base) > 0.1  # a different offset gives a different score
    # Rotation keeps the length of every vector.
    assert rope(q, torch.tensor([[5]])).norm().item() == pytest.approx(q.norm().item(), rel=1e-5)


def test_rope_context_extension_schemes():
    plain = RoPE(16, 10000.0).inv_freq
    torch.testing.assert_close(RoPE(16, 10000.0, "linear", 4.0).inv_freq, plain / 4, atol=0, rtol=1e-6)
    ntk = RoPE(16, 10000.0, "ntk", 4.0).inv_freq
    assert ntk[0] == plain[0] and ntk[-1] == pytest.approx(plain[-1].item() / 4, rel=1e-4)  # lowest freq x1/4
    yarn = RoPE(16, 10000.0, "yarn", 4.0, original_context=64)
    assert yarn.attn_scale == pytest.approx(0.1 * math.log(4) + 1, rel=1e-12)  # a Python float
    assert yarn.inv_freq[0] == plain[0] and yarn.inv_freq[-1] == pytest.approx(plain[-1].item() / 4, rel=1e-6)


SCALINGS = [("none", 1.0, 0), ("linear", 4.0, 0), ("ntk", 4.0, 0), ("yarn", 4.0, 64)]


@pytest.mark.parametrize("scaling,factor,original", SCALINGS)
def test_rope_score_depends_only_on_the_offset_under_each_scaling(scaling, factor, original):
    torch.manual_seed(0)
    rope = RoPE(16, 10000.0, scaling, factor, original)
    q, k = torch.randn(2, 1, 1, 1, 16).unbind(0)  # one query and one key, (B=1, H=1, T=1, D)

    def score(m: int, n: int) -> torch.Tensor:
        return (rope(q, torch.tensor([[m]])) * rope(k, torch.tensor([[n]]))).sum()

    for m, n in [(5, 2), (30, 30), (3, 17)]:
        for d in (1, 100, 1000):
            # fp32 angles: position x inv_freq carries ~1e-4 absolute error at positions near 1000
            torch.testing.assert_close(score(m + d, n + d), score(m, n), atol=3e-4, rtol=0)
    assert not torch.allclose(score(5, 2), score(5, 3))  # and it does depend on the offset


def hf_rope(**rope_parameters):
    """transformers' own inverse frequencies and attention scale for a Llama config."""
    transformers = pytest.importorskip("transformers")
    try:
        from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    except ImportError:
        pytest.skip("this transformers has no modeling_rope_utils.ROPE_INIT_FUNCTIONS")
    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=256,
                                   rope_parameters={"rope_theta": 500000.0, **rope_parameters})
    return ROPE_INIT_FUNCTIONS[rope_parameters["rope_type"]](cfg, "cpu")


@pytest.mark.parametrize("rope_parameters,ours", [
    (dict(rope_type="linear", factor=8.0), ("linear", 8.0, 0)),
    (dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=64), ("yarn", 4.0, 64)),
    (dict(rope_type="yarn", factor=16.0, original_max_position_embeddings=32), ("yarn", 16.0, 32)),
])
def test_rope_frequencies_equal_transformers(rope_parameters, ours):
    hf_inv_freq, hf_scale = hf_rope(**rope_parameters)
    inv_freq, scale = rope_frequencies(64, 500000.0, *ours)
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), atol=0, rtol=1e-6)
    assert scale == pytest.approx(hf_scale, rel=1e-12)


def test_rope_cos_sin_equal_llama_rotary_embedding():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, max_position_embeddings=256,
                                   rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0,
                                                    "original_max_position_embeddings": 64})
    positions = torch.arange(200)[None]
    hf_cos, hf_sin = LlamaRotaryEmbedding(cfg)(torch.zeros(1, 200, 64), positions)  # (1, T, D)
    cos, sin = RoPE(64, 10000.0, "yarn", 4.0, 64).cos_sin(positions)  # (1, 1, T, D)
    torch.testing.assert_close(cos[:, 0], hf_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin[:, 0], hf_sin, atol=1e-5, rtol=0)
