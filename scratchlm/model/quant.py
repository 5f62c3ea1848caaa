"""Weight-only quantization of linear layers (a model part): int8 and fp8 per output row, int4 and NF4 per
group of inputs.

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

- nf4: QLoRA's NormalFloat (Dettmers et al. 2023): the 16 levels are quantiles of a standard normal
  (8 positive, 7 negative, and an exact 0), scaled to [-1, 1]; each (row, group) is divided by its
  absmax (an fp16 scale, rounded up) and each weight takes the nearest level. Same nibble packing
  and padding as int4 (the nibble is the level's index). Better than int4's uniform grid for
  normally distributed weights, slower to dequantize (a table lookup).
- fp8: E4M3 (`torch.float8_e4m3fn`: 4 exponent bits, 3 mantissa bits, largest value 448) with one
  fp32 scale per output row, s = max|W_row| / 448; the cast rounds to nearest. A floating grid:
  relative error about 2^-4 for every weight, whatever its size within the row.

Why symmetric rather than asymmetric min/max: one scale per group instead of a scale and an
offset, an exact zero, and trained weights are nearly symmetric around 0 anyway.

`QuantLinear` keeps the codes and scales as buffers, not parameters: a quantized weight is frozen
(QLoRA trains low-rank adapters on top of it, scratchlm/model/lora.py). Its backward recomputes the
dequantized weight instead of saving it, so training through a quantized layer never holds a full
precision copy of the weight per layer. `quantize_model` swaps a model's nn.Linear layers for
QuantLinear ones (`dequantize_model` swaps them back, e.g. to merge a QLoRA model); an output
head tied to the token embedding is left alone (the embedding stays full precision, and quantizing
the shared matrix would quantize the embedding too).

A layer may also hold a per-input-channel scale `in_scale` (in,): its weight is then
Q(W · diag(s)) · diag(1 / s), exactly the AWQ form (Lin et al. 2023) with 1/s folded into the
dequantized weight, so a search that picked s measured exactly what the layer computes.
Error-compensating quantizers (GPTQ, AWQ) live in the stage scratchlm/quantize/; they produce the
codes and scales of these same formats.

A quantized model is a checkpoint: `quant_record` describes its quantized layers (name -> format,
group size, whether it has an input scale) as JSON, and `apply_quant_record` rebuilds that
structure (empty QuantLinear layers) in a freshly built model before the packed buffers are loaded.
The codes, scales and input scales keep their storage dtypes when the model is cast
(`model.half()`, `model.to(torch.bfloat16)` move them but do not convert them: the format is the
storage); the bias follows the cast.

Left out: double quantization of the scales (QLoRA), activation quantization (SmoothQuant).
The 3-D expert tensors of the MoE model are parameters, not nn.Linear, and stay full precision
(its router `gate` is skipped by default too: routing is a discrete choice, and a small error in
its logits changes which experts a token visits).
"""

from __future__ import annotations

import fnmatch
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import UserError

INT8_MAX = 127  # symmetric int8 grid [-127, 127]
INT4_MAX = 7  # symmetric int4 grid [-7, 7] (the nibble also holds -8, never produced)
FP8_MAX = 448.0  # the largest finite float8_e4m3fn
FORMATS = ("int8", "int4", "nf4", "fp8")
FORMAT_BITS = {"int8": 8, "fp8": 8, "int4": 4, "nf4": 4}
GROUPED = ("int4", "nf4")  # formats with one scale per (row, group); the others have one per row


def _nf4_levels() -> torch.Tensor:
    """QLoRA's 16 NormalFloat levels, ascending in [-1, 1]: standard-normal quantiles at 8 evenly
    spaced probabilities from 0.5 up to `p` (the positive half), 7 down from 1 - p (the negative half,
    one fewer so that 0 is exact), scaled by the largest. p = 0.9677 is QLoRA's choice, the mean of
    1 - 1/(2·15) and 1 - 1/(2·16)."""
    p = 0.9677083
    pos = torch.special.ndtri(torch.linspace(p, 0.5, 9, dtype=torch.float64)[:-1])  # 8 values > 0
    neg = -torch.special.ndtri(torch.linspace(p, 0.5, 8, dtype=torch.float64)[:-1])  # 7 values < 0
    levels = torch.cat([neg, torch.zeros(1, dtype=torch.float64), pos]).sort().values
    return (levels / levels.abs().max()).float()


NF4_LEVELS = _nf4_levels()  # (16,) fp32, index 7 is 0.0
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


