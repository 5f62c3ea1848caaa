"""Every fast matmul path of a quantized layer against the reference path (dequantize, F.linear)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from scratchlm.model.qkernels import TOLERANCE, kernel_times, pick_kernel, relative_error, use_fastest_kernels
from scratchlm.model.quant import FORMATS, QuantLinear, quantize_model
from tests.helpers import tiny_model


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("in_scale", [False, True])
def test_fast_paths_agree_with_the_reference(fmt, in_scale):
    torch.manual_seed(0)
    linear = nn.Linear(128, 48)
    s = torch.rand(128) + 0.5 if in_scale else None
    layer = QuantLinear.from_linear(linear, group_size=32, fmt=fmt, in_scale=s).eval()
    x = torch.randn(2, 5, 128)  # (B, T, in): any leading shape
    with torch.no_grad():
        ref = layer(x)
        for kernel in QuantLinear.KERNELS[fmt][1:]:
            layer.use_kernel(kernel)
            y = layer(x)
            assert y.shape == ref.shape and y.dtype == x.dtype
            assert relative_error(y, ref) <= TOLERANCE[kernel], kernel
    # training always takes the reference path (the fast ones have no backward)
    layer.use_kernel(QuantLinear.KERNELS[fmt][-1])
    xg = x.clone().requires_grad_(True)
    layer(xg).sum().backward()
    assert xg.grad is not None


def test_int4pack_handles_a_padded_last_group():
    torch.manual_seed(0)
    layer = QuantLinear.from_linear(nn.Linear(100, 16, bias=False), group_size=64, fmt="int4").eval()
    x = torch.randn(3, 100)
    with torch.no_grad():
        ref = layer(x)
        layer.use_kernel("int4pack")
        assert relative_error(layer(x), ref) <= TOLERANCE["int4pack"]


def test_unavailable_kernel_is_refused():
    layer = QuantLinear.from_linear(nn.Linear(64, 8), fmt="nf4", group_size=32)
    with pytest.raises(ValueError, match="int4pack"):
        layer.use_kernel("int4pack")


def test_timing_reports_every_path_and_the_choice_is_cached():
    times = kernel_times(32, 64, "int8", 32, batches=(1,))
    assert set(times) == {"fp32", "bf16", *QuantLinear.KERNELS["int8"]}
    assert all(v["seconds"][1] > 0 for v in times.values())
    assert all(times[k]["ok"] for k in QuantLinear.KERNELS["int8"])
    first = pick_kernel(32, 64, "int8", 32)
    assert first in QuantLinear.KERNELS["int8"] and pick_kernel(32, 64, "int8", 32) == first  # from the cache
    model = tiny_model(arch="llama")
    idx = torch.randint(0, 64, (2, 16))
    quantize_model(model, fmt="int8")
    with torch.no_grad():
        ref = model(idx)[0]
        counts = use_fastest_kernels(model)
        assert sum(counts.values()) == 14
        assert relative_error(model(idx)[0], ref) <= 2e-2
