"""The mixture-of-experts families in HF transformers (Mixtral, Qwen2-MoE, Qwen3-MoE) <-> our `MoE`.

All three are the Llama-family decoder (`hf_llama.py` maps the attention, norms, RoPE and dense
layers) whose feed-forward is, in some layers, a softmax router over E SwiGLU experts:

    HF                                           ours (MoEConfig)
    num_local_experts | num_experts              n_experts
    num_experts_per_tok                          n_active_experts (top-k)
    Mixtral's intermediate_size                  expert_hidden (and ffn_hidden: Mixtral has no dense layer)
    Qwen's moe_intermediate_size                 expert_hidden
    Qwen's intermediate_size                     ffn_hidden (the dense layers)
    Mixtral: always renormalises the top-k       router="softmax", router_norm_topk=True
    Qwen's norm_topk_prob                        router="softmax", router_norm_topk
    Qwen's decoder_sparse_step, mlp_only_layers  moe_first_dense, moe_every (see `moe_layout`)
    Qwen2-MoE's shared_expert_intermediate_size  n_shared_experts x expert_hidden
    Qwen2-MoE's qkv_bias / Qwen3-MoE's q/k_norm  bias / qk_norm, as for Qwen2 / Qwen3

HF's router is ours exactly: softmax over all E logits (in fp32), top-k, then (optionally) the k
weights divided by their sum; every routed token is computed, so imports set dropless=True.

Expert tensors come in two layouts, both read: what `save_pretrained` writes (in transformers 4
and 5) and the hub holds, one (out, in) matrix per expert (`...block_sparse_moe.experts.{e}.w1/w3/w2`
for Mixtral, `...mlp.experts.{e}.gate_proj/up_proj/down_proj` for Qwen), and transformers 5's
in-memory fused form (`mlp.experts.gate_up_proj` (E, 2H, C), `mlp.experts.down_proj` (E, C, H)).
`prepare_hf` turns either into transformers 5's form: the per-expert (out, in) matrices stacked,
gate and up concatenated (gate rows first), which are our (in, out) `w13_EC2H` and `w2_EHC` with
the last two dims swapped (`hf_name` says "transposed"). Export writes the per-expert layout,
which transformers 4 and 5 both load.

Qwen2-MoE scales its shared expert by a per-token gate sigmoid(x · g); ours has no gate. The
gate is a constant 1/2 when g = 0, so such files import exactly (the 1/2 folded into the shared
down projection, a power of two: no rounding) and our shared experts export that way (g = 0,
down projection doubled). A non-zero g is refused by name: our model would need a gated shared
expert. Export picks: Mixtral for the plain case (every layer MoE, renormalised top-k, no biases,
no QK-norm, no shared expert); Qwen3-MoE for QK-norm; Qwen2-MoE otherwise (it has q/k/v biases,
norm_topk_prob, mlp_only_layers and a shared expert, given zero width when we have none).

Refused by name: what `hf_llama.py` refuses (head_dim, activations, RoPE types, per-layer windows,
non-zero o_proj biases), a non-zero Qwen2-MoE shared_expert_gate, a shared expert width that is
not a multiple of the expert width, MoE layers not evenly spaced after the first, and no MoE layer
at all; on export, the sigmoid router (DeepSeek-V3's needs MLA attention in HF) and shared experts
together with QK-norm. Export writes dropless HF models: a capacity-limited model's dropping is a
batch effect that HF does not reproduce (it is the same as our model with dropless=True).
"""

from __future__ import annotations

from typing import Any

import torch

from scratchlm.config import MoEConfig
from scratchlm.convert import hf_llama
from scratchlm.convert.hf_common import HFConfig
from scratchlm.errors import UserError
from scratchlm.model.llama import ffn_hidden
from scratchlm.model.moe import balance_loss_coef, expert_hidden, is_moe_layer

MODEL_TYPES = {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
               "Qwen3MoeForCausalLM": "qwen3_moe"}
ARCHITECTURES = tuple(MODEL_TYPES)

# Each HF config class's defaults for the fields read here (transformers 5), for sparse config.json files.
_COMMON = {"hidden_act": "silu", "tie_word_embeddings": False, "head_dim": None, "rope_theta": 10000.0,
           "rms_norm_eps": 1e-6, "decoder_sparse_step": 1, "mlp_only_layers": None, "norm_topk_prob": False,
           "use_sliding_window": False, "sliding_window": 4096}
