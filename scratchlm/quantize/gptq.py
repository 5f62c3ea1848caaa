"""GPTQ (Frantar et al. 2022): quantize a weight column by column, pushing each column's rounding error
onto the columns not yet quantized, weighted by the inverse Hessian of the layer's output error.

Pure functions on one weight W (out, in) and H = 2 XᵀX / n from calibration inputs X (n, in): the
loss ||X Wᵀ - X Ŵᵀ||² is a quadratic in W whose Hessian is H, the same for every output row, so
one inverse serves all rows. Quantizing column j with error e_j = (w_j - q_j) / [H⁻¹]_jj and
updating the remaining columns by -e_j [H⁻¹]_j,j+1: is the optimal (OBS) compensation; GPTQ takes
the columns in a fixed order (so one H⁻¹ is shared by all rows) and reads the successive inverses
off the upper Cholesky factor U of H⁻¹ (row j of U, divided by U_jj, is what the step needs).

Choices, as in the paper unless said:
- dampening: H += percdamp · mean(diag H) · I (default 1%), which keeps the Cholesky well
  conditioned; a diagonal entry that is 0 (an input never active in calibration) is set to 1. Unlike
  the reference implementation we do not zero the weights of such inputs: data outside calibration
  may use them.
- lazy batch updates: columns are processed in blocks of `block_size` (128); within a block the
  updates touch only the block, and the block's accumulated error is applied to all later columns
  in one matmul at its end (the same arithmetic, done cache-friendly).
- groups: the scale of a group of `group_size` columns is computed from the (already error-updated)
  weights when its first column comes up, as GPTQ does; `static_groups` computes every scale from
  the original weights up front instead. The block size is a multiple of the group size, so a
  group's weights are all up to date at its start. The group size must divide the width (refused
  otherwise: a padded last group would be scaled on columns that do not exist).
- act-order: columns are processed by decreasing diag(H) (the inputs with the most energy first,
  while many columns are left to absorb their error) and the result un-permuted. Our storage has
  contiguous groups (no per-column group index), so act-order uses static groups.
- the loop runs in float64 (H, its Cholesky factors and the updates); each rounding step is the
  format's own fp32 rounding (`scratchlm.model.quant.grid_round`), so with a diagonal H (no error
  to propagate) the result is bit-identical to round-to-nearest.

Any weight-only format of scratchlm/model/quant.py works: int4 and nf4 (grouped), int8 and fp8
(one scale per row, from the original weights).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scratchlm.errors import UserError
from scratchlm.model.quant import (
    GROUPED,
    absmax_scales,
    check_format,
    check_group_size,
    dequantize_weight,
    grid_round,
    pack_codes,
    quantize_weight,
)


@dataclass
class Quantized:
    """A quantized weight: `qweight` and `scales` in QuantLinear storage, `weight` (out, in) fp32 the
    values they stand for."""

    qweight: torch.Tensor
    scales: torch.Tensor
    weight: torch.Tensor


def hessian(x: torch.Tensor) -> torch.Tensor:
    """Calibration inputs x (..., in) -> H = 2 XᵀX / n (in, in), float64."""
    x = x.reshape(-1, x.size(-1)).double()
    return 2.0 * x.T @ x / max(x.size(0), 1)


def output_error(x: torch.Tensor, w: torch.Tensor, w_hat: torch.Tensor) -> float:
    """||X Wᵀ - X Ŵᵀ||_F / ||X Wᵀ||_F on inputs x (n, in), in float64: the error every method here is
    judged by."""
    x = x.reshape(-1, x.size(-1)).double()
    ref = x @ w.double().T
    return ((x @ w_hat.double().T - ref).norm() / ref.norm().clamp_min(1e-300)).item()


def check_width(in_features: int, fmt: str, group_size: int, name: str = "the weight") -> None:
    if fmt in GROUPED:
        check_group_size(group_size)
        if in_features % group_size:
            raise UserError(f"group size {group_size} does not divide the input width {in_features} of {name}",
                            fix="pick a group size that divides every quantized layer's input width, e.g. 32")


def rtn(w: torch.Tensor, fmt: str = "int4", group_size: int = 64) -> Quantized:
    """Round-to-nearest (`scratchlm.model.quant.quantize_weight`), in the same terms as `gptq`."""
    check_width(w.size(1), fmt, group_size)
    qweight, scales = quantize_weight(w, fmt, group_size)
    return Quantized(qweight, scales, dequantize_weight(qweight, scales, fmt, w.size(1)))


def gptq(w: torch.Tensor, h: torch.Tensor, fmt: str = "int4", group_size: int = 64, *, percdamp: float = 0.01,
         block_size: int = 128, act_order: bool = False, static_groups: bool = False) -> Quantized:
    """Quantize w (out, in) against the Hessian h (in, in) (see the module docstring)."""
    check_format(fmt)
    out, n = w.shape
    check_width(n, fmt, group_size)
    gs = group_size if fmt in GROUPED else n  # per-row formats: one "group" spanning the row
    block_size = max(block_size // gs, 1) * gs if gs < n else n
    w = w.detach().double().clone()
    h = h.detach().double().clone()
    if h.shape != (n, n):
        raise ValueError(f"Hessian {tuple(h.shape)} does not fit a weight of {n} inputs")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    static_groups = static_groups or act_order or gs == n
    scales = torch.stack([absmax_scales(w[:, g:g + gs].abs().amax(dim=1), fmt) for g in range(0, n, gs)], dim=1) \
        if static_groups else torch.empty(out, n // gs, dtype=torch.float16 if fmt in GROUPED else torch.float32)
    perm = torch.argsort(torch.diag(h), descending=True, stable=True) if act_order else torch.arange(n)
    w, h = w[:, perm], h[perm][:, perm]
    h += percdamp * torch.diag(h).mean() * torch.eye(n, dtype=torch.float64)
    try:
        u = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)  # H⁻¹ = UᵀU
    except torch.linalg.LinAlgError:
        raise UserError("GPTQ: the calibration Hessian is not positive definite even after dampening",
                        fix="use more calibration text, or a larger dampening") from None
    codes = torch.empty(out, n, dtype=torch.float8_e4m3fn if fmt == "fp8" else torch.int8)
    q = torch.zeros_like(w)
    for b0 in range(0, n, block_size):
        b1 = min(b0 + block_size, n)
        w_blk, err = w[:, b0:b1].clone(), torch.zeros(out, b1 - b0, dtype=torch.float64)  # (out, B)
        u_blk = u[b0:b1, b0:b1]
        for i in range(b1 - b0):
            j = b0 + i  # position in processing order; perm[j] is the original column
            if not static_groups and j % gs == 0:  # a new group starts: its scale from the updated weights
                scales[:, j // gs] = absmax_scales(w_blk[:, i:i + gs].abs().amax(dim=1).float(), fmt)
            s = scales[:, int(perm[j]) // gs]
            c, v = grid_round(w_blk[:, i:i + 1].float(), s, fmt)  # (out, 1)
            codes[:, j], q[:, j] = c[:, 0], v[:, 0].double()
            e = (w_blk[:, i] - q[:, j]) / u_blk[i, i]  # (out,)
            w_blk[:, i:] -= e[:, None] * u_blk[i, i:][None, :]
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]  # the block's error, onto every later column at once
    inv = torch.argsort(perm)
    codes, q = codes[:, inv], q[:, inv]
    if fmt not in GROUPED:
        scales = scales[:, 0]  # (out,): one scale per row
    return Quantized(pack_codes(codes, fmt), scales, q.float())