# -- nf4: per group of inputs, a normal-float level index per nibble ------------------------------
def _group_absmax_scales(w: torch.Tensor, group_size: int, top: float) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> (w padded and viewed (out, G, group_size), fp16 scales (out, G) = absmax / top,
    rounded up so that |w / s| <= top)."""
    check_group_size(group_size)
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    pad = -w.size(1) % group_size
    if pad:
        w = F.pad(w, (0, pad))  # zeros: level 0 exactly, sliced off when dequantizing
    g = w.view(w.size(0), -1, group_size)  # (out, G, group_size)
    absmax = g.abs().amax(dim=-1)  # (out, G)
    return g, _fp16_ceil(torch.where(absmax > 0, absmax / top, torch.ones_like(absmax)))


def nf4_codes(x: torch.Tensor) -> torch.Tensor:
    """Values in [-1, 1] -> the index (int8, 0..15) of the nearest NF4 level."""
    levels = NF4_LEVELS.to(x.device)
    mids = (levels[1:] + levels[:-1]) / 2  # (15,) decision boundaries
    return torch.bucketize(x.contiguous(), mids).to(torch.int8)


def quantize_nf4(w: torch.Tensor, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> packed uint8 (out, in_padded / 2) level indices and fp16 absmax scales (out, G)."""
    g, scales = _group_absmax_scales(w, group_size, 1.0)
    idx = nf4_codes(g / scales.float()[..., None])  # (out, G, group_size) in 0..15
    return pack_int4(idx.view(g.size(0), -1) - 8), scales  # pack_int4 stores code + 8: the index itself