DEFAULTS: dict[str, dict[str, Any]] = {
    "mixtral": {**_COMMON, "vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 14336,
                "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
                "max_position_embeddings": 131072, "rms_norm_eps": 1e-5, "rope_theta": 1e6, "sliding_window": None,
                "num_experts_per_tok": 2, "num_local_experts": 8},
    "qwen2_moe": {**_COMMON, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 5632,
                  "num_hidden_layers": 24, "num_attention_heads": 16, "num_key_value_heads": 16,
                  "max_position_embeddings": 32768, "max_window_layers": 28, "moe_intermediate_size": 1408,
                  "shared_expert_intermediate_size": 5632, "num_experts_per_tok": 4, "num_experts": 60,
                  "qkv_bias": True},
    "qwen3_moe": {**_COMMON, "vocab_size": 151936, "hidden_size": 2048, "intermediate_size": 6144,
                  "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 4,
                  "max_position_embeddings": 32768, "moe_intermediate_size": 768, "num_experts_per_tok": 8,
                  "num_experts": 128, "attention_bias": False},
}

# our name inside an MoE layer -> (HF's name after `prepare_hf`, stored with the last two dims swapped)
MOE_NAMES = {
    "feed_forward.gate.weight": ("mlp.gate.weight", False),
    "feed_forward.w13_EC2H": ("mlp.experts.gate_up_proj", True),  # ours (E, C, 2H), HF's (E, 2H, C)
    "feed_forward.w2_EHC": ("mlp.experts.down_proj", True),  # ours (E, H, C), HF's stack (E, C, H)
    "feed_forward.shared.w1.weight": ("mlp.shared_expert.gate_proj.weight", False),
    "feed_forward.shared.w3.weight": ("mlp.shared_expert.up_proj.weight", False),
    "feed_forward.shared.w2.weight": ("mlp.shared_expert.down_proj.weight", False),
}
PROJECTIONS = (("gate_proj", "w1"), ("up_proj", "w3"), ("down_proj", "w2"))  # Qwen's per-expert name, Mixtral's
SHARED = ("gate_proj", "up_proj", "down_proj")


def defaults(arch: str) -> dict[str, Any]:
    return DEFAULTS[MODEL_TYPES[arch]]


# -- import ------------------------------------------------------------------------------------
def n_experts_key(c: HFConfig) -> str:
    """Mixtral says num_local_experts; Qwen's files say num_experts, which transformers 5 saves for
    Qwen3-MoE as num_local_experts (an attribute alias)."""
    if "num_local_experts" in c.fields or ("num_experts" not in c.fields and "num_local_experts" in c.defaults):
        return "num_local_experts"
    return "num_experts"


def moe_layout(c: HFConfig, model_type: str, n_layer: int) -> tuple[int, int]:
    """(moe_first_dense, moe_every). HF makes layer i MoE when i is not in mlp_only_layers and
    (i + 1) % decoder_sparse_step == 0; ours when i >= first and (i - first) % every == 0. So a
    step s alone is first = s - 1, every = s; mlp_only_layers must leave an evenly spaced tail."""
    if model_type == "mixtral":
        return 0, 1
    step = c.int("decoder_sparse_step")
    dense_only = c.get("mlp_only_layers") or []
    moe = [i for i in range(n_layer) if i not in dense_only and (i + 1) % step == 0]
    field = "mlp_only_layers" if dense_only else "decoder_sparse_step"
    if not moe:
        raise c.refuse(field, c.get(field), "no layer is MoE, and our arch=moe needs at least one")
    first, every = moe[0], (moe[1] - moe[0] if len(moe) > 1 else n_layer)
    if moe != list(range(first, n_layer, every)):
        raise c.refuse(field, c.get(field), f"its MoE layers {moe} are not every k-th layer after the first dense "
                       "ones (our model.moe_first_dense + model.moe_every)")
    return first, every


def window(c: HFConfig, model_type: str, n_layer: int) -> int:
    """Our single sliding window (0 = off); Qwen2-MoE may window only some layers, ours all or none."""
    if model_type == "mixtral":
        return int(c.get("sliding_window") or 0)
    if not c.get("use_sliding_window") or not c.get("sliding_window"):
        return 0
    if model_type == "qwen3_moe":  # one window for every layer
        return int(c.get("sliding_window"))
    # Qwen2-MoE's default: the odd-numbered layers (i + 1 odd) below max_window_layers
    kinds = c.get("layer_types") or ["sliding_attention" if (i + 1) % 2 and i < c.get("max_window_layers")
                                     else "full_attention" for i in range(n_layer)]
    return hf_llama.single_window(c, kinds)


