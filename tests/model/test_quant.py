"""Weight-only quantization: error bounds, int4 packing, padding, QuantLinear vs nn.Linear, memory,
and whole-model replacement (tied heads and skipped names left alone)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_model, save_model
from torch import nn

from scratchlm.config import model_config
from scratchlm.errors import UserError
from scratchlm.model import build_model
from scratchlm.model.quant import (
    QuantLinear,
    dequantize_int4,
    dequantize_int8,
    name_matches,
    pack_int4,
    quantize_int4,
    quantize_int8,
    quantize_model,
    unpack_int4,
    weight_bytes,
)


def tiny(arch: str, **kw) -> nn.Module:
    base = dict(arch=arch, vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32, bias=arch == "gpt")
    base.update(kw)
    torch.manual_seed(0)
    return build_model(model_config(**base))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_int8_error_is_at_most_half_a_step_per_row():
    torch.manual_seed(0)
    w = torch.randn(48, 100) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scale
    w[5] = 0.0  # an all-zero row must not divide by zero
    q, s = quantize_int8(w)
    assert q.dtype == torch.int8 and q.shape == w.shape and s.shape == (48,)
    assert q.abs().max() <= 127
    err = (dequantize_int8(q, s) - w).abs().amax(dim=1)  # (out,)
    assert (err <= s / 2 * (1 + 1e-5)).all()
    assert torch.equal(dequantize_int8(q, s)[5], torch.zeros(100))
    # the largest weight of each row is on the grid's end
    assert (q.abs().amax(dim=1)[s != 1] == 127).all()


def test_int4_error_is_at_most_half_a_step_per_group():
    torch.manual_seed(0)
    w = torch.randn(16, 256)
    w[3, 64:128] *= 100.0  # an outlier group only coarsens its own group
    packed, scales = quantize_int4(w, group_size=64)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 128)
    assert scales.dtype == torch.float16 and scales.shape == (16, 4)
    deq = dequantize_int4(packed, scales)
    err = (deq - w).abs().view(16, 4, 64).amax(dim=-1)  # (out, G)
    assert (err <= scales.float() / 2 * (1 + 1e-5)).all()
    codes = unpack_int4(packed)
    assert codes.min() >= -7 and codes.max() <= 7  # symmetric: -8 is never produced
    assert err[3, 0] < err[3, 1] / 50  # the outlier did not leak into the neighbouring group


def test_int4_packing_is_exact_for_all_sixteen_values():
    codes = torch.arange(-8, 8, dtype=torch.int8)
    grid = torch.cartesian_prod(codes, codes).to(torch.int8)  # every (even, odd) pair: (256, 2)
    packed = pack_int4(grid)
    assert packed.shape == (256, 1) and packed.dtype == torch.uint8
    assert torch.equal(torch.sort(packed.flatten()).values, torch.arange(256, dtype=torch.uint8))
    assert torch.equal(unpack_int4(packed), grid)
    # layout: the even column in the low nibble, codes offset by 8
    assert pack_int4(torch.tensor([[-8, 7]], dtype=torch.int8)).item() == 0xF0
    assert pack_int4(torch.tensor([[1, 0]], dtype=torch.int8)).item() == 0x89
    # dequantization of every code with scale 1 is the code itself
    deq = dequantize_int4(pack_int4(codes.view(1, 16)), torch.ones(1, 1, dtype=torch.float16))
    assert torch.equal(deq, codes.float().view(1, 16))
    with pytest.raises(ValueError):
        pack_int4(torch.tensor([[8, 0]], dtype=torch.int8))


@pytest.mark.parametrize("in_features", [100, 37, 5])
def test_int4_pads_inputs_that_do_not_fill_the_last_group(in_features):
    torch.manual_seed(0)
    w = torch.randn(8, in_features)
    packed, scales = quantize_int4(w, group_size=64)
    groups = -(-in_features // 64)
    assert packed.shape == (8, groups * 32) and scales.shape == (8, groups)
    deq = dequantize_int4(packed, scales, in_features)
    assert deq.shape == w.shape
    per_col_scale = scales.float().repeat_interleave(64, dim=1)[:, :in_features]
    assert ((deq - w).abs() <= per_col_scale / 2 * (1 + 1e-5)).all()
    # the padding is code 0
    assert (unpack_int4(packed)[:, in_features:] == 0).all()
    layer = nn.Linear(in_features, 8)
    q = QuantLinear.from_linear(layer, bits=4, group_size=64)
    x = torch.randn(3, in_features)
    assert q(x).shape == (3, 8)


@pytest.mark.parametrize("group_size", [0, 3, -4])
def test_bad_group_size_is_a_user_error(group_size):
    with pytest.raises(UserError, match="group_size"):
        quantize_int4(torch.randn(4, 8), group_size)


def test_bits_other_than_4_or_8_are_refused():
    with pytest.raises(UserError, match="bits=3"):
        QuantLinear.from_linear(nn.Linear(8, 8), bits=3)


def test_fp16_scales_never_shrink_so_tiny_weights_stay_within_the_bound():
    w = torch.full((2, 64), 3e-7)  # absmax / 7 is below fp16's smallest normal number
    w[1] = torch.linspace(-1e-6, 1e-6, 64)
    packed, scales = quantize_int4(w, 64)
    assert (scales.float() > 0).all()
    assert ((dequantize_int4(packed, scales) - w).abs() <= scales.float() / 2 * (1 + 1e-5)).all()
    with pytest.raises(UserError, match="fp16"):
        quantize_int4(torch.full((1, 64), 1e6), 64)


@pytest.mark.parametrize(("bits", "limit"), [(8, 0.01), (4, 0.10)])
def test_quant_linear_matches_linear(bits, limit):
    torch.manual_seed(0)
    linear = nn.Linear(256, 128)  # PyTorch's default (uniform) init: int4 lands near 7%, int8 near 0.4%
    q = QuantLinear.from_linear(linear, bits=bits, group_size=64)
    x = torch.randn(4, 10, 256)
    with torch.no_grad():
        assert rel_err(q(x), linear(x)) < limit
        # bf16 inputs get a bf16 weight and output
        assert q(x.bfloat16()).dtype == torch.bfloat16
    assert not list(q.parameters())  # frozen: everything is a buffer
    assert {n for n, _ in q.named_buffers()} == {"qweight", "scales", "bias"}
    no_bias = QuantLinear.from_linear(nn.Linear(64, 8, bias=False), bits=bits)
    assert no_bias.bias is None and no_bias(torch.randn(2, 64)).shape == (2, 8)


def test_gradient_flows_to_the_input_through_the_dequantized_weight():
    torch.manual_seed(0)
    q = QuantLinear.from_linear(nn.Linear(96, 40), bits=4, group_size=32)
    ref = q.to_linear()  # the same (dequantized) weight as an ordinary layer
    x1 = torch.randn(5, 96, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    q(x1).square().sum().backward()
    ref(x2).square().sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-5, rtol=1e-5)  # fp32 sums of 40 terms of order 1


def test_int4_weights_take_about_an_eighth_of_fp32():
    q = QuantLinear.from_linear(nn.Linear(512, 256, bias=False), bits=4, group_size=64)
    wb = weight_bytes(q)
    assert wb.quantized == 256 * 512 // 2 + 256 * (512 // 64) * 2  # nibbles + fp16 scales
    assert wb.quantized_fp32 == 256 * 512 * 4
    assert wb.ratio == pytest.approx(1 / 8 + 2 / 64 / 4)  # 0.1328
    q8 = QuantLinear.from_linear(nn.Linear(512, 256, bias=False), bits=8)
    assert weight_bytes(q8).ratio == pytest.approx(1 / 4 + 1 / 512)


def test_quantize_model_skips_the_tied_head_and_keeps_outputs_close():
    model = tiny("gpt")
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        ref, _ = model(idx)
    before = weight_bytes(model)
    n = quantize_model(model, bits=8)
    assert n == 4 * 2  # c_attn, attn.c_proj, c_fc, mlp.c_proj per layer
    assert type(model.lm_head) is nn.Linear and model.lm_head.weight is model.wte.weight  # tie intact
    assert isinstance(model.h[0].attn.c_attn, QuantLinear)
    with torch.no_grad():
        out, _ = model(idx)
    assert rel_err(out, ref) < 0.01
    after = weight_bytes(model)
    assert after.total < before.total and 0.25 < after.ratio < 0.29  # int8 + one fp32 scale per row of 32-128


def test_quantize_model_skips_an_untied_output_by_name_and_moe_experts_stay_full_precision():
    llama = tiny("llama", tie_embeddings=False)
    assert quantize_model(llama, bits=4, group_size=32) == 7 * 2
    assert type(llama.output) is nn.Linear
    moe = tiny("moe", n_experts=4, n_active_experts=2)
    n = quantize_model(moe, bits=4, group_size=32)
    assert n == 4 * 2  # wq, wk, wv, wo; the router gate is skipped, experts are 3-D parameters
    layer = moe.layers[0].feed_forward
    assert type(layer.gate) is nn.Linear and layer.w13_EC2H.dtype == torch.float32
    with torch.no_grad():
        moe(torch.randint(0, 64, (2, 16)))


def test_quantized_model_state_dict_round_trips_through_safetensors(tmp_path):
    model = tiny("llama")
    quantize_model(model, bits=4, group_size=32)
    save_model(model, str(tmp_path / "q.safetensors"))
    fresh = tiny("llama")
    torch.manual_seed(1)
    fresh.init_weights()  # different weights, same layout once quantized
    quantize_model(fresh, bits=4, group_size=32)
    load_model(fresh, str(tmp_path / "q.safetensors"))
    idx = torch.randint(0, 64, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(fresh(idx)[0], model(idx)[0], rtol=0, atol=0)


def test_name_patterns():
    assert name_matches("h.0.attn.c_attn", ["c_attn"])
    assert name_matches("h.0.attn.c_attn", ["attn.c_attn"])
    assert name_matches("h.0.attn.c_attn", ["*c_attn"])
    assert not name_matches("h.0.attn.c_attn", ["attn"])
    assert not name_matches("h.0.attn.c_attn", ["attn.c"])
    assert name_matches("layers.1.attention.wq", [r"re:layers\.1\..*wq"])
    assert not name_matches("layers.0.attention.wq", [r"re:layers\.1\..*wq"])
