"""GPT-2 (HF `GPT2LMHeadModel`) <-> our `GPT`.

The architectures are the same and even the tensor names match (`h.N.attn.c_attn`, `ln_f`, ...),
with two differences: HF keeps them under `transformer.`, and HF GPT-2 computes its projections
with `Conv1D`, which stores the weight as (in, out), the transpose of `nn.Linear`'s (out, in).
So c_attn, attn.c_proj, c_fc and mlp.c_proj weights are transposed both ways; biases, norms and
embeddings are copied. HF's "gelu_new" is GELU with the tanh approximation, which ours uses.

What our GPT cannot express, refused by name: another activation, an MLP width other than 4x,
LayerNorm eps other than 1e-5 (our LayerNorm uses PyTorch's default), unscaled or layer-scaled
attention, cross-attention. Export needs biases and learned positions, as GPT-2 has.
"""

from __future__ import annotations

from typing import Any

import torch

from scratchlm.config import GPTConfig
from scratchlm.convert.hf_common import HFConfig
from scratchlm.errors import UserError

ARCHITECTURES = ("GPT2LMHeadModel",)
MODEL_TYPE = "gpt2"

# GPT2Config's defaults, for config.json files that leave fields out.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12, "n_head": 12, "n_inner": None,
    "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5, "scale_attn_weights": True,
    "scale_attn_by_inverse_layer_idx": False, "add_cross_attention": False, "tie_word_embeddings": True,
}
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Tensors of some HF GPT-2 files that are not weights: the causal mask buffers of old versions.
IGNORED_SUFFIXES = (".attn.bias", ".attn.masked_bias")


def defaults(arch: str) -> dict[str, Any]:
    return DEFAULTS


def config_from_hf(c: HFConfig, arch: str) -> GPTConfig:
    n_embd = c.int("n_embd")
    c.require("activation_function", TANH_GELU, "our GPT's MLP uses GELU with the tanh approximation (gelu_new)")
    c.require("n_inner", (None, 4 * n_embd), f"our GPT's MLP is 4 x n_embd = {4 * n_embd} wide")
    c.require("layer_norm_epsilon", (1e-5,), "our GPT's LayerNorm uses eps 1e-5 (model.norm_eps is Llama-only)")
    c.require("scale_attn_weights", (True,), "our attention always scales scores by 1/sqrt(head dim)")
    c.require("scale_attn_by_inverse_layer_idx", (False,), "our attention has no per-layer score scaling")
    c.require("add_cross_attention", (False,), "our GPT is decoder-only, without cross-attention")
    return GPTConfig(
        vocab_size=c.int("vocab_size"), pad_vocab_to=1, block_size=c.int("n_positions"),
        n_layer=c.int("n_layer"), n_head=c.int("n_head"), n_embd=n_embd, dropout=0.0, bias=True,
        pos_emb="learned", tie_embeddings=bool(c.get("tie_word_embeddings")),
    )


def config_to_hf(m: GPTConfig, eos_id: int | None) -> dict[str, Any]:
    if not m.bias:
        raise UserError("model.bias=false cannot be exported as GPT-2: HF GPT-2 has biases in every linear and "
                        "LayerNorm", fix="export a model trained with model.bias=true")
    if m.pos_emb != "learned":
        raise UserError(f"model.pos_emb={m.pos_emb!r} cannot be exported: HF GPT-2 has learned positions only")
    if m.sliding_window:
        raise UserError(f"model.sliding_window={m.sliding_window} cannot be exported: HF GPT-2 attends to the "
                        "whole context")
    return {
        "architectures": list(ARCHITECTURES), "model_type": MODEL_TYPE,
        "vocab_size": m.vocab_size, "n_positions": m.block_size, "n_embd": m.n_embd, "n_layer": m.n_layer,
        "n_head": m.n_head, "n_inner": None, "activation_function": "gelu_new", "layer_norm_epsilon": 1e-5,
        "resid_pdrop": m.dropout, "embd_pdrop": m.dropout, "attn_pdrop": m.dropout,
        "scale_attn_weights": True, "tie_word_embeddings": m.tie_embeddings,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "dtype": "float32", "torch_dtype": "float32",
    }


def hf_name(ours: str, m: GPTConfig) -> tuple[str, bool]:
    """Our tensor name -> (HF name, stored transposed)."""
    if ours == "lm_head.weight":
        return ours, False
    return "transformer." + ours, ours.endswith(CONV1D)


def prepare_hf(sd: dict[str, torch.Tensor], m: GPTConfig, where: str) -> None:
    """Normalise an HF state dict in place: the `transformer.` prefix (the original GPT-2 files
    lack it), minus the mask buffers and, when tied, the copy of the embedding in lm_head."""
    if "transformer.wte.weight" not in sd and "wte.weight" in sd:
        for k in [k for k in sd if k != "lm_head.weight"]:
            sd["transformer." + k] = sd.pop(k)
    for k in [k for k in sd if k.endswith(IGNORED_SUFFIXES)]:  # ("c_attn.bias" does not end in ".attn.bias")
        del sd[k]
    if m.tie_embeddings:
        sd.pop("lm_head.weight", None)


def extra_hf_tensors(m: GPTConfig) -> dict[str, torch.Tensor]:
    return {}


def extra_tensors(m: GPTConfig) -> dict[str, torch.Tensor]:
    """Our persistent buffers with no HF counterpart: none."""
    return {}


def finish_hf(tensors: dict[str, torch.Tensor], m: GPTConfig) -> None:
    """The exported tensors are already in HF's layout."""