def config_from_hf(c: HFConfig, arch: str) -> MoEConfig:
    model_type = MODEL_TYPES[arch]
    n_embd, n_head, n_layer = hf_llama.attention_shape(c)
    c.require("hidden_act", ("silu",), "our experts are SwiGLU with SiLU")
    E, k = c.int(n_experts_key(c)), c.int("num_experts_per_tok")
    if k > E:
        raise c.refuse("num_experts_per_tok", k, f"more than the {E} experts")
    first_dense, every = moe_layout(c, model_type, n_layer)
    if model_type == "mixtral":
        hidden = dense_hidden = c.int("intermediate_size")
    else:
        hidden, dense_hidden = c.int("moe_intermediate_size"), c.int("intermediate_size")
    n_shared = 0
    if model_type == "qwen2_moe":
        shared_width = c.get("shared_expert_intermediate_size") or 0
        n_shared = shared_width // hidden
        if shared_width % hidden or n_shared > E:
            raise c.refuse("shared_expert_intermediate_size", shared_width, f"our shared experts are "
                           f"model.n_shared_experts <= {E} experts of width moe_intermediate_size={hidden}")
    # q/k/v biases: Qwen2-MoE's qkv_bias; Qwen3-MoE's attention_bias, with o_proj biases that `prepare_hf`
    # accepts only when zero. Mixtral has none.
    bias = {"mixtral": False, "qwen2_moe": bool(c.get("qkv_bias")), "qwen3_moe": bool(c.get("attention_bias"))}
    block_size = c.int("max_position_embeddings")
    rope = hf_llama.rope_from_hf(c, block_size)
    return MoEConfig(
        vocab_size=c.int("vocab_size"), pad_vocab_to=1, block_size=block_size,
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_kv_head=c.get("num_key_value_heads") or n_head,
        ffn_hidden=dense_hidden, norm_eps=float(c.get("rms_norm_eps")), dropout=0.0, bias=bias[model_type],
        tie_embeddings=bool(c.get("tie_word_embeddings")), rope=rope, qk_norm=model_type == "qwen3_moe",
        sliding_window=window(c, model_type, n_layer),
        n_experts=E, n_active_experts=k, n_shared_experts=n_shared, expert_hidden=hidden, router="softmax",
        router_norm_topk=model_type == "mixtral" or bool(c.get("norm_topk_prob")), dropless=True,
        moe_every=every, moe_first_dense=first_dense,
    )


def _stack_experts(sd: dict[str, torch.Tensor], prefix: str, E: int, where: str) -> None:
    """Per-expert (out, in) matrices `{prefix}experts.{e}.{name}.weight` -> one (E, out, in) stack
    `{prefix}experts.{proj}`; a partial set names the first missing expert."""
    for proj, alias in PROJECTIONS:
        for name in (proj, alias):
            keys = [f"{prefix}experts.{e}.{name}.weight" for e in range(E)]
            absent = [key for key in keys if key not in sd]
            if len(absent) == E:
                continue
            if absent:
                raise UserError(f"{where}: missing tensors {absent[0]} ({len(absent)} of the {E} experts' {name})",
                                fix="the weights are incomplete or have fewer experts than config.json")
            try:
                sd[f"{prefix}experts.{proj}"] = torch.stack([sd.pop(key) for key in keys])
            except RuntimeError:
                raise UserError(f"{where}: the tensors {prefix}experts.*.{name}.weight differ in shape",
                                fix="the weights do not belong to this config.json") from None


def _fuse_gate_up(sd: dict[str, torch.Tensor], prefix: str, E: int, H: int, where: str) -> None:
    """gate_proj and up_proj stacks (E, H, C) -> transformers 5's `gate_up_proj` (E, 2H, C), gate rows
    first; a fused tensor already there has its shape checked."""
    key, gate, up = (f"{prefix}experts.{name}" for name in ("gate_up_proj", "gate_proj", "up_proj"))
    if key in sd:
        t = sd[key]
        if gate not in sd and (t.dim() != 3 or t.shape[:2] != (E, 2 * H)):
            raise UserError(f"{where}: tensor {key} has shape {tuple(t.shape)}, config.json implies "
                            f"({E}, {2 * H}, C)", fix="the weights do not belong to this config.json")
        return  # both layouts at once: the extra ones are reported unexpected
    if gate in sd and up in sd:
        sd[key] = torch.cat([sd.pop(gate), sd.pop(up)], dim=1)
    # otherwise gate_up_proj is reported missing


