"""HF transformers' Jamba (`JambaForCausalLM`) <-> our `Jamba` (model/jamba.py).

    HF (JambaConfig)                             ours (JambaConfig)
    hidden_size / num_hidden_layers              n_embd / n_layer
    num_attention_heads / num_key_value_heads    n_head / n_kv_head
    intermediate_size                            ffn_hidden and expert_hidden (HF's experts are as wide as
                                                 its dense feed-forwards)
    attn_layer_period / attn_layer_offset        attn_layer_period / attn_layer_offset
    expert_layer_period / expert_layer_offset    moe_every / moe_first_dense (i % p == o is i >= o and
                                                 (i - o) % p == 0, as o < p)
    num_experts / num_experts_per_tok            n_experts / n_active_experts; router softmax, top-k
                                                 weights not renormalised (router_norm_topk=False)
    mamba_d_state, _d_conv, _expand, _dt_rank    mamba_d_state, _d_conv, _expand, _dt_rank ("auto" =
                                                 ceil(hidden_size / 16), written out)
    mamba_conv_bias / mamba_proj_bias            mamba_conv_bias / mamba_proj_bias
    rms_norm_eps, max_position_embeddings        norm_eps, block_size

Tensor names: the Mamba mixer's are the same on both sides (`mamba.in_proj`, `mamba.conv1d`, ...),
the attention's are Llama's (`self_attn.q_proj` = `attention.wq`), each layer's two norms are
`input_layernorm` (our `attention_norm` or `mamba_norm`) and `pre_ff_layernorm` (`ffn_norm`), the
router is `feed_forward.router`, and the experts are transformers 5's fused stacks (what `prepare_hf`
makes of the per-expert matrices `save_pretrained` writes), our `w13_EC2H` / `w2_EHC` with the last
two dims swapped, as for the other MoE families (`hf_moe.py`).

Refused by name: activations other than SiLU, a head_dim other than hidden_size / heads,
num_experts = 1 (HF's Jamba then has no MoE layer; ours always has one) and expert layers past the
last layer. On export: what HF's Jamba cannot hold (renormalised top-k, shared experts, the sigmoid
router, q/k/v biases, QK-norm, a sliding window, experts narrower than the dense feed-forward,
an expert offset not below its period).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from scratchlm.config.model import JambaConfig
from scratchlm.convert import hf_llama, hf_moe
from scratchlm.convert.hf_common import HFConfig
from scratchlm.errors import UserError
from scratchlm.model.llama import ffn_hidden
from scratchlm.model.moe import balance_loss_coef, expert_hidden, is_moe_layer

MODEL_TYPES = {"JambaForCausalLM": "jamba"}
ARCHITECTURES = tuple(MODEL_TYPES)

# JambaConfig's defaults (transformers 5) for the fields read here, for sparse config.json files.
DEFAULTS: dict[str, dict[str, Any]] = {"jamba": {
    "vocab_size": 65536, "tie_word_embeddings": False, "hidden_size": 4096, "intermediate_size": 14336,
    "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8, "hidden_act": "silu",
    "rms_norm_eps": 1e-6, "max_position_embeddings": 262144, "num_experts_per_tok": 2, "num_experts": 16,
    "expert_layer_period": 2, "expert_layer_offset": 1, "attn_layer_period": 8, "attn_layer_offset": 4,
    "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "mamba_dt_rank": "auto", "mamba_conv_bias": True,
    "mamba_proj_bias": False, "head_dim": None}}

# our name inside a layer -> (HF's, after `prepare_hf`; stored with the last two dims swapped)
LAYER_NAMES = {
    "attention_norm": ("input_layernorm", False), "mamba_norm": ("input_layernorm", False),
    "ffn_norm": ("pre_ff_layernorm", False),
    "attention.wq": ("self_attn.q_proj", False), "attention.wk": ("self_attn.k_proj", False),
    "attention.wv": ("self_attn.v_proj", False), "attention.wo": ("self_attn.o_proj", False),
    "feed_forward.w1": ("feed_forward.gate_proj", False), "feed_forward.w3": ("feed_forward.up_proj", False),
    "feed_forward.w2": ("feed_forward.down_proj", False), "feed_forward.gate": ("feed_forward.router", False),
}
EXPERTS = {"feed_forward.w13_EC2H": "feed_forward.experts.gate_up_proj",  # ours (E, C, 2H), HF's (E, 2H, C)
           "feed_forward.w2_EHC": "feed_forward.experts.down_proj"}  # ours (E, H, C), HF's (E, C, H)
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.final_layernorm.weight",
             "output.weight": "lm_head.weight"}


def defaults(arch: str) -> dict[str, Any]:
    return DEFAULTS[MODEL_TYPES[arch]]


# -- import ------------------------------------------------------------------------------------
def config_from_hf(c: HFConfig, arch: str) -> JambaConfig:
    n_embd, n_head, n_layer = hf_llama.attention_shape(c)
    c.require("hidden_act", ("silu",), "our feed-forwards and experts are SwiGLU with SiLU")
    E, k = c.int("num_experts"), c.int("num_experts_per_tok")
    if E == 1:
        raise c.refuse("num_experts", E, "HF's Jamba then has no MoE layer, and our arch=jamba always has one")
    if k > E:
        raise c.refuse("num_experts_per_tok", k, f"more than the {E} experts")
    offset, period = c.get("expert_layer_offset"), c.int("expert_layer_period")
    if not isinstance(offset, int) or not 0 <= offset < min(period, n_layer):
        raise c.refuse("expert_layer_offset", offset, f"the first MoE layer must be a layer (< {n_layer}) and "
                       f"below expert_layer_period={period}")
    attn_offset, attn_period = c.get("attn_layer_offset"), c.int("attn_layer_period")
    if not isinstance(attn_offset, int) or not 0 <= attn_offset < attn_period:
        raise c.refuse("attn_layer_offset", attn_offset, f"it must be below attn_layer_period={attn_period}")
    dt_rank = c.get("mamba_dt_rank")
    dt_rank = math.ceil(n_embd / 16) if dt_rank == "auto" else dt_rank
    if isinstance(dt_rank, bool) or not isinstance(dt_rank, int) or dt_rank < 1:
        raise c.refuse("mamba_dt_rank", dt_rank, "it must be a positive integer or \"auto\"")
    hidden = c.int("intermediate_size")
    return JambaConfig(
        vocab_size=c.int("vocab_size"), pad_vocab_to=1, block_size=c.int("max_position_embeddings"),
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_kv_head=c.get("num_key_value_heads") or n_head,
        ffn_hidden=hidden, norm_eps=float(c.get("rms_norm_eps")), dropout=0.0, bias=False,
        tie_embeddings=bool(c.get("tie_word_embeddings")),
        n_experts=E, n_active_experts=k, expert_hidden=hidden, router="softmax", router_norm_topk=False,
        dropless=True, moe_every=period, moe_first_dense=offset,
        attn_layer_period=attn_period, attn_layer_offset=attn_offset,
        mamba_d_state=c.int("mamba_d_state"), mamba_d_conv=c.int("mamba_d_conv"), mamba_expand=c.int("mamba_expand"),
        mamba_dt_rank=dt_rank, mamba_conv_bias=bool(c.get("mamba_conv_bias")),
        mamba_proj_bias=bool(c.get("mamba_proj_bias")),
    )


def prepare_hf(sd: dict[str, torch.Tensor], m: JambaConfig, where: str) -> None:
    """Normalise an HF state dict in place: the `model.` prefix (absent in base-model files), the tied
    lm_head copy, and each MoE layer's per-expert matrices as transformers 5's fused stacks."""
    if "model.embed_tokens.weight" not in sd and "embed_tokens.weight" in sd:
        for key in [key for key in sd if key != "lm_head.weight"]:
            sd["model." + key] = sd.pop(key)
    if m.tie_embeddings:
        sd.pop("lm_head.weight", None)
    for i in range(m.n_layer):
        if is_moe_layer(m, i):
            prefix = f"model.layers.{i}.feed_forward."
            hf_moe._stack_experts(sd, prefix, m.n_experts, where)
            hf_moe._fuse_gate_up(sd, prefix, m.n_experts, expert_hidden(m), where)


def hf_name(ours: str, m: JambaConfig) -> tuple[str, bool]:
    """Our tensor name -> (HF name after `prepare_hf`, stored with the last two dims swapped)."""
    if ours in TOP_NAMES:
        return TOP_NAMES[ours], False
    _, i, rest = ours.split(".", 2)  # layers.N.<module>.<leaf>
    if rest in EXPERTS:
        return f"model.layers.{i}.{EXPERTS[rest]}", True
    if rest.startswith("mamba."):
        return f"model.layers.{i}.{rest}", False
    module, leaf = rest.rsplit(".", 1)
    name, swapped = LAYER_NAMES[module]
    return f"model.layers.{i}.{name}.{leaf}", swapped


def extra_tensors(m: JambaConfig) -> dict[str, torch.Tensor]:
    """The MoE layers' selection biases (read only by the sigmoid router): zero, for a strict load."""
    return {f"layers.{i}.feed_forward.select_bias": torch.zeros(m.n_experts)
            for i in range(m.n_layer) if is_moe_layer(m, i)}


