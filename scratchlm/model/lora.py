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
linears with scratchlm/model/quant.py and wraps the targets. Ours is int4 (or int8) group-wise
absmax, not the paper's NF4 with double quantization and paged optimizers; the principle - a
frozen low-bit base, gradients flowing through its dequantized weight into fp32 adapters - is the
same, and QuantLinear's backward recomputes the dequantized weight rather than storing it.

The token embedding: the chat markers (<|user|>, <|assistant|>, <|end|>, ...) are special tokens
a pretrained base never saw, so their rows are untrained, and fine-tuning tasks need new uses of
ordinary tokens too; adapters on the projections alone, the embedding frozen, learned next to
nothing in bench/sft.py. `train_token_rows` lets chosen rows of the embedding (and of an untied
head) train beside the adapters, every other row frozen: all of them is PEFT's `modules_to_save`
on the embedding (the `sft` default, `sft.lora_embedding=all`), the chat markers' alone its
`trainable_token_indices` (`chat`: a few hundred numbers, for bases whose embedding is too big).

Saving and loading the adapters is the checkpoint layer's (scratchlm/checkpoint/adapters.py: one
file of A, B and the trained token rows, a record beside it, `load_adapters` onto a fresh base);
`lora_layers` and `lora_state_dict` are what it reads here.

LoRA and the quantized linears are model parts: `adapt_model` applies a config's LoRA (QLoRA) to a
freshly built model, for the sft stage and for every loader of a LoRA checkpoint alike.

Module names: a wrapped layer keeps its name (`h.0.attn.c_attn`) and the base moves beneath it
(`h.0.attn.c_attn.base.weight`), so load base checkpoints before applying LoRA, or merge with
`merge_lora` (which also puts the plain layers back) before saving a full checkpoint.

`adapters_disabled(model)` runs the wrapped model as its base for a while (every LoRA layer skips
its update): DPO's reference model is the policy's own base this way, with no second copy held.

Left out: low-rank updates of embeddings, LoRA on the MoE experts (3-D parameter tensors, not
nn.Linear: routed expert adapters are a design of their own), per-layer ranks, DoRA / rsLoRA
variants, and several adapters on one base.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import Config
from scratchlm.errors import UserError
from scratchlm.model.base import LanguageModel
from scratchlm.model.gpt import GPT
from scratchlm.model.llama import Llama
from scratchlm.model.quant import DEFAULT_SKIP, QuantLinear, name_matches, quantize_model
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.chat import CHAT_SPECIALS


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
        self.disabled = False  # `adapters_disabled`: forward is the base alone

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)  # (..., out)
        if self.merged or self.disabled:  # merged: the update already lives in the base weight
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


def wrap_layers(model: nn.Module, names: Sequence[str], r: int, alpha: float, dropout: float) -> None:
    """Freeze the whole model and wrap (in place) the linear layers `names` with LoRA: `apply_lora`
    after matching its patterns, and `load_adapters` with the names a saved record lists."""
    model.requires_grad_(False)  # everything frozen; the new A and B are created trainable
    for name in names:
        model.set_submodule(name, LoRALinear(model.get_submodule(name), r, alpha, dropout))


def apply_lora(
    model: nn.Module, targets: str | Sequence[str], r: int = 8, alpha: float = 16.0, dropout: float = 0.0
) -> list[str]:
    """Wrap (in place) every nn.Linear / QuantLinear whose name matches a pattern in `targets`
    (fnmatch globs on the dotted name or a dotted suffix of it, or `re:` regexes; see
    `scratchlm.model.quant.name_matches`), freeze every other parameter, return the wrapped names.

    E.g. ["attn.c_attn"] for GPT's fused q/k/v, ["*wq", "*wv"] for Llama's query and value
    projections (the paper's choice), or `default_targets(model)` for all projections."""
    targets = [targets] if isinstance(targets, str) else list(targets)
    names = _match(model, targets)
    wrap_layers(model, names, r, alpha, dropout)
    return names


def default_targets(model: nn.Module) -> list[str]:
    """Every attention projection and MLP matrix: GPT's c_attn, attn.c_proj, c_fc, mlp.c_proj;
    Llama's wq, wk, wv, wo, w1, w2, w3 (for the MoE model: attention, dense FFNs and shared experts;
    the routed experts are not linear layers)."""
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


