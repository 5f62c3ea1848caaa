"""HF transformers' DeepSeek-V3 (`DeepseekV3ForCausalLM`) <-> our arch=mla (model/mla.py).

    HF (DeepseekV3Config)                        ours (MLAConfig)
    kv_lora_rank, q_lora_rank (None = no lora)   kv_lora_rank, q_lora_rank (0 = none)
    qk_nope_head_dim, qk_rope_head_dim, v_head_dim   the same
    first_k_dense_replace                        moe_first_dense (then every layer MoE: moe_every=1)
    n_routed_experts, num_experts_per_tok        n_experts, n_active_experts
    n_shared_experts, moe_intermediate_size      n_shared_experts, expert_hidden
    intermediate_size                            ffn_hidden (the dense layers)
    n_group, topk_group, routed_scaling_factor   expert_groups, topk_groups, routed_scale
    sigmoid scores + e_score_correction_bias     router="sigmoid", the MoE layer's select_bias buffer
    attention_bias (q_a_proj, kv_a_proj, o_proj) bias (wq_a, wkv_a, wo)

The router is ours exactly: sigmoid of the fp32 logits, the bias added for the choice only, groups
scored by their two best, top-k in the best groups, the chosen raw scores renormalised (HF's
norm_topk_prob; ours always renormalises sigmoid weights, so norm_topk_prob=false is refused) and
scaled. RoPE: DeepSeek's checkpoints rotate interleaved pairs (x0, x1), (x2, x3), ... (rope_interleave);
ours rotates (x_i, x_{i+d/2}). Moving the even dims first and the odd dims after, in the rows that
make each head's q_pe and the shared k_pe, turns one into the other: the rotation is the same per
pair and q·k does not depend on the order of dims. So import permutes those rows, export permutes
them back (exports are written interleaved, as DeepSeek's own files). The latents' RMSNorms use a
fixed eps 1e-6 on both sides.

Refused by name: a non-SiLU activation, RoPE scaling (yarn's mscale folds into the softmax scale,
which our MLA does not model), norm_topk_prob=false, no MoE layer (first_k_dense_replace >= layers);
on export, a model with MTP modules (HF's DeepseekV3ForCausalLM runs none), no shared expert, a
softmax router or MoE layers not every layer after the dense ones.
"""

from __future__ import annotations

from typing import Any

import torch

from scratchlm.config.model import MLAConfig, RopeConfig
from scratchlm.convert import hf_llama, hf_moe
from scratchlm.convert.hf_common import HFConfig
from scratchlm.errors import UserError
from scratchlm.model.llama import ffn_hidden
from scratchlm.model.moe import expert_hidden, is_moe_layer

MODEL_TYPES = {"DeepseekV3ForCausalLM": "deepseek_v3"}
ARCHITECTURES = tuple(MODEL_TYPES)

# DeepseekV3Config's defaults (transformers 5) for the fields read here, for sparse config.json files.
DEFAULTS: dict[str, Any] = {
    "vocab_size": 129280, "hidden_size": 7168, "intermediate_size": 18432, "moe_intermediate_size": 2048,
    "num_hidden_layers": 61, "num_attention_heads": 128, "n_shared_experts": 1, "n_routed_experts": 256,
    "routed_scaling_factor": 2.5, "kv_lora_rank": 512, "q_lora_rank": 1536, "qk_rope_head_dim": 64,
    "v_head_dim": 128, "qk_nope_head_dim": 128, "n_group": 8, "topk_group": 4, "num_experts_per_tok": 8,
    "first_k_dense_replace": 3, "norm_topk_prob": True, "hidden_act": "silu", "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_interleave": True,
    "attention_bias": False,
}

ATTENTION = {"wq": "q_proj", "wq_a": "q_a_proj", "q_norm": "q_a_layernorm", "wq_b": "q_b_proj",
             "wkv_a": "kv_a_proj_with_mqa", "kv_norm": "kv_a_layernorm", "wkv_b": "kv_b_proj", "wo": "o_proj"}
FEED_FORWARD = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
MOE = {"gate.weight": ("mlp.gate.weight", False), "w13_EC2H": ("mlp.experts.gate_up_proj", True),
       "w2_EHC": ("mlp.experts.down_proj", True)}


def defaults(arch: str) -> dict[str, Any]:
    return DEFAULTS


def deinterleave(d: int) -> torch.Tensor:
    """The order that takes interleaved pairs to ours: even dims first, then odd ones."""
    return torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])


def _permute_rope_rows(w: torch.Tensor, heads: int, nope: int, rope: int, order: torch.Tensor) -> torch.Tensor:
    """Reorder the RoPE rows of a projection laid out as `heads` blocks of [nope | rope] rows."""
    shape = w.shape
    blocks = w.reshape(heads, nope + rope, *shape[1:])
    return torch.cat([blocks[:, :nope], blocks[:, nope:][:, order]], dim=1).reshape(shape)


