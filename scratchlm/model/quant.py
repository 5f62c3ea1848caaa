"""Weight-only quantization of linear layers (a model part): int8 per output row, int4 per group of inputs.

A weight W (out, in) is stored as small integer codes q and floating-point scales s, and
dequantized on the fly as W ≈ q · s. Activations stay in floating point, so this saves memory
(and, on memory-bound decoding, bandwidth), not arithmetic: `QuantLinear.forward` rebuilds the
weight in the input's dtype and calls an ordinary matmul.

Formats, both symmetric "absmax" (the zero weight is exactly representable, no zero point):
- int8: one fp32 scale per output row, s = max|W_row| / 127, q = round(W / s) in [-127, 127]
  (-128 is never used, so the grid is symmetric). The scales are out·4 bytes: negligible.
  This is the weight half of LLM.int8() (Dettmers et al. 2022) without its outlier columns.
- int4: the input dimension is cut into groups of `group_size` (64 by default) and each
  (row, group) gets its own scale, s = max|W_group| / 7, q = round(W / s) in [-7, 7]. Codes are
  stored offset by 8 as unsigned nibbles, two per byte (even column in the low nibble), so the
  nibble range [0, 15] holds [-8, 7]; -8 is readable but never produced, which keeps the grid
  symmetric at the cost of one of 16 levels. Groups bound the damage of an outlier weight to its
  own 64 neighbours (as GPTQ and AWQ do). Scales are fp16, rounded *up* to the next fp16 value so
  that no code ever clips: every weight's error stays at most s / 2. 4 bits + 16 / group_size bits
  per weight: 4.25 bits at group_size 64, about 1/7.5 of fp32.
  An input dimension that is not a multiple of `group_size` is padded with zero columns (which
  quantize to the code 0 exactly) and sliced off again when dequantizing; the padding costs
  memory only in the last group of each row.

Why symmetric rather than asymmetric min/max: one scale per group instead of a scale and an
offset, an exact zero, and trained weights are nearly symmetric around 0 anyway.

`QuantLinear` keeps the codes and scales as buffers, not parameters: a quantized weight is frozen
(QLoRA trains low-rank adapters on top of it, scratchlm/model/lora.py). Its backward recomputes the
dequantized weight instead of saving it, so training through a quantized layer never holds a full
precision copy of the weight per layer. `quantize_model` swaps a model's nn.Linear layers for
QuantLinear ones (`dequantize_model` swaps them back, e.g. to merge a QLoRA model); an output
head tied to the token embedding is left alone (the embedding stays full precision, and quantizing
the shared matrix would quantize the embedding too).

Left out: NF4 and double quantization of the scales (QLoRA, Dettmers et al. 2023), error-
compensating quantizers (GPTQ, AWQ), activation quantization (SmoothQuant), and integer matmul
kernels. The 3-D expert tensors of the MoE model are parameters, not nn.Linear, and stay full
precision (its router `gate` is skipped by default too: routing is a discrete choice, and a small
error in its logits changes which experts a token visits).
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import UserError

INT8_MAX = 127  # symmetric int8 grid [-127, 127]
INT4_MAX = 7  # symmetric int4 grid [-7, 7] (the nibble also holds -8, never produced)
DEFAULT_SKIP = ("lm_head", "output", "wte", "tok_embeddings", "gate")


def name_matches(name: str, patterns: Iterable[str]) -> bool:
    """Whether a module name (e.g. `h.0.attn.c_attn`) matches any pattern.

    A pattern is an fnmatch glob matched against the whole name or against any dotted suffix of it
    (`c_attn`, `attn.c_attn` and `*c_attn` all match `h.0.attn.c_attn`; `attn` does not), or a
    regular expression prefixed with `re:`, matched against the whole name."""
    for p in patterns:
        if p.startswith("re:"):
            if re.fullmatch(p[3:], name):
                return True
        elif fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, "*." + p):
            return True
    return False


# -- int8: per output row ----------------------------------------------------------------------
def quantize_int8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> codes q int8 (out, in) in [-127, 127] and scales fp32 (out,), w ≈ q · s."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    absmax = w.abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, absmax / INT8_MAX, torch.ones_like(absmax))  # an all-zero row: any scale works
    q = torch.round(w / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return q, scale


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """codes (out, in) and scales (out,) -> weight (out, in) in `dtype` (computed in fp32)."""
    return (q.float() * scale.float()[:, None]).to(dtype)


# -- int4: per group of inputs, two codes per byte ---------------------------------------------
def check_group_size(group_size: int) -> None:
    if group_size < 2 or group_size % 2:
        raise UserError(f"quantization group_size={group_size} must be a positive even number",
                        fix="use e.g. 32, 64 or 128")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes in [-8, 7], shape (..., n) with n even -> uint8 (..., n / 2).

    Each code is offset by 8 to a nibble in [0, 15]; column 2j goes to the low nibble of byte j
    and column 2j+1 to the high one."""
    if codes.size(-1) % 2:
        raise ValueError(f"pack_int4 needs an even number of columns, got {codes.size(-1)}")
    if codes.numel() and (codes.min() < -8 or codes.max() > 7):
        raise ValueError("int4 codes must lie in [-8, 7]")
    nib = (codes.to(torch.int16) + 8).to(torch.uint8)
    return nib[..., 0::2] | (nib[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (..., m) -> signed int8 codes (..., 2m), the inverse of `pack_int4`."""
    lo, hi = packed & 0x0F, packed >> 4
    nib = torch.stack((lo, hi), dim=-1).flatten(-2)  # (..., m, 2) -> (..., 2m): lo, hi, lo, hi, ...
    return (nib.to(torch.int16) - 8).to(torch.int8)


def _fp16_ceil(x: torch.Tensor) -> torch.Tensor:
    """Positive fp32 values -> the smallest fp16 values >= them (so a rounded scale never shrinks,
    and w / s never leaves the code range)."""
    h = x.to(torch.float16)
    h = torch.where(h.float() < x, torch.nextafter(h, torch.full_like(h, float("inf"))), h)
    if not torch.isfinite(h).all():
        raise UserError(f"a weight of magnitude {x.max().item() * INT4_MAX:.3g} is beyond fp16 scales",
                        fix="int4 supports |w| < 4.5e5; check the model for diverged weights")
    return h


def quantize_int4(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> packed uint8 (out, in_padded / 2) and fp16 scales (out, in_padded / group_size).

    Symmetric absmax per (row, group): s = max|w| / 7, codes round(w / s) in [-7, 7].
    in_padded is `in` rounded up to a multiple of group_size (zero columns)."""
    check_group_size(group_size)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    out = w.size(0)
    pad = -w.size(1) % group_size
    if pad:
        w = F.pad(w, (0, pad))  # zeros: code 0 exactly, sliced off by dequantize_int4
    g = w.view(out, -1, group_size)  # (out, G, group_size)
    absmax = g.abs().amax(dim=-1)  # (out, G)
    scales = _fp16_ceil(torch.where(absmax > 0, absmax / INT4_MAX, torch.ones_like(absmax)))
    codes = torch.round(g / scales.float()[..., None]).clamp(-8, INT4_MAX).to(torch.int8)
    return pack_int4(codes.view(out, -1)), scales


def dequantize_int4(
    packed: torch.Tensor, scales: torch.Tensor, in_features: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """packed (out, in_padded / 2) and scales (out, G) -> weight (out, in_features) in `dtype`.

    The group size is in_padded / G; `in_features` (default in_padded) drops the padding."""
    out, n_groups = scales.shape
    codes = unpack_int4(packed).view(out, n_groups, -1)  # (out, G, group_size)
    w = (codes.float() * scales.float()[..., None]).view(out, -1)  # (out, in_padded)
    return w[:, :in_features].to(dtype) if in_features is not None else w.to(dtype)


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, bits: int, in_features: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Either format back to a (out, in_features) weight in `dtype`."""
    if bits == 8:
        return dequantize_int8(qweight, scales, dtype)
    if bits == 4:
        return dequantize_int4(qweight, scales, in_features, dtype)
    raise UserError(f"quantization bits={bits} is unsupported", fix="use 8 or 4")


# -- the layer -----------------------------------------------------------------------------------
class _DequantMatmul(torch.autograd.Function):
    """y = x @ W^T with W dequantized in forward and again in backward, so autograd saves only the
    (small) codes, not a full-precision weight. No gradient for W: it is frozen."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer: QuantLinear) -> torch.Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantized_weight(x.dtype))  # (..., in) -> (..., out)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None
        return grad @ ctx.layer.dequantized_weight(grad.dtype), None  # (..., out) @ (out, in) -> (..., in)


class QuantLinear(nn.Module):
    """A frozen linear layer with an int8 or int4 weight (see the module docstring).

    Buffers: `qweight` (int8 (out, in), or uint8 (out, in_padded / 2) for int4), `scales` (fp32
    (out,), or fp16 (out, G) for int4), `bias` (fp32 (out,) or None). `group_size` is 0 for int8
    (one scale per row). `model.half()` and friends cast the scales and bias too; the dequantized
    weight is computed in fp32 either way and then cast to the input's dtype."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, bits: int = 8, group_size: int = 64,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise UserError(f"quantization bits={bits} is unsupported", fix="use 8 or 4")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        if bits == 8:
            self.group_size = 0
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.ones(out_features, device=device))
        else:
            check_group_size(group_size)
            self.group_size = group_size
            padded = -(-in_features // group_size) * group_size
            self.register_buffer("qweight", torch.full((out_features, padded // 2), 0x88, dtype=torch.uint8,
                                                       device=device))  # 0x88: two zero codes
            self.register_buffer("scales", torch.ones(out_features, padded // group_size, dtype=torch.float16,
                                                      device=device))
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 64) -> QuantLinear:
        """Quantize an nn.Linear (its weight and bias are copied, the original is left as it was)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                    device=linear.weight.device)
        w = linear.weight.detach()
        q, s = quantize_int8(w) if bits == 8 else quantize_int4(w, group_size)
        layer.qweight.copy_(q)
        layer.scales.copy_(s)
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) as the codes and scales represent it."""
        return dequantize(self.qweight, self.scales, self.bits, self.in_features, dtype)

    def to_linear(self) -> nn.Linear:
        """A full-precision nn.Linear holding the dequantized weight (e.g. to merge LoRA into it)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _DequantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        grouping = "per-row" if self.bits == 8 else f"group_size={self.group_size}"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"bits={self.bits}, {grouping}")