def _fold_shared_gate(sd: dict[str, torch.Tensor], prefix: str, n_shared: int, where: str) -> None:
    """Qwen2-MoE's shared_expert_gate: accepted when zero (a constant sigmoid(0) = 1/2, folded into the
    down projection), or irrelevant when the shared expert has zero width (its output is 0)."""
    gate_key = f"{prefix}shared_expert_gate.weight"
    if n_shared == 0:
        empty = [f"{prefix}shared_expert.{p}.weight" for p in SHARED]
        if all(key in sd and sd[key].numel() == 0 for key in empty):
            for key in [*empty, gate_key]:
                sd.pop(key, None)
        return
    g = sd.pop(gate_key, None)
    if g is None:
        raise UserError(f"{where}: missing tensors {gate_key}", fix="the weights are incomplete")
    if torch.count_nonzero(g):
        raise UserError(f"{where}: {gate_key} is not zero: Qwen2-MoE scales the shared expert by sigmoid(x·g) "
                        "per token, and our shared experts are ungated",
                        fix="such a model needs a sigmoid gate (Linear n_embd -> 1) on MoELayer.shared in model/moe.py")
    down = f"{prefix}shared_expert.down_proj.weight"
    if down in sd:
        sd[down] = sd[down] * 0.5


def prepare_hf(sd: dict[str, torch.Tensor], m: MoEConfig, where: str) -> None:
    """Normalise an HF state dict in place: what `hf_llama.prepare_hf` does, Mixtral's
    `block_sparse_moe.` spelled `mlp.`, and each MoE layer's experts as stacks (module docstring)."""
    hf_llama.prepare_hf(sd, m, where)
    for key in [key for key in sd if ".block_sparse_moe." in key]:
        sd[key.replace(".block_sparse_moe.", ".mlp.")] = sd.pop(key)
    for i in range(m.n_layer):
        if is_moe_layer(m, i):
            prefix = f"model.layers.{i}.mlp."
            _stack_experts(sd, prefix, m.n_experts, where)
            _fuse_gate_up(sd, prefix, m.n_experts, expert_hidden(m), where)
            _fold_shared_gate(sd, prefix, m.n_shared_experts, where)


def hf_name(ours: str, m: MoEConfig) -> tuple[str, bool]:
    """Our tensor name -> (HF name after `prepare_hf`, stored with the last two dims swapped)."""
    if ours.startswith("layers."):
        _, i, rest = ours.split(".", 2)
        if rest in MOE_NAMES:
            name, swapped = MOE_NAMES[rest]
            return f"model.layers.{i}.{name}", swapped
    return hf_llama.hf_name(ours, m)


def extra_tensors(m: MoEConfig) -> dict[str, torch.Tensor]:
    """Our persistent buffers with no HF counterpart: the sigmoid router's selection biases, zero
    (the softmax router never reads them), so the checkpoint loads strictly."""
    return {f"layers.{i}.feed_forward.select_bias": torch.zeros(m.n_experts)
            for i in range(m.n_layer) if is_moe_layer(m, i)}


# -- export ------------------------------------------------------------------------------------
def hf_model_type(m: MoEConfig) -> str:
    if m.router != "softmax":
        raise UserError(f"model.router={m.router!r} has no HF transformers counterpart without custom code "
                        "(DeepSeek-V3's sigmoid router comes with MLA attention)", fix="export a softmax-router MoE")
    if m.qk_norm:
        if m.n_shared_experts:
            raise UserError(f"model.n_shared_experts={m.n_shared_experts} with model.qk_norm=true has no HF "
                            "counterpart (Qwen3-MoE has QK-norm but no shared expert, Qwen2-MoE the reverse)")
        return "qwen3_moe"
    all_moe = all(is_moe_layer(m, i) for i in range(m.n_layer))
    if all_moe and m.router_norm_topk and not m.bias and not m.n_shared_experts:
        return "mixtral"
    return "qwen2_moe"