def permute_rope(sd: dict[str, torch.Tensor], m: MLAConfig, order: torch.Tensor) -> None:
    """Apply `order` to the q_pe rows of every head and to the k_pe rows, in HF-named tensors, in place."""
    for i in range(m.n_layer):
        a = f"model.layers.{i}.self_attn."
        for name in ("q_proj.weight", "q_b_proj.weight"):
            if a + name in sd:
                sd[a + name] = _permute_rope_rows(sd[a + name], m.n_head, m.qk_nope_head_dim, m.qk_rope_head_dim,
                                                  order)
        for name in ("kv_a_proj_with_mqa.weight", "kv_a_proj_with_mqa.bias"):
            if a + name in sd:
                sd[a + name] = _permute_rope_rows(sd[a + name], 1, m.kv_lora_rank, m.qk_rope_head_dim, order)


# -- import ------------------------------------------------------------------------------------
def rope_theta(c: HFConfig) -> float:
    params = dict(c.fields.get("rope_parameters") or c.fields.get("rope_scaling") or {})
    if params.get("rope_type", params.get("type", "default")) != "default":
        raise c.refuse("rope_parameters", params, "our MLA has no RoPE scaling (yarn's mscale changes the softmax "
                       "scale of DeepSeek's attention)")
    return float(params.get("rope_theta") or c.get("rope_theta"))


def config_from_hf(c: HFConfig, arch: str) -> MLAConfig:
    n_embd, n_head, n_layer = c.int("hidden_size"), c.int("num_attention_heads"), c.int("num_hidden_layers")
    c.require("hidden_act", ("silu",), "our feed-forward and experts are SwiGLU with SiLU")
    c.require("norm_topk_prob", (True,), "our sigmoid router always renormalises its top-k weights")
    first = c.get("first_k_dense_replace") or 0
    if first >= n_layer:
        raise c.refuse("first_k_dense_replace", first, f"no MoE layer among {n_layer}; our arch=mla needs one")
    E, k = c.int("n_routed_experts"), c.int("num_experts_per_tok")
    groups, topk_groups = c.get("n_group") or 1, c.get("topk_group") or 0
    topk_groups = 0 if topk_groups >= groups else topk_groups  # every group allowed: ours says 0
    block_size = c.int("max_position_embeddings")
    m = MLAConfig(
        vocab_size=c.int("vocab_size"), pad_vocab_to=1, block_size=block_size, n_layer=n_layer, n_head=n_head,
        n_embd=n_embd, ffn_hidden=c.int("intermediate_size"), norm_eps=float(c.get("rms_norm_eps")), dropout=0.0,
        bias=bool(c.get("attention_bias")), tie_embeddings=bool(c.get("tie_word_embeddings")),
        rope=RopeConfig(theta=rope_theta(c)),
        kv_lora_rank=c.int("kv_lora_rank"), q_lora_rank=c.get("q_lora_rank") or 0,
        qk_nope_head_dim=c.int("qk_nope_head_dim"), qk_rope_head_dim=c.int("qk_rope_head_dim"),
        v_head_dim=c.int("v_head_dim"),
        n_experts=E, n_active_experts=k, n_shared_experts=c.get("n_shared_experts") or 0,
        expert_hidden=c.int("moe_intermediate_size"), router="sigmoid", router_norm_topk=True, dropless=True,
        moe_first_dense=first, moe_every=1, expert_groups=groups, topk_groups=topk_groups,
        routed_scale=float(c.get("routed_scaling_factor")), mtp_depth=0,
    )
    try:
        m.validate()
    except UserError as e:
        raise UserError(f"{c.where}: {e}") from None
    m._interleaved = bool(c.get("rope_interleave"))  # read by prepare_hf; not a setting of ours
    return m


def prepare_hf(sd: dict[str, torch.Tensor], m: MLAConfig, where: str) -> None:
    """Normalise an HF state dict in place: the `model.` prefix, the tied head, the MTP layers HF
    itself skips (`model.layers.{n_layer}...`), and interleaved RoPE rows in our order."""
    if "model.embed_tokens.weight" not in sd and "embed_tokens.weight" in sd:
        for key in [key for key in sd if key != "lm_head.weight"]:
            sd["model." + key] = sd.pop(key)
    for key in [key for key in sd if key.endswith("rotary_emb.inv_freq")
                or key.startswith(f"model.layers.{m.n_layer}.")]:
        del sd[key]
    if m.tie_embeddings:
        sd.pop("lm_head.weight", None)
    if getattr(m, "_interleaved", True):
        permute_rope(sd, m, deinterleave(m.qk_rope_head_dim))
    for i in range(m.n_layer):  # per-expert matrices (what save_pretrained writes) -> transformers 5's stacks
        if is_moe_layer(m, i):
            prefix = f"model.layers.{i}.mlp."
            hf_moe._stack_experts(sd, prefix, m.n_experts, where)
            hf_moe._fuse_gate_up(sd, prefix, m.n_experts, expert_hidden(m), where)