# -- export ------------------------------------------------------------------------------------
def _check_exportable(m: JambaConfig) -> None:
    refusals = [
        (m.router != "softmax", f"model.router={m.router!r}", "HF's Jamba router is a softmax"),
        (m.router_norm_topk, "model.router_norm_topk=true", "HF's Jamba does not renormalise the top-k weights"),
        (m.n_shared_experts > 0, f"model.n_shared_experts={m.n_shared_experts}", "HF's Jamba has no shared expert"),
        (m.bias, "model.bias=true", "HF's Jamba attention has no biases"),
        (m.qk_norm, "model.qk_norm=true", "HF's Jamba attention has no QK-norm"),
        (m.sliding_window > 0, f"model.sliding_window={m.sliding_window}", "HF's Jamba attends to every position"),
        (expert_hidden(m) != ffn_hidden(m), f"model.expert_hidden={expert_hidden(m)}",
         f"HF's Jamba experts are as wide as its dense feed-forward ({ffn_hidden(m)})"),
        (m.moe_first_dense >= m.moe_every, f"model.moe_first_dense={m.moe_first_dense}",
         f"HF's expert_layer_offset must be below expert_layer_period={m.moe_every}"),
    ]
    for bad, setting, why in refusals:
        if bad:
            raise UserError(f"{setting} cannot be exported: {why}", fix="export a model without it")


