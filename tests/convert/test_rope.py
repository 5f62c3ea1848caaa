"""RoPE, as the converter relies on it: scores depend only on the offset, and our frequencies
(and YaRN's attention scale) equal what transformers computes from the same config fields."""

from __future__ import annotations

import pytest
import torch

from scratchlm.model.layers import RoPE, rope_frequencies

SCALINGS = [("none", 1.0, 0), ("linear", 4.0, 0), ("ntk", 4.0, 0), ("yarn", 4.0, 64)]


@pytest.mark.parametrize("scaling,factor,original", SCALINGS)
def test_score_depends_only_on_the_offset(scaling, factor, original):
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
def test_frequencies_equal_transformers(rope_parameters, ours):
    hf_inv_freq, hf_scale = hf_rope(**rope_parameters)
    inv_freq, scale = rope_frequencies(64, 500000.0, *ours)
    torch.testing.assert_close(inv_freq, hf_inv_freq.float(), atol=0, rtol=1e-6)
    assert scale == pytest.approx(hf_scale, rel=1e-12)


def test_cos_sin_equal_llama_rotary_embedding():
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