def hf_name(ours: str, m: MLAConfig) -> tuple[str, bool]:
    """Our tensor name -> (HF name, stored with the last two dims swapped)."""
    if ours in hf_llama.TOP_NAMES:
        return hf_llama.TOP_NAMES[ours], False
    _, i, rest = ours.split(".", 2)
    p = f"model.layers.{i}."
    if rest.startswith("attention."):
        module, leaf = rest[len("attention."):].rsplit(".", 1)
        return f"{p}self_attn.{ATTENTION[module]}.{leaf}", False
    if rest in ("attention_norm.weight", "ffn_norm.weight"):
        return p + hf_llama.LAYER_NAMES[rest.rsplit(".", 1)[0]] + ".weight", False
    sub = rest[len("feed_forward."):]
    if sub in MOE:
        name, swapped = MOE[sub]
        return p + name, swapped
    if sub.startswith("shared."):
        return f"{p}mlp.shared_experts.{FEED_FORWARD[sub.split('.')[1]]}.weight", False
    return f"{p}mlp.{FEED_FORWARD[sub.split('.')[0]]}.weight", False


def hf_buffers(m: MLAConfig) -> dict[str, str]:
    """Persistent buffers both sides store: each MoE layer's selection bias."""
    return {f"layers.{i}.feed_forward.select_bias": f"model.layers.{i}.mlp.gate.e_score_correction_bias"
            for i in range(m.n_layer) if is_moe_layer(m, i)}


def extra_tensors(m: MLAConfig) -> dict[str, torch.Tensor]:
    """Buffers of ours HF lacks: none (the selection biases are `hf_buffers`)."""
    return {}


# -- export ------------------------------------------------------------------------------------
def check_export(m: MLAConfig) -> None:
    if m.mtp_depth:
        raise UserError(f"model.mtp_depth={m.mtp_depth}: HF's DeepseekV3ForCausalLM runs no MTP modules",
                        fix="export a model without MTP modules (model.mtp_depth=0)")
    if m.router != "sigmoid" or not m.n_shared_experts or m.moe_every != 1:
        raise UserError(f"model.router={m.router}, n_shared_experts={m.n_shared_experts}, moe_every={m.moe_every}: "
                        "DeepSeek-V3 has a sigmoid router, shared experts and every layer MoE after the dense ones",
                        fix="export an arch=mla model with router=sigmoid, n_shared_experts >= 1, moe_every=1")


def config_to_hf(m: MLAConfig, eos_id: int | None) -> dict[str, Any]:
    check_export(m)
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": m.vocab_size, "hidden_size": m.n_embd, "intermediate_size": ffn_hidden(m),
        "moe_intermediate_size": expert_hidden(m), "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head, "num_key_value_heads": m.n_head,
        "n_shared_experts": m.n_shared_experts, "n_routed_experts": m.n_experts,
        "routed_scaling_factor": m.routed_scale, "kv_lora_rank": m.kv_lora_rank,
        "q_lora_rank": m.q_lora_rank or None, "qk_rope_head_dim": m.qk_rope_head_dim, "v_head_dim": m.v_head_dim,
        "qk_nope_head_dim": m.qk_nope_head_dim, "n_group": m.expert_groups,
        "topk_group": m.topk_groups or m.expert_groups, "num_experts_per_tok": m.n_active_experts,
        "first_k_dense_replace": m.moe_first_dense, "norm_topk_prob": True, "hidden_act": "silu",
        "max_position_embeddings": m.block_size, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "rope_interleave": True, "attention_bias": m.bias,
        "attention_dropout": m.dropout, "num_nextn_predict_layers": 0,
        "rope_theta": m.rope.theta, "rope_parameters": {"rope_type": "default", "rope_theta": m.rope.theta},
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "dtype": "float32", "torch_dtype": "float32",
    }


def extra_hf_tensors(m: MLAConfig) -> dict[str, torch.Tensor]:
    return {}


def finish_hf(tensors: dict[str, torch.Tensor], m: MLAConfig) -> None:
    """Our RoPE rows back to DeepSeek's interleaved order (rope_interleave=true), and each expert stack as
    per-expert matrices (`prepare_hf` in reverse)."""
    permute_rope(tensors, m, torch.argsort(deinterleave(m.qk_rope_head_dim)))
    for i in range(m.n_layer):
        if is_moe_layer(m, i):
            prefix = f"model.layers.{i}.mlp."
            gate_up = tensors.pop(f"{prefix}experts.gate_up_proj")  # (E, 2H, C), gate rows first
            H = gate_up.size(1) // 2
            stacks = {"gate_proj": gate_up[:, :H], "up_proj": gate_up[:, H:],
                      "down_proj": tensors.pop(f"{prefix}experts.down_proj")}
            for name, stack in stacks.items():
                for e in range(m.n_experts):
                    tensors[f"{prefix}experts.{e}.{name}.weight"] = stack[e].clone()  # own storage: safetensors