def config_to_hf(m: MoEConfig, eos_id: int | None) -> dict[str, Any]:
    model_type = hf_model_type(m)
    arch = next(a for a, t in MODEL_TYPES.items() if t == model_type)
    theta, scaling = hf_llama.rope_to_hf(m)
    H = expert_hidden(m)
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.n_embd, "num_hidden_layers": m.n_layer,
        "num_attention_heads": m.n_head, "num_key_value_heads": m.n_kv_head or m.n_head,
        "head_dim": m.n_embd // m.n_head, "hidden_act": "silu", "max_position_embeddings": m.block_size,
        "rms_norm_eps": m.norm_eps, "tie_word_embeddings": m.tie_embeddings, "attention_dropout": m.dropout,
        # Both spellings: transformers 5 reads rope_parameters (theta inside), 4.x rope_theta + rope_scaling.
        "rope_theta": theta, "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta},
        "num_experts_per_tok": m.n_active_experts, "router_aux_loss_coef": balance_loss_coef(m),
        "output_router_logits": False,
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "dtype": "float32", "torch_dtype": "float32",
    }
    if model_type == "mixtral":
        out.update(intermediate_size=H, num_local_experts=m.n_experts, sliding_window=m.sliding_window or None,
                   router_jitter_noise=0.0)
        return out
    # Qwen: dense layers listed in mlp_only_layers (step 1), which holds any moe_first_dense / moe_every
    out.update(intermediate_size=ffn_hidden(m), moe_intermediate_size=H, num_experts=m.n_experts,
               norm_topk_prob=m.router_norm_topk, decoder_sparse_step=1,
               mlp_only_layers=[i for i in range(m.n_layer) if not is_moe_layer(m, i)],
               use_sliding_window=m.sliding_window > 0, sliding_window=m.sliding_window or None)
    if model_type == "qwen3_moe":
        out["attention_bias"] = m.bias
    else:
        out.update(qkv_bias=m.bias, shared_expert_intermediate_size=m.n_shared_experts * H,
                   max_window_layers=m.n_layer,
                   layer_types=[("sliding" if m.sliding_window else "full") + "_attention"] * m.n_layer)
    return out


def extra_hf_tensors(m: MoEConfig) -> dict[str, torch.Tensor]:
    """Tensors HF has and we lack: Qwen3-MoE's o_proj biases (with attention_bias) and Qwen2-MoE's
    shared-expert gates, all zero (see the module docstring for the gates)."""
    model_type = hf_model_type(m)
    out = {}
    if model_type == "qwen3_moe" and m.bias:
        out = {f"model.layers.{i}.self_attn.o_proj.bias": torch.zeros(m.n_embd) for i in range(m.n_layer)}
    if model_type == "qwen2_moe":
        out = {f"model.layers.{i}.mlp.shared_expert_gate.weight": torch.zeros(1, m.n_embd)
               for i in range(m.n_layer) if is_moe_layer(m, i)}
    return out


def finish_hf(tensors: dict[str, torch.Tensor], m: MoEConfig) -> None:
    """The exported tensors in HF's file layout, in place: each expert stack split into per-expert
    matrices (`prepare_hf` in reverse); Qwen2-MoE's shared down projection doubled for its zero
    gate, or a zero-width shared expert when we have none; Mixtral's `block_sparse_moe.` names."""
    model_type = hf_model_type(m)
    for i in range(m.n_layer):
        if not is_moe_layer(m, i):
            continue
        prefix = f"model.layers.{i}.mlp."
        gate_up = tensors.pop(f"{prefix}experts.gate_up_proj")  # (E, 2H, C), gate rows first
        H = gate_up.size(1) // 2
        tensors[f"{prefix}experts.gate_proj"], tensors[f"{prefix}experts.up_proj"] = gate_up[:, :H], gate_up[:, H:]
        for proj, alias in PROJECTIONS:
            stack = tensors.pop(f"{prefix}experts.{proj}")  # (E, out, in)
            name = alias if model_type == "mixtral" else proj
            for e in range(m.n_experts):
                tensors[f"{prefix}experts.{e}.{name}.weight"] = stack[e].clone()  # own storage: safetensors
        if model_type == "qwen2_moe":
            down = f"{prefix}shared_expert.down_proj.weight"
            if m.n_shared_experts:
                tensors[down] = tensors[down] * 2.0  # times sigmoid(0) = 1/2 in HF: exact
            else:  # Qwen2-MoE always has a shared expert: zero width, so it adds 0
                tensors[f"{prefix}shared_expert.gate_proj.weight"] = torch.zeros(0, m.n_embd)
                tensors[f"{prefix}shared_expert.up_proj.weight"] = torch.zeros(0, m.n_embd)
                tensors[down] = torch.zeros(m.n_embd, 0)
    if model_type == "mixtral":
        for key in [key for key in tensors if ".mlp." in key]:
            tensors[key.replace(".mlp.", ".block_sparse_moe.")] = tensors.pop(key)
