"""GPTQ and AWQ against round-to-nearest, judged by the output error on calibration inputs."""

from __future__ import annotations

import pytest
import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.errors import UserError
from scratchlm.model.quant import FORMATS, QuantLinear, quantizable_linears, quantize_weight
from scratchlm.quantize.awq import awq
from scratchlm.quantize.calibrate import calibration_blocks, calibration_texts, record_inputs
from scratchlm.quantize.gptq import gptq, hessian, output_error, rtn


def realistic_layer(seed: int, n: int = 1024, d_in: int = 128, d_out: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs x (n, d_in), weight (d_out, d_in)): correlated channels (x = z A) and a few outlier
    channels 10-30x larger, as activations of trained transformers have."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d_in, generator=g) @ (torch.randn(d_in, d_in, generator=g) / d_in ** 0.5)
    outliers = torch.randperm(d_in, generator=g)[:4]
    x[:, outliers] *= 10 + 20 * torch.rand(4, generator=g)
    return x, torch.randn(d_out, d_in, generator=g) * 0.05


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_gptq_beats_rtn_on_at_least_19_of_20_random_layers(fmt):
    ratios = []
    for seed in range(20):
        x, w = realistic_layer(seed)
        e_gptq = output_error(x, w, gptq(w, hessian(x), fmt, 32).weight)
        ratios.append(e_gptq / output_error(x, w, rtn(w, fmt, 32).weight))
    assert sum(r < 1 for r in ratios) >= 19, ratios


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_with_a_diagonal_hessian_is_rtn_exactly(fmt, act_order):
    torch.manual_seed(0)
    w = torch.randn(24, 96) * torch.logspace(-2, 1, 96)  # columns of different scale
    q = gptq(w, torch.eye(96, dtype=torch.float64) * 3.0, fmt, 32, act_order=act_order)
    codes, scales = quantize_weight(w, fmt, 32)
    assert torch.equal(q.qweight.view(torch.uint8), codes.view(torch.uint8)) and torch.equal(q.scales, scales)
    layer = QuantLinear(96, 24, bias=False, group_size=32, fmt=fmt)
    layer.set_codes(q.qweight, q.scales)
    assert torch.equal(layer.dequantized_weight(), q.weight)  # `weight` is what the stored codes stand for


def test_gptq_act_order_and_static_groups_still_beat_rtn():
    x, w = realistic_layer(0)
    base = output_error(x, w, rtn(w, "int4", 32).weight)
    for kw in ({"act_order": True}, {"static_groups": True}, {"block_size": 32}):
        assert output_error(x, w, gptq(w, hessian(x), "int4", 32, **kw).weight) < base, kw


def test_group_size_that_does_not_divide_the_width_is_refused():
    with pytest.raises(UserError, match="group size 48 does not divide the input width 100"):
        gptq(torch.randn(4, 100), torch.eye(100), "int4", 48)
    with pytest.raises(UserError, match="does not divide"):
        awq(torch.randn(4, 100), torch.randn(10, 100), "nf4", 64)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_awq_is_never_worse_than_rtn_and_its_layer_computes_what_was_searched(fmt):
    gains = 0
    for seed in range(10):
        x, w = realistic_layer(seed)
        q, s, alpha = awq(w, x, fmt, 32)
        e_awq, e_rtn = output_error(x, w, q.weight), output_error(x, w, rtn(w, fmt, 32).weight)
        assert e_awq <= e_rtn  # alpha = 0 (s = 1) is plain RTN, and it is in the grid
        gains += e_awq < e_rtn
        layer = QuantLinear(128, 64, bias=False, group_size=32, fmt=fmt, in_scale=True)
        layer.set_codes(q.qweight, q.scales)
        layer.in_scale.copy_(s)
        assert torch.equal(layer.dequantized_weight(), q.weight)
        assert 0.0 <= alpha <= 1.0
    assert gains >= 8  # outlier channels: scaling helps on almost every layer


def test_gptq_and_awq_beat_rtn_on_the_layers_of_a_trained_model(trained):
    _, base, data = trained
    model, tok, _ = load_model_for_inference(base)
    names = quantizable_linears(model)
    blocks = calibration_blocks(tok, calibration_texts(data), 64, 16)
    inputs = record_inputs(model, names, blocks, keep_rows=True)
    gptq_wins = 0
    for name in names:
        w, st = model.get_submodule(name).weight, inputs[name]
        e_rtn = output_error(st.x, w, rtn(w, "int4", 32).weight)
        gptq_wins += output_error(st.x, w, gptq(w, st.hessian, "int4", 32).weight) < e_rtn
        assert output_error(st.x, w, awq(w, st.x, "int4", 32)[0].weight) <= e_rtn, name
    assert gptq_wins == len(names) == 14