def dequantize_nf4(
    packed: torch.Tensor, scales: torch.Tensor, in_features: int | None = None, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """packed (out, in_padded / 2) and scales (out, G) -> weight (out, in_features) in `dtype`."""
    out, n_groups = scales.shape
    idx = (unpack_int4(packed).long() + 8).view(out, n_groups, -1)  # (out, G, group_size)
    w = (NF4_LEVELS.to(packed.device)[idx] * scales.float()[..., None]).view(out, -1)
    return w[:, :in_features].to(dtype) if in_features is not None else w.to(dtype)


# -- fp8: E4M3 per output row --------------------------------------------------------------------
def quantize_fp8(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, in) -> float8_e4m3fn values (out, in) and fp32 scales (out,), w ≈ q · s, |q| <= 448."""
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(w.shape)}")
    w = w.detach().float()
    absmax = w.abs().amax(dim=1)  # (out,)
    scale = torch.where(absmax > 0, absmax / FP8_MAX, torch.ones_like(absmax))
    q = (w / scale[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q, scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return (q.float() * scale.float()[:, None]).to(dtype)


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"quantization format {fmt!r} is unsupported", fix=f"use one of {', '.join(FORMATS)}")


def quantize_weight(w: torch.Tensor, fmt: str, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest in any format: (storage codes, scales) as `QuantLinear` holds them."""
    check_format(fmt)
    if fmt == "int8":
        return quantize_int8(w)
    if fmt == "fp8":
        return quantize_fp8(w)
    return quantize_int4(w, group_size) if fmt == "int4" else quantize_nf4(w, group_size)


def dequantize_weight(
    qweight: torch.Tensor, scales: torch.Tensor, fmt: str, in_features: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Any format back to a (out, in_features) weight in `dtype` (computed in fp32)."""
    check_format(fmt)
    if fmt == "int8":
        return dequantize_int8(qweight, scales, dtype)
    if fmt == "fp8":
        return dequantize_fp8(qweight, scales, dtype)
    if fmt == "int4":
        return dequantize_int4(qweight, scales, in_features, dtype)
    return dequantize_nf4(qweight, scales, in_features, dtype)


# -- the same rounding, one column block at a time (for error-compensating quantizers) -------------
GRID_TOP = {"int8": float(INT8_MAX), "int4": float(INT4_MAX), "nf4": 1.0, "fp8": FP8_MAX}


def absmax_scales(absmax: torch.Tensor, fmt: str) -> torch.Tensor:
    """The scale each format gives a row (or group) of largest magnitude `absmax`, in its storage
    dtype: fp32 for int8 and fp8, fp16 rounded up for int4 and nf4 (as the quantize_* functions)."""
    s = torch.where(absmax > 0, absmax.float() / GRID_TOP[fmt], torch.ones_like(absmax, dtype=torch.float32))
    return _fp16_ceil(s) if fmt in GROUPED else s


def grid_round(w: torch.Tensor, scale: torch.Tensor, fmt: str) -> tuple[torch.Tensor, torch.Tensor]:
    """w (out, k) fp32 and one scale per row (out,) -> (codes (out, k), the values they stand for
    (out, k) fp32). Codes: int8 in [-127, 127] (int8), int8 in [-8, 7] (int4), int8 level indices
    0..15 (nf4), float8_e4m3fn (fp8). Values beyond the grid clip (RTN never produces them; GPTQ's
    error feedback can). For weights RTN would see, bit-identical to the quantize_* functions."""
    s = scale.float()[:, None]
    if fmt == "int8":
        codes = torch.round(w / s).clamp(-INT8_MAX, INT8_MAX)
        return codes.to(torch.int8), codes * s
    if fmt == "int4":
        codes = torch.round(w / s).clamp(-8, INT4_MAX)
        return codes.to(torch.int8), codes * s
    if fmt == "nf4":
        idx = nf4_codes((w / s).clamp(-1.0, 1.0))
        return idx, NF4_LEVELS.to(w.device)[idx.long()] * s
    check_format(fmt)
    codes = (w / s).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return codes, codes.float() * s


def pack_codes(codes: torch.Tensor, fmt: str) -> torch.Tensor:
    """`grid_round`'s codes (out, in) -> `QuantLinear.qweight` storage (nibbles for int4 and nf4)."""
    if fmt == "int4":
        return pack_int4(codes)
    if fmt == "nf4":
        return pack_int4(codes - 8)
    return codes


def dequantize(
    qweight: torch.Tensor, scales: torch.Tensor, bits: int, in_features: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """int8 (bits=8) or int4 (bits=4) back to a (out, in_features) weight in `dtype`."""
    if bits not in (4, 8):
        raise UserError(f"quantization bits={bits} is unsupported", fix="use 8 or 4")
    return dequantize_weight(qweight, scales, "int8" if bits == 8 else "int4", in_features, dtype)


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
    """A frozen linear layer with a quantized weight (see the module docstring).

    Buffers: `qweight` (int8 (out, in) for int8, float8_e4m3fn (out, in) for fp8, uint8
    (out, in_padded / 2) for int4 and nf4), `scales` (fp32 (out,) for int8 and fp8, fp16 (out, G)
    for int4 and nf4), `in_scale` (fp32 (in,), only when built with `in_scale=True`), `bias`
    (fp32 (out,) or None). `group_size` is 0 for the per-row formats. `bits` (8 or 4) picks int8 or
    int4 when `fmt` is not given. The dequantized weight is computed in fp32 and then cast to the
    input's dtype."""

    def __init__(
        self, in_features: int, out_features: int, bias: bool = True, bits: int = 8, group_size: int = 64,
        device: torch.device | str | None = None, fmt: str | None = None, in_scale: bool = False,
    ) -> None:
        super().__init__()
        if fmt is None:
            if bits not in (4, 8):
                raise UserError(f"quantization bits={bits} is unsupported", fix="use 8 or 4")
            fmt = "int8" if bits == 8 else "int4"
        check_format(fmt)
        self.in_features, self.out_features, self.fmt, self.bits = in_features, out_features, fmt, FORMAT_BITS[fmt]
        if fmt in GROUPED:
            check_group_size(group_size)
            self.group_size = group_size
            padded = -(-in_features // group_size) * group_size
            fill = 0x88 if fmt == "int4" else 0x77  # two zero codes: int4 code 0, nf4 level 7 (0.0)
            self.register_buffer("qweight", torch.full((out_features, padded // 2), fill, dtype=torch.uint8,
                                                       device=device))
            self.register_buffer("scales", torch.ones(out_features, padded // group_size, dtype=torch.float16,
                                                      device=device))
        else:
            self.group_size = 0
            dtype = torch.int8 if fmt == "int8" else torch.float8_e4m3fn
            self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=dtype, device=device))
            self.register_buffer("scales", torch.ones(out_features, device=device))
        self.register_buffer("in_scale", torch.ones(in_features, device=device) if in_scale else None)
        self.register_buffer("bias", torch.zeros(out_features, device=device) if bias else None)
        self.kernel = "reference"  # the inference matmul path, see `use_kernel`

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int = 8, group_size: int = 64, fmt: str | None = None,
                    in_scale: torch.Tensor | None = None) -> QuantLinear:
        """Round-to-nearest quantize an nn.Linear (its weight and bias are copied, the original is left
        as it was). `in_scale` (in,): quantize W · diag(in_scale) instead, and divide it out again when
        dequantizing (AWQ's scaling)."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, bits, group_size,
                    device=linear.weight.device, fmt=fmt, in_scale=in_scale is not None)
        w = linear.weight.detach().float()
        if in_scale is not None:
            layer.in_scale.copy_(in_scale)
            w = w * layer.in_scale[None, :]
        layer.set_codes(*quantize_weight(w, layer.fmt, group_size))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias.detach().float())
        return layer

    def set_codes(self, qweight: torch.Tensor, scales: torch.Tensor) -> None:
        """Load codes and scales computed elsewhere (GPTQ), in this layer's storage format."""
        fits = qweight.shape == self.qweight.shape and qweight.dtype == self.qweight.dtype
        if not fits or scales.shape != self.scales.shape:
            raise ValueError(f"codes {tuple(qweight.shape)} {qweight.dtype} / scales {tuple(scales.shape)} do not fit "
                             f"{self.fmt} storage {tuple(self.qweight.shape)} / {tuple(self.scales.shape)}")
        self.qweight.copy_(qweight)
        self.scales.copy_(scales)

    def _apply(self, fn, recurse=True):
        # The codes and scales are the storage format: a cast of the model (half(), to(bfloat16))
        # must not convert them, only a move to another device may. fn applied to an empty probe
        # tells which device it moves to.
        keep = {k: b for k, b in self._buffers.items() if k in ("qweight", "scales", "in_scale") and b is not None}
        super()._apply(fn, recurse)
        for k, b in keep.items():
            device = fn(torch.empty(0, device=b.device)).device
            self._buffers[k] = b.to(device)
        return self

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The weight (out, in) as the codes and scales (and the input scale) represent it."""
        w = dequantize_weight(self.qweight, self.scales, self.fmt, self.in_features)
        if self.in_scale is not None:
            w = w / self.in_scale.float()[None, :]
        return w.to(dtype)

    def to_linear(self) -> nn.Linear:
        """A full-precision nn.Linear holding the dequantized weight (e.g. to merge LoRA into it)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                           device=self.qweight.device)
        with torch.no_grad():
            linear.weight.copy_(self.dequantized_weight())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # -- matmul paths: "reference" (dequantize to fp32, cast to the input's dtype, F.linear) serves
    # training and is what every other path is tested against; the others serve inference only (no
    # gradient) and are picked per machine by scratchlm/model/qkernels.py.
    KERNELS = {"int8": ("reference", "dequant_bf16", "int8pack"), "fp8": ("reference", "dequant_bf16"),
               "int4": ("reference", "dequant_bf16", "int4pack"), "nf4": ("reference", "dequant_bf16")}

    def use_kernel(self, kernel: str) -> None:
        """Switch the inference matmul path (`KERNELS[fmt]`); int4pack builds PyTorch's packed CPU
        layout (a non-persistent buffer: the checkpoint keeps our own format)."""
        if kernel not in self.KERNELS[self.fmt]:
            raise ValueError(f"kernel {kernel!r} is not available for {self.fmt} (have {self.KERNELS[self.fmt]})")
        self.kernel = kernel
        if kernel == "int4pack" and getattr(self, "int4pack", None) is None:
            codes = (unpack_int4(self.qweight).to(torch.int32) + 8).contiguous()  # (out, in_padded) nibbles 0..15
            self.register_buffer("int4pack", torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1),
                                 persistent=False)
            sz = torch.stack([self.scales.float().T, torch.zeros_like(self.scales.float().T)], dim=-1)
            self.register_buffer("int4pack_sz", sz.contiguous(), persistent=False)  # (G, out, 2): scale, zero

    def _fast(self, x: torch.Tensor) -> torch.Tensor:
        kernel = self.kernel
        if self.in_scale is not None:
            x = x / self.in_scale.to(x.dtype)
        if kernel == "dequant_bf16":  # dequantize straight into bf16, bf16 matmul
            if self.fmt in ("int8", "fp8"):
                w = self.qweight.to(torch.bfloat16) * self.scales.to(torch.bfloat16)[:, None]
            else:
                w = dequantize_weight(self.qweight, self.scales, self.fmt, self.in_features, torch.bfloat16)
            return F.linear(x.to(torch.bfloat16), w).to(x.dtype)
        x2 = x.reshape(-1, self.in_features)
        if kernel == "int8pack":
            y = torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self.scales.to(x.dtype))
        else:  # int4pack
            if self.in_features % self.group_size:
                x2 = F.pad(x2, (0, -self.in_features % self.group_size))
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.int4pack, self.group_size,
                                                            self.int4pack_sz.to(x.dtype))
        return y.view(*x.shape[:-1], self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel != "reference" and not (torch.is_grad_enabled() and x.requires_grad):
            y = self._fast(x)
        else:
            y = _DequantMatmul.apply(x, self)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        grouping = f"group_size={self.group_size}" if self.group_size else "per-row"
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"format={self.fmt}, {grouping}" + (", in_scale" if self.in_scale is not None else ""))