# -- whole models --------------------------------------------------------------------------------
def quantize_model(
    model: nn.Module, bits: int = 8, group_size: int = 64, skip: Iterable[str] = DEFAULT_SKIP
) -> int:
    """Replace every nn.Linear of `model` (in place) by a QuantLinear, except those whose name
    matches a `skip` pattern (see `name_matches`) and those whose weight is shared with another
    module (a tied output head). Returns how many were replaced."""
    if bits not in (4, 8):
        raise UserError(f"quantization bits={bits} is unsupported", fix="use 8 or 4")
    if bits == 4:
        check_group_size(group_size)
    skip = tuple(skip)
    # how many modules hold each parameter: 2 for a head tied to the embedding
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    names = [name for name, m in model.named_modules()
             if name and isinstance(m, nn.Linear) and owners[id(m.weight)] == 1 and not name_matches(name, skip)]
    for name in names:
        model.set_submodule(name, QuantLinear.from_linear(model.get_submodule(name), bits, group_size))
    return len(names)


def dequantize_model(model: nn.Module) -> int:
    """Replace every QuantLinear of `model` (in place) by a full-precision nn.Linear holding its
    dequantized weight (`QuantLinear.to_linear`): the inverse of `quantize_model` up to its rounding.
    Returns how many were replaced."""
    names = [name for name, m in model.named_modules() if isinstance(m, QuantLinear)]
    for name in names:
        model.set_submodule(name, model.get_submodule(name).to_linear())
    return len(names)


@dataclass
class WeightBytes:
    """Memory of a model's weights, each shared tensor once."""

    quantized: int  # codes + scales of every QuantLinear
    quantized_fp32: int  # what those same weights would take in fp32 (out · in · 4)
    other: int  # every parameter, plus QuantLinear biases, in their own dtypes

    @property
    def total(self) -> int:
        return self.quantized + self.other

    @property
    def ratio(self) -> float:
        """Quantized bytes over their fp32 size (about 0.25 for int8, 0.133 for int4 / group 64)."""
        return self.quantized / self.quantized_fp32 if self.quantized_fp32 else 1.0


def weight_bytes(model: nn.Module) -> WeightBytes:
    quantized = quantized_fp32 = 0
    other = sum(p.numel() * p.element_size() for p in model.parameters())  # parameters() lists a tied matrix once
    for m in model.modules():
        if isinstance(m, QuantLinear):
            quantized += m.qweight.numel() * m.qweight.element_size() + m.scales.numel() * m.scales.element_size()
            quantized_fp32 += m.in_features * m.out_features * 4
            if m.bias is not None:
                other += m.bias.numel() * m.bias.element_size()
    return WeightBytes(quantized, quantized_fp32, other)
