"""The formats as model parts: fp8 and NF4 next to int8/int4, the AWQ input scale, casts that keep
the storage, and the format record a quantized checkpoint is rebuilt from."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scratchlm.errors import UserError
from scratchlm.model.quant import (
    FORMATS,
    NF4_LEVELS,
    QuantLinear,
    apply_quant_record,
    dequantize_fp8,
    dequantize_nf4,
    quant_record,
    quantize_fp8,
    quantize_model,
    quantize_nf4,
    unpack_int4,
    weight_bytes,
)
from tests.helpers import tiny_model

# QLoRA's published NF4 table (Dettmers et al. 2023, appendix), to 4 decimals
NF4_PUBLISHED = [-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0910, 0.0,
                 0.0796, 0.1609, 0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0]


def test_nf4_levels_are_qloras():
    torch.testing.assert_close(NF4_LEVELS, torch.tensor(NF4_PUBLISHED), atol=1e-4, rtol=0)
    assert NF4_LEVELS[7].item() == 0.0


def test_nf4_picks_the_nearest_level_per_group():
    torch.manual_seed(0)
    w = torch.randn(8, 128)
    packed, scales = quantize_nf4(w, 64)
    assert packed.shape == (8, 64) and packed.dtype == torch.uint8 and scales.shape == (8, 2)
    deq = dequantize_nf4(packed, scales)
    normed = (w.view(8, 2, 64) / scales.float()[..., None]).reshape(8, 128)
    nearest = NF4_LEVELS[(normed[..., None] - NF4_LEVELS).abs().argmin(-1)]  # brute force over the 16 levels
    torch.testing.assert_close(deq, nearest * scales.float().repeat_interleave(64, dim=1), rtol=0, atol=1e-6)
    assert (unpack_int4(packed) + 8).max() <= 15
    # normal weights: NF4 beats int4's uniform grid
    q4 = QuantLinear.from_linear(_linear(w), fmt="int4", group_size=64).dequantized_weight()
    assert (deq - w).norm() < (q4 - w).norm()


def test_fp8_is_e4m3_per_row_within_its_relative_step():
    torch.manual_seed(0)
    w = torch.randn(16, 64) * torch.logspace(-3, 2, 16)[:, None]
    q, s = quantize_fp8(w)
    assert q.dtype == torch.float8_e4m3fn and s.shape == (16,)
    assert (q.float().abs().amax(dim=1) == 448).all()  # each row's largest weight on the grid's end
    deq = dequantize_fp8(q, s)
    # E4M3 rounds to 3 mantissa bits: relative error <= 2^-4 for normal numbers; tiny ones (subnormals
    # below 2^-6 * s) have an absolute step of 2^-9 * s
    bound = torch.maximum(w.abs() * 2.0 ** -4, s[:, None] * 2.0 ** -10)
    assert ((deq - w).abs() <= bound * (1 + 1e-6)).all()


def _linear(w: torch.Tensor, bias: bool = False) -> nn.Linear:
    lin = nn.Linear(w.size(1), w.size(0), bias=bias)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("fmt", FORMATS)
def test_every_format_as_a_layer_is_close_and_casts_keep_the_storage(fmt):
    torch.manual_seed(0)
    linear = nn.Linear(128, 32)
    q = QuantLinear.from_linear(linear, fmt=fmt, group_size=32)
    x = torch.randn(3, 128)
    with torch.no_grad():
        rel = ((q(x) - linear(x)).norm() / linear(x).norm()).item()
    assert rel < {"int8": 0.01, "fp8": 0.05, "int4": 0.1, "nf4": 0.1}[fmt]
    dtypes = (q.qweight.dtype, q.scales.dtype)
    q.to(torch.bfloat16)  # a cast of the model moves nothing into another format
    assert (q.qweight.dtype, q.scales.dtype) == dtypes and q.bias.dtype == torch.bfloat16
    assert q(x.bfloat16()).dtype == torch.bfloat16


def test_an_input_scale_is_divided_out_exactly():
    torch.manual_seed(0)
    linear = nn.Linear(64, 16, bias=False)
    s = torch.rand(64) * 4 + 0.25
    q = QuantLinear.from_linear(linear, fmt="int4", group_size=32, in_scale=s)
    plain = QuantLinear.from_linear(_linear(linear.weight * s), fmt="int4", group_size=32)
    torch.testing.assert_close(q.dequantized_weight(), plain.dequantized_weight() / s, rtol=0, atol=0)
    assert weight_bytes(q).quantized == weight_bytes(plain).quantized + 64 * 4


def test_the_record_rebuilds_the_structure_and_refuses_another_model():
    model = tiny_model(arch="llama")
    quantize_model(model, fmt="nf4", group_size=32)
    model.layers[0].attention.wq = QuantLinear.from_linear(nn.Linear(32, 32, bias=False), fmt="fp8",
                                                           in_scale=torch.ones(32))
    record = quant_record(model)
    assert record["layers.0.attention.wq"] == {"format": "fp8", "group_size": 0, "in_scale": True, "bias": False}
    assert record["layers.1.feed_forward.w2"]["format"] == "nf4"
    fresh = tiny_model(arch="llama", seed=1)
    assert apply_quant_record(fresh, record) == len(record)
    assert quant_record(fresh) == record
    assert set(fresh.state_dict()) == set(model.state_dict())
    fresh.load_state_dict(model.state_dict())
    idx = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx)[0], model(idx)[0], rtol=0, atol=0)
    with pytest.raises(UserError, match="layers.9"):
        apply_quant_record(tiny_model(arch="llama"), {"layers.9.attention.wq": record["layers.0.attention.wq"]})
    with pytest.raises(UserError, match="format"):
        apply_quant_record(tiny_model(arch="llama"), {"layers.0.attention.wq": {**record["layers.0.attention.wq"],
                                                                                "format": "int3"}})