# -- whole models --------------------------------------------------------------------------------
def quantizable_linears(model: nn.Module, skip: Iterable[str] = DEFAULT_SKIP) -> list[str]:
    """Names of the nn.Linear layers `quantize_model` replaces, in module order: all but those
    matching a `skip` pattern (see `name_matches`) and those whose weight is shared with another
    module (a tied output head)."""
    skip = tuple(skip)
    # how many modules hold each parameter: 2 for a head tied to the embedding
    owners = Counter(id(p) for m in model.modules() for p in m.parameters(recurse=False))
    return [name for name, m in model.named_modules()
            if name and isinstance(m, nn.Linear) and owners[id(m.weight)] == 1 and not name_matches(name, skip)]


def quantize_model(
    model: nn.Module, bits: int = 8, group_size: int = 64, skip: Iterable[str] = DEFAULT_SKIP,
    fmt: str | None = None,
) -> int:
    """Replace every nn.Linear of `model` (in place) by a round-to-nearest QuantLinear, except those
    `quantizable_linears` leaves out. `fmt` (int8, int4, nf4, fp8) overrides `bits` (8: int8, 4:
    int4). Returns how many were replaced."""
    if fmt is None:
        if bits not in (4, 8):
            raise UserError(f"quantization bits={bits} is unsupported", fix="use 8 or 4")
        fmt = "int8" if bits == 8 else "int4"
    check_format(fmt)
    if fmt in GROUPED:
        check_group_size(group_size)
    names = quantizable_linears(model, skip)
    for name in names:
        model.set_submodule(name, QuantLinear.from_linear(model.get_submodule(name), group_size=group_size, fmt=fmt))
    return len(names)


