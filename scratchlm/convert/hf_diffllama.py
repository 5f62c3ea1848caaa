"""HF transformers' DiffLlama (`DiffLlamaForCausalLM`) <-> our arch=diff (model/diff_attn.py).

Llama's mapping (hf_llama.py) plus the four λ vectors per layer, `self_attn.lambda_{q,k}{1,2}` <->
`attention.lambda_{q,k}{1,2}`, and HF's `lambda_std_dev` <-> `lambda_std`. Our heads are laid out as HF's
(model/diff_attn.py), so no tensor is permuted; HF's per-pair norm has no weights.

HF's `attention_bias` puts biases on all four attention projections; ours has them on q, k and v only, so
an import needs o_proj's biases zero (as Llama's) and an export of a model with biases writes zero ones.
Refused by name: a head_dim other than hidden_size / heads, odd key/value heads, activations other than
SiLU, MLP biases, attention dropout, and RoPE types our RoPE lacks; on export, QK-norm and a sliding
window (HF's DiffLlama has neither).
"""

from __future__ import annotations

from typing import Any

import torch

from scratchlm.config.model import DiffConfig
from scratchlm.convert import hf_llama
from scratchlm.convert.hf_common import HFConfig
from scratchlm.errors import UserError
from scratchlm.model.llama import ffn_hidden

MODEL_TYPES = {"DiffLlamaForCausalLM": "diffllama"}
ARCHITECTURES = tuple(MODEL_TYPES)
DEFAULTS = {"vocab_size": 32000, "hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16,
            "num_attention_heads": 32, "num_key_value_heads": None, "hidden_act": "silu",
            "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "tie_word_embeddings": False,
            "rope_theta": 10000.0, "head_dim": None, "attention_bias": False, "attention_dropout": 0.0,
            "lambda_std_dev": 0.1}
LAMBDAS = ("lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")


def defaults(arch: str) -> dict[str, Any]:
    return DEFAULTS


# -- import ------------------------------------------------------------------------------------
def config_from_hf(c: HFConfig, arch: str) -> DiffConfig:
    n_embd, n_head, n_layer = hf_llama.attention_shape(c)
    c.require("hidden_act", ("silu",), "our feed-forward is SwiGLU with SiLU")
    c.require("mlp_bias", (None, False), "our feed-forward has no biases")
    c.require("attention_dropout", (0, 0.0), "our differential attention has no dropout")
    n_kv = c.get("num_key_value_heads") or n_head
    if n_kv % 2:
        raise c.refuse("num_key_value_heads", n_kv, "differential attention pairs the key/value heads")
    block_size = c.int("max_position_embeddings")
    return DiffConfig(
        vocab_size=c.int("vocab_size"), pad_vocab_to=1, block_size=block_size,
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_kv_head=n_kv,
        ffn_hidden=c.int("intermediate_size"), norm_eps=float(c.get("rms_norm_eps")), dropout=0.0,
        bias=bool(c.get("attention_bias")), tie_embeddings=bool(c.get("tie_word_embeddings")),
        rope=hf_llama.rope_from_hf(c, block_size), lambda_std=float(c.get("lambda_std_dev")),
    )


def prepare_hf(sd: dict[str, torch.Tensor], m: DiffConfig, where: str) -> None:
    """As Llama's: the `model.` prefix, old rotary buffers, zero o_proj biases, the tied lm_head copy."""
    hf_llama.prepare_hf(sd, m, where)


def hf_name(ours: str, m: DiffConfig) -> tuple[str, bool]:
    """Our tensor name -> (HF name, stored transposed: never)."""
    _, i, rest = ours.split(".", 2) if ours.startswith("layers.") else ("", "", "")
    if rest.startswith("attention.lambda_"):
        return f"model.layers.{i}.self_attn.{rest.split('.', 1)[1]}", False
    return hf_llama.hf_name(ours, m)


# -- export ------------------------------------------------------------------------------------
def config_to_hf(m: DiffConfig, eos_id: int | None) -> dict[str, Any]:
    if m.qk_norm:
        raise UserError("model.qk_norm=true has no place in HF's DiffLlama", fix="export a model without QK-norm")
    if not m.sub_norm:
        raise UserError("model.sub_norm=false (the ablation without the per-pair norm) has no place in HF's DiffLlama",
                        fix="export a model with model.sub_norm=true")
    if m.sliding_window:
        raise UserError(f"model.sliding_window={m.sliding_window} has no place in HF's DiffLlama",
                        fix="export a model without a sliding window")
    theta, scaling = hf_llama.rope_to_hf(m)
    return {
        "architectures": ["DiffLlamaForCausalLM"], "model_type": "diffllama",
        "vocab_size": m.vocab_size, "hidden_size": m.n_embd, "intermediate_size": ffn_hidden(m),
        "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_kv_head or m.n_head, "hidden_act": "silu",
        "max_position_embeddings": m.block_size, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "attention_bias": m.bias, "attention_dropout": 0.0,
        "lambda_std_dev": m.lambda_std,
        "rope_theta": theta, "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta},
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "dtype": "float32", "torch_dtype": "float32",
    }


def extra_hf_tensors(m: DiffConfig) -> dict[str, torch.Tensor]:
    """HF's attention_bias adds o_proj biases, which our model lacks: they are zero."""
    if m.bias:
        return {f"model.layers.{i}.self_attn.o_proj.bias": torch.zeros(m.n_embd) for i in range(m.n_layer)}
    return {}


def extra_tensors(m: DiffConfig) -> dict[str, torch.Tensor]:
    """Our persistent buffers with no HF counterpart: none."""
    return {}


def finish_hf(tensors: dict[str, torch.Tensor], m: DiffConfig) -> None:
    """The exported tensors are already in HF's layout."""
