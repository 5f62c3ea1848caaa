"""AWQ-style activation-aware scaling (Lin et al. 2023): protect the weights that meet large inputs.

A weight column j multiplies input channel j; scaling the column up by s_j before quantizing (and the
input down by s_j) shrinks that column's relative rounding error when s_j is large, at the cost of
coarser steps for its group neighbours. AWQ picks s = mean|x|^alpha (channels with larger average
inputs get larger scales), searching alpha on a grid by the layer's output error on calibration
inputs. The search here is over alpha in {0, 1/grid, ..., 1}: alpha = 0 is s = 1, plain
round-to-nearest, so the result is never worse than RTN on the calibration data (by construction,
and asserted in tests). s is normalised by sqrt(max s · min s) so that it stays around 1, as AWQ does.

Where 1/s goes: AWQ folds it into the preceding operation (a norm's weight, or the previous linear).
We keep it in the layer instead, as `QuantLinear.in_scale` (in,): the layer computes
x · (Q(W diag(s)) diag(1/s))ᵀ exactly, whatever precedes it, for in · 4 bytes. Left out: AWQ's
search over weight clipping ranges, and sharing one scale between layers fed by the same norm.
"""

from __future__ import annotations

import torch

from scratchlm.model.quant import dequantize_weight, quantize_weight
from scratchlm.quantize.gptq import Quantized, check_width, output_error


def awq_scaled(w: torch.Tensor, s: torch.Tensor, fmt: str, group_size: int) -> Quantized:
    """Quantize w (out, in) as Q(w · diag(s)); `weight` is what the layer computes with:
    Q(w · diag(s)) · diag(1 / s) (fp32, as `QuantLinear.dequantized_weight`)."""
    s = s.float()
    qweight, scales = quantize_weight(w.float() * s[None, :], fmt, group_size)
    return Quantized(qweight, scales, dequantize_weight(qweight, scales, fmt, w.size(1)) / s[None, :])


def awq(w: torch.Tensor, x: torch.Tensor, fmt: str = "int4", group_size: int = 64, grid: int = 20
        ) -> tuple[Quantized, torch.Tensor, float]:
    """Search the input scale for w (out, in) on calibration inputs x (n, in).

    Returns (the quantized weight, the input scale s (in,) fp32, the chosen alpha)."""
    check_width(w.size(1), fmt, group_size)
    x = x.reshape(-1, x.size(-1))
    mean_abs = x.abs().float().mean(dim=0)  # (in,)
    best = None
    for k in range(grid + 1):
        alpha = k / grid
        s = mean_abs.pow(alpha).clamp_min(1e-4)  # alpha = 0: exactly 1 everywhere
        s = s / (s.max() * s.min()).sqrt()
        q = awq_scaled(w, s, fmt, group_size)
        err = output_error(x, w, q.weight)
        if best is None or err < best[0]:
            best = (err, q, s, alpha)
    _, q, s, alpha = best
    return q, s, alpha