def quant_record(model: nn.Module) -> dict[str, dict[str, Any]]:
    """The quantized structure of `model` as JSON: layer name -> format, group size, whether it has
    an input scale and a bias (`apply_quant_record` rebuilds it)."""
    return {name: {"format": m.fmt, "group_size": m.group_size, "in_scale": m.in_scale is not None,
                   "bias": m.bias is not None}
            for name, m in model.named_modules() if isinstance(m, QuantLinear)}


def apply_quant_record(model: nn.Module, layers: dict[str, dict[str, Any]], source: str = "the quant record") -> int:
    """Replace each named nn.Linear by an empty QuantLinear of the recorded format (its buffers are
    then loaded from the checkpoint). A name that is not an nn.Linear of this model is refused."""
    for name, spec in layers.items():
        try:
            linear = model.get_submodule(name)
            fmt, group_size, in_scale = spec["format"], int(spec["group_size"]), bool(spec["in_scale"])
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise UserError(f"{source}: layer {name!r} is unreadable or not in this model ({type(e).__name__}: {e})",
                            fix="the record was written for another model; quantize the checkpoint again") from None
        if not isinstance(linear, nn.Linear):
            raise UserError(f"{source}: {name} is a {type(linear).__name__}, not a linear layer",
                            fix="the record was written for another model; quantize the checkpoint again")
        check_format(fmt)
        layer = QuantLinear(linear.in_features, linear.out_features, bool(spec.get("bias", linear.bias is not None)),
                            group_size=group_size if fmt in GROUPED else 64, device=linear.weight.device, fmt=fmt,
                            in_scale=in_scale)
        model.set_submodule(name, layer)
    return len(layers)


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
            if m.in_scale is not None:
                quantized += m.in_scale.numel() * m.in_scale.element_size()
            quantized_fp32 += m.in_features * m.out_features * 4
            if m.bias is not None:
                other += m.bias.numel() * m.bias.element_size()
    return WeightBytes(quantized, quantized_fp32, other)