def config_to_hf(m: JambaConfig, eos_id: int | None) -> dict[str, Any]:
    _check_exportable(m)
    return {
        "architectures": ["JambaForCausalLM"], "model_type": "jamba",
        "vocab_size": m.vocab_size, "hidden_size": m.n_embd, "intermediate_size": ffn_hidden(m),
        "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head, "num_key_value_heads": m.n_kv_head or m.n_head,
        "hidden_act": "silu", "max_position_embeddings": m.block_size, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "attention_dropout": m.dropout,
        "num_experts": m.n_experts, "num_experts_per_tok": m.n_active_experts,
        "expert_layer_period": m.moe_every, "expert_layer_offset": m.moe_first_dense,
        "attn_layer_period": m.attn_layer_period, "attn_layer_offset": m.attn_layer_offset,
        "mamba_d_state": m.mamba_d_state, "mamba_d_conv": m.mamba_d_conv, "mamba_expand": m.mamba_expand,
        "mamba_dt_rank": m.mamba_dt_rank or math.ceil(m.n_embd / 16), "mamba_conv_bias": m.mamba_conv_bias,
        "mamba_proj_bias": m.mamba_proj_bias, "router_aux_loss_coef": balance_loss_coef(m),
        "output_router_logits": False, "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "dtype": "float32", "torch_dtype": "float32",
    }


def extra_hf_tensors(m: JambaConfig) -> dict[str, torch.Tensor]:
    return {}


def finish_hf(tensors: dict[str, torch.Tensor], m: JambaConfig) -> None:
    """Each expert stack split into the per-expert matrices `save_pretrained` writes (`prepare_hf` in reverse)."""
    for i in range(m.n_layer):
        if not is_moe_layer(m, i):
            continue
        prefix = f"model.layers.{i}.feed_forward.experts."
        gate_up = tensors.pop(prefix + "gate_up_proj")  # (E, 2H, C), gate rows first
        down = tensors.pop(prefix + "down_proj")  # (E, C, H)
        H = gate_up.size(1) // 2
        for e in range(m.n_experts):  # own storage for each: safetensors refuses shared views
            tensors[f"{prefix}{e}.gate_proj.weight"] = gate_up[e, :H].clone()
            tensors[f"{prefix}{e}.up_proj.weight"] = gate_up[e, H:].clone()
            tensors[f"{prefix}{e}.down_proj.weight"] = down[e].clone()
