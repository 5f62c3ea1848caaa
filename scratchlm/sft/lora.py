"""LoRA: fine-tune a frozen model through low-rank updates of chosen linear layers (Hu et al. 2021).

A wrapped layer computes

    y = base(x) + (alpha / r) · B (A x)        A: (r, in), B: (out, r), r << min(in, out)

The base layer is frozen; only A and B train, r · (in + out) numbers instead of in · out. B starts
at zero, so the wrapped model is exactly the base model at step 0 and training starts from it; A
starts Kaiming-uniform (as nn.Linear's default; the paper draws it Gaussian - either breaks the
symmetry, B = 0 is what matters). The factor alpha / r keeps the update's size roughly
independent of r, so changing r does not call for a new learning rate. The LoRA path multiplies
x by A first and then by B, (..., in) -> (..., r) -> (..., out), never forming the (out, in)
product B A while training.

After training, `merge` folds (alpha / r) · B A into the base weight, so inference costs nothing
extra, and `unmerge` subtracts it again. A quantized base (`QuantLinear`) cannot be merged into:
adding the small update to the int4/int8 codes would need requantizing, which rounds most of it
away. `merge` therefore raises; `dequantize_base` first swaps the base for a full-precision copy
of its dequantized weight (the memory saving is gone, the result is exact).

QLoRA (Dettmers et al. 2023) = LoRA on a quantized base: `prepare_qlora` quantizes the base
linears with scratchlm/quant/linear.py and wraps the targets. Ours is int4 (or int8) group-wise
absmax, not the paper's NF4 with double quantization and paged optimizers; the principle - a
frozen low-bit base, gradients flowing through its dequantized weight into fp32 adapters - is the
same, and QuantLinear's backward recomputes the dequantized weight rather than storing it.

Adapters are saved alone (`save_adapters`): the A and B tensors in a safetensors file plus a JSON
record of r, alpha, dropout, the wrapped layer names and any quantization, written atomically as a
folder. `load_adapters` re-creates exactly that wrapping on a fresh base model and loads them.

Module names: a wrapped layer keeps its name (`h.0.attn.c_attn`) and the base moves beneath it
(`h.0.attn.c_attn.base.weight`), so load base checkpoints before applying LoRA, or merge with
`merge_lora` (which also puts the plain layers back) before saving a full checkpoint.

Left out: LoRA on embeddings and on the MoE experts (3-D parameter tensors, not nn.Linear: routed
expert adapters are a design of their own), per-layer ranks, DoRA / rsLoRA variants, and several
adapters on one base.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from scratchlm.errors import UserError
from scratchlm.io import atomic_dir, write_json
from scratchlm.quant.linear import DEFAULT_SKIP, QuantLinear, name_matches, quantize_model

ADAPTER_TENSORS = "adapters.safetensors"
ADAPTER_META = "adapters.json"
FORMAT = "scratchlm-lora"


class LoRALinear(nn.Module):
    """A frozen nn.Linear or QuantLinear plus a trainable low-rank update (see the module docstring)."""

    def __init__(self, base: nn.Module, r: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear | QuantLinear):
            raise TypeError(f"LoRA wraps nn.Linear or QuantLinear, not {type(base).__name__}")
        if r < 1:
            raise UserError(f"LoRA rank r={r} must be at least 1")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"LoRA dropout={dropout} must be in [0, 1)")
        self.base = base
        base.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.r, self.alpha, self.scaling = r, float(alpha), alpha / r
        if isinstance(base, nn.Linear):
            device, dtype = base.weight.device, base.weight.dtype
        else:
            device, dtype = base.qweight.device, torch.float32  # adapters on a quantized base train in fp32
        self.lora_A = nn.Parameter(torch.empty(r, self.in_features, device=device, dtype=dtype))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r, device=device, dtype=dtype))  # (out, r)
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's default: U(±1/√in)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged:  # the update already lives in the base weight
            return y
        h = F.linear(self.dropout(x), self.lora_A.to(x.dtype))  # (..., in) -> (..., r)
        return y + F.linear(h, self.lora_B.to(x.dtype)) * self.scaling  # (..., r) -> (..., out)

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) · B A: the (out, in) update this adapter adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merge(self) -> None:
        """Add the update into the base weight (inference without the extra matmuls).

        Merged and unmerged outputs agree in eval mode (dropout, if any, only acts on the unmerged
        LoRA path in training). Do not train while merged: the adapters get no gradient."""
        if self.merged:
            raise UserError("this LoRA layer is already merged")
        if isinstance(self.base, QuantLinear):
            raise UserError("cannot merge LoRA into a quantized (int4/int8) weight: requantizing would round the "
                            "update away", fix="call dequantize_base() first, or merge_lora(model, dequantize=True)")
        with torch.no_grad():
            self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        self.merged = True

    def unmerge(self) -> None:
        """Subtract the update again (the base weight comes back up to float rounding)."""
        if not self.merged:
            raise UserError("this LoRA layer is not merged")
        with torch.no_grad():
            self.base.weight -= self.delta_weight().to(self.base.weight.dtype)
        self.merged = False

    def dequantize_base(self) -> None:
        """Replace a QuantLinear base by a frozen fp32 nn.Linear holding its dequantized weight."""
        if isinstance(self.base, QuantLinear):
            self.base = self.base.to_linear().requires_grad_(False)

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha:g}, merged={self.merged}"


# -- applying ------------------------------------------------------------------------------------
def _linear_names(model: nn.Module) -> list[str]:
    """Names of the layers LoRA can wrap (not those already inside a LoRALinear)."""
    inside = {f"{n}.base" for n, m in model.named_modules() if isinstance(m, LoRALinear)}
    return [n for n, m in model.named_modules() if n and n not in inside and isinstance(m, nn.Linear | QuantLinear)]


def _match(model: nn.Module, targets: Sequence[str]) -> list[str]:
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise UserError("the model already has LoRA layers",
                        fix="apply LoRA to a fresh base model, or merge_lora first")
    available = _linear_names(model)
    names = [n for n in available if name_matches(n, targets)]
    if not names:
        shown = ", ".join(available[:8]) + (", ..." if len(available) > 8 else "")
        raise UserError(f"LoRA targets {list(targets)} match no linear layer",
                        fix=f"linear layers are named like: {shown or '(none)'}")
    return names


def _wrap(model: nn.Module, names: Sequence[str], r: int, alpha: float, dropout: float) -> None:
    model.requires_grad_(False)  # everything frozen; the new A and B are created trainable
    for name in names:
        model.set_submodule(name, LoRALinear(model.get_submodule(name), r, alpha, dropout))


def apply_lora(
    model: nn.Module, targets: str | Sequence[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0
) -> list[str]:
    """Wrap (in place) every nn.Linear / QuantLinear whose name matches a pattern in `targets`
    (fnmatch globs on the dotted name or a dotted suffix of it, or `re:` regexes; see
    `scratchlm.quant.linear.name_matches`), freeze every other parameter, return the wrapped names.

    E.g. ["attn.c_attn"] for GPT's fused q/k/v, ["*wq", "*wv"] for Llama's query and value
    projections (the paper's choice), or `default_targets(model)` for all projections."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = _match(model, targets)
    _wrap(model, names, r, alpha, dropout)
    return names


def default_targets(model: nn.Module) -> list[str]:
    """Every attention projection and MLP matrix: GPT's c_attn, attn.c_proj, c_fc, mlp.c_proj;
    Llama's wq, wk, wv, wo, w1, w2, w3 (for the MoE model: attention, dense FFNs and shared experts;
    the routed experts are not linear layers)."""
    from scratchlm.model.gpt import GPT
    from scratchlm.model.llama import Llama

    if isinstance(model, GPT):
        return ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    if isinstance(model, Llama):
        return ["wq", "wk", "wv", "wo", "w1", "w2", "w3"]
    raise UserError(f"no default LoRA targets for {type(model).__name__}", fix="pass target patterns explicitly")


def prepare_qlora(
    model: nn.Module, bits: int = 4, group_size: int = 64, targets: Sequence[str] | None = None, r: int = 8,
    alpha: float = 16.0, dropout: float = 0.0, skip: Sequence[str] = DEFAULT_SKIP,
) -> list[str]:
    """QLoRA-style: quantize the base linears (`quantize_model`: all but `skip` and tied heads),
    then wrap the `targets` (default: `default_targets`) with LoRA. Returns the wrapped names."""
    targets = default_targets(model) if targets is None else list(targets)
    _match(model, targets)  # fail before anything is quantized
    quantize_model(model, bits, group_size, skip)
    return apply_lora(model, targets, r, alpha, dropout)


def merge_lora(model: nn.Module, dequantize: bool = False) -> int:
    """Merge every adapter into its base and put the plain base layer back in its place, leaving a
    model with the original architecture and names (ready for `save_model`). A quantized base
    raises unless `dequantize`, which first replaces it by its fp32 dequantized copy. Returns the
    number of layers merged. The result is still frozen (`requires_grad_(True)` to train it all)."""
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        layer: LoRALinear = model.get_submodule(name)
        if dequantize:
            layer.dequantize_base()
        if not layer.merged:
            layer.merge()
        model.set_submodule(name, layer.base)
    return len(names)


# -- accounting ----------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied ones once. A QuantLinear's frozen weight and bias count
    toward the total with their logical sizes (out · in, out), so totals compare across full,
    LoRA and QLoRA models; bytes are `scratchlm.quant.linear.weight_bytes`."""
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
    return trainable, total


def base_fingerprint(model: nn.Module) -> str:
    """SHA-256 of a base model's state dict (names, dtypes, shapes, bytes). Take it before
    applying LoRA or quantizing, and pass it to `save_adapters` as meta["base_fingerprint"]:
    `load_adapters` then refuses a different base."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


# -- saving and loading adapters -----------------------------------------------------------------
def _lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: `<layer>.lora_A` (r, in) and `<layer>.lora_B` (out, r) for each LoRA layer."""
    out: dict[str, torch.Tensor] = {}
    for name, m in _lora_layers(model):
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out


def _quantized_layers(model: nn.Module) -> dict[str, list[int]]:
    """Name (as in the unwrapped base) -> [bits, group_size] of every QuantLinear."""
    wrapped = {f"{n}.base": n for n, _ in _lora_layers(model)}
    return {wrapped.get(n, n): [m.bits, m.group_size] for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def save_adapters(model: nn.Module, path: str | Path, meta: dict[str, Any] | None = None) -> Path:
    """Write the folder `path` with `adapters.safetensors` (A and B only) and `adapters.json`
    (format, r, alpha, dropout, targets = the wrapped layer names, the base's quantization, and
    `meta` as given, e.g. {"base_fingerprint": ...}), atomically. Returns the folder."""
    layers = _lora_layers(model)
    if not layers:
        raise UserError("the model has no LoRA layers to save", fix="apply_lora or prepare_qlora first")
    settings = {(m.r, m.alpha, m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0) for _, m in layers}
    if len(settings) > 1:
        raise UserError(f"LoRA layers with different settings {sorted(settings)} cannot be saved as one adapter")
    if any(m.merged for _, m in layers):
        raise UserError("cannot save adapters while merged", fix="unmerge() the LoRA layers first")
    r, alpha, dropout = next(iter(settings))
    record = {"format": FORMAT, "version": 1, "r": r, "alpha": alpha, "dropout": dropout,
              "targets": [n for n, _ in layers], "quantized": _quantized_layers(model), "meta": dict(meta or {})}
    tensors = {k: v.cpu().contiguous() for k, v in lora_state_dict(model).items()}
    path = Path(path)
    with atomic_dir(path) as tmp:
        save_file(tensors, str(tmp / ADAPTER_TENSORS))
        write_json(tmp / ADAPTER_META, record)
    return path


def _read_adapters(path: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], Path]:
    folder = path.parent if path.is_file() else path
    files = folder / ADAPTER_META, folder / ADAPTER_TENSORS
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise UserError(f"{folder}: not a LoRA adapter folder (missing {', '.join(missing)})",
                        fix="pass the folder save_adapters wrote")
    try:
        record = json.loads(files[0].read_text(encoding="utf-8"))
        tensors = load_file(str(files[1]))
    except (json.JSONDecodeError, UnicodeDecodeError, SafetensorError) as e:
        raise UserError(f"{folder}: corrupt adapter files ({type(e).__name__}: {e})",
                        fix="save the adapters again") from None
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise UserError(f"{files[0]}: not a {FORMAT} adapter record", fix="pass the folder save_adapters wrote")
    absent = [k for k in ("r", "alpha", "dropout", "targets", "quantized", "meta") if k not in record]
    if absent:
        raise UserError(f"{files[0]}: adapter record lacks {', '.join(absent)}", fix="save the adapters again")
    return record, tensors, files[1]


def load_adapters(model: nn.Module, path: str | Path) -> dict[str, Any]:
    """Apply the saved LoRA (and the base quantization it was trained on, if any) to a fresh base
    `model`, in place, and load A and B. Returns the JSON record (its "meta" is what was saved)."""
    record, tensors, file = _read_adapters(Path(path))
    if _lora_layers(model):
        raise UserError("the model already has LoRA layers", fix="load adapters onto a fresh base model")
    expected_fp = record["meta"].get("base_fingerprint")
    if expected_fp and base_fingerprint(model) != expected_fp:
        raise UserError(f"{file}: these adapters were trained on a different base model (fingerprint mismatch)",
                        fix="load the base checkpoint they were trained from")

    def module(name: str) -> nn.Module:
        try:
            return model.get_submodule(name)
        except AttributeError:
            raise UserError(f"{file}: this model has no layer {name!r}",
                            fix="the adapters were trained on a different architecture") from None

    for name, (bits, group_size) in record["quantized"].items():  # reproduce the QLoRA base first
        m = module(name)
        if isinstance(m, QuantLinear):
            if (m.bits, m.group_size) != (bits, group_size):
                raise UserError(f"{file}: layer {name} is quantized as {m.bits}-bit/{m.group_size}, the adapters "
                                f"were trained on {bits}-bit/{group_size}", fix="load onto the unquantized base")
        elif isinstance(m, nn.Linear):
            model.set_submodule(name, QuantLinear.from_linear(m, bits, group_size))
        else:
            raise UserError(f"{file}: layer {name} is a {type(m).__name__}, not a linear layer")
    for name in record["targets"]:
        if not isinstance(module(name), nn.Linear | QuantLinear):
            raise UserError(f"{file}: layer {name} is a {type(module(name)).__name__}, not a linear layer")
    _wrap(model, record["targets"], record["r"], record["alpha"], record["dropout"])

    params = dict(model.named_parameters())
    wanted = set(lora_state_dict(model))
    for key in sorted(wanted | set(tensors)):
        if key not in tensors:
            raise UserError(f"{file}: missing tensor {key}", fix="the adapter file is incomplete; save it again")
        if key not in wanted:
            raise UserError(f"{file}: unexpected tensor {key}", fix="the adapter record and tensors disagree")
        if tensors[key].shape != params[key].shape:
            raise UserError(f"{file}: tensor {key} has shape {tuple(tensors[key].shape)}, this model needs "
                            f"{tuple(params[key].shape)}", fix="the adapters were trained on a different model size")
        with torch.no_grad():
            params[key].copy_(tensors[key])
    return record