def adapt_model(model: nn.Module, cfg: Config, tok: Tokenizer | None = None) -> list[str]:
    """Apply the config's LoRA (and QLoRA quantization) to a freshly built model; [] when full fine-tuning.
    Every loader of a LoRA checkpoint calls this too, so it loads into the structure it was saved from.

    For training, pass `tok`: the adapters' learning rate is then scaled by `sft.lora_lr_mult`, and
    the token embedding rows `sft.lora_embedding` names (all, or the chat markers') train too, at
    `sft.lora_embedding_lr_mult` (see the module docstring and bench/sft.py for why)."""
    s = cfg.sft
    if s.lora_r <= 0:
        if s.quant_bits:
            raise UserError("sft.quant_bits needs LoRA (QLoRA trains adapters on a frozen quantized base)",
                            fix="set --sft.lora_r=8 (or drop --sft.quant_bits)")
        return []
    targets = s.lora_targets or default_targets(model)
    if s.quant_bits:
        if s.quant_bits not in (4, 8):
            raise UserError(f"sft.quant_bits={s.quant_bits} is not supported", fix="use 4 or 8")
        wrapped = prepare_qlora(model, s.quant_bits, 64, targets, s.lora_r, s.lora_alpha, s.lora_dropout)
    else:
        wrapped = apply_lora(model, targets, s.lora_r, s.lora_alpha, s.lora_dropout)
    if tok is not None:
        for name in wrapped:
            for p in model.get_submodule(name).parameters(recurse=False):  # lora_A, lora_B
                p.lr_scale = s.lora_lr_mult
        if s.lora_embedding != "none":
            vocab = model.config.vocab_size
            ids = range(vocab) if s.lora_embedding == "all" else [tok.special_tokens[t] for t in CHAT_SPECIALS]
            for _, table in train_token_rows(model, ids):
                table.lr_scale = s.lora_embedding_lr_mult
    return wrapped


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, every LoRA layer of `model` computes its base alone (the adapters skipped,
    not zeroed: they and their gradients are untouched), so the model is its base again; on leaving,
    the adapters are back. Merged layers are refused: their base weight holds the update.
    Token rows trained beside the adapters (`train_token_rows`) are not undone."""
    layers = [m for _, m in lora_layers(model)]
    if any(m.merged for m in layers):
        raise UserError("cannot disable merged LoRA adapters", fix="unmerge() the LoRA layers first")
    for m in layers:
        m.disabled = True
    try:
        yield model
    finally:
        for m in layers:
            m.disabled = False


# -- token rows: the chat markers ----------------------------------------------------------------
def token_tables(model: LanguageModel) -> list[tuple[str, nn.Parameter]]:
    """(name, (V, C) weight) of the token embedding and of a plain output head not tied to it."""
    emb, head = model.embedding, model.unembedding
    if emb is None:
        raise UserError(f"{type(model).__name__} has no token embedding to train rows of")
    wanted = [emb.weight] + ([head.weight] if type(head) is nn.Linear and head.weight is not emb.weight else [])
    return [(n, p) for n, p in model.named_parameters(remove_duplicate=True) if any(p is w for w in wanted)]


def train_token_rows(model: nn.Module, ids: Sequence[int]) -> list[tuple[str, nn.Parameter]]:
    """Let rows `ids` of the token embedding (and of an untied output head) train while every other
    row stays frozen bit for bit; returns the tables (`token_tables`). All ids: PEFT's
    `modules_to_save` on the embedding; a few: its `trainable_token_indices`.

    The whole (V, C) table becomes trainable but a gradient hook zeroes every other row, so AdamW's
    moments there stay 0 and its step is exactly 0 (these tables get no weight decay: see
    `scratchlm.train.optim.param_groups`). The trained ids are kept on the parameter as
    `trainable_rows` for `count_parameters` and `save_adapters`."""
    rows = torch.tensor(sorted(set(ids)), dtype=torch.long)
    tables = token_tables(model)
    for name, p in tables:
        if len(rows) and not 0 <= int(rows[0]) <= int(rows[-1]) < p.size(0):
            raise UserError(f"token ids {rows.tolist()} are outside {name}'s {p.size(0)} rows")
        mask = torch.zeros(p.size(0), 1, dtype=p.dtype)
        mask[rows] = 1.0
        p.requires_grad_(True)
        p.register_hook(lambda g, mask=mask: g * mask.to(g.device, g.dtype))
        p.trainable_rows = rows
    return tables


# -- accounting ----------------------------------------------------------------------------------
def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameters, tied ones once. A table of which only some rows train
    (`train_token_rows`) counts those rows as trainable. A QuantLinear's frozen weight and bias
    count toward the total with their logical sizes (out · in, out), so totals compare across
    full, LoRA and QLoRA models; bytes are `scratchlm.model.quant.weight_bytes`."""
    params = list(model.parameters())
    trainable = sum(len(p.trainable_rows) * p[0].numel() if hasattr(p, "trainable_rows") else p.numel()
                    for p in params if p.requires_grad)
    total = sum(p.numel() for p in params)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            total += m.in_features * m.out_features + (m.bias.numel() if m.bias is not None else 0)
    return trainable, total


# -- the adapters --------------------------------------------------------------------------------
def lora_layers(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(name, layer) of every LoRA layer, in module order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the adapters: `<layer>.lora_A` (r, in) and `<layer>.lora_B` (out, r) for each LoRA layer."""
    out: dict[str, torch.Tensor] = {}
    for name, m in lora_layers(model):
        out[f"{name}.lora_A"] = m.lora_A.detach()
        out[f"{name}.lora_B"] = m.lora_B.detach()
    return out
