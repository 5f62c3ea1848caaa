"""The Llama family in HF transformers (Llama, Mistral, Qwen2, Qwen3) <-> our `Llama`.

All four are one architecture with a few switches, which map onto our config as follows:

    HF                                   ours (LlamaConfig)
    hidden_size / num_hidden_layers      n_embd / n_layer
    num_attention_heads / _key_value_    n_head / n_kv_head
    intermediate_size                    ffn_hidden
    rms_norm_eps                         norm_eps
    max_position_embeddings              block_size
    rope_theta, rope_scaling|parameters  rope.theta, rope.scaling (linear, yarn), rope.factor, rope.original_context
    Qwen2's q/k/v biases                 bias (it covers wq, wk, wv; wo never has one)
    Qwen3's q_norm / k_norm              qk_norm
    Mistral's sliding_window             sliding_window (Qwen2/3's, when every layer uses it)

Tensor names differ only by name, not by layout: our RoPE uses HF's rotate-half pairing, so the
q and k projections need no permutation, and both sides use (out, in) `nn.Linear` weights.

Export picks the plainest HF class that holds the config: Llama; Mistral for a sliding window;
Qwen2 for q/k/v biases; Qwen3 for QK-norm (with zero o_proj biases if the model has q/k/v biases,
since Qwen3's `attention_bias` switches on all four). Our static "ntk" scaling has no HF type,
but it is plain RoPE with a larger base, so it is exported as rope_theta = theta·factor^(D/(D-2)).

Refused by name (our Llama cannot compute them): a head_dim other than hidden_size / heads,
activations other than SiLU, MLP biases, a non-zero o_proj bias, RoPE types other than default,
linear and yarn (llama3, dynamic, longrope, ...), partial rotary dims, and sliding windows on only
some layers.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from scratchlm.config import LlamaConfig, RopeConfig
from scratchlm.convert.hf_common import HFConfig
from scratchlm.errors import UserError
from scratchlm.model.llama import ffn_hidden

MODEL_TYPES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral", "Qwen2ForCausalLM": "qwen2",
               "Qwen3ForCausalLM": "qwen3"}
ARCHITECTURES = tuple(MODEL_TYPES)

# Each HF config class's defaults for the fields read here (transformers 5), for sparse config.json files.
_COMMON = {"vocab_size": 32000, "hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
           "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
           "head_dim": None, "attention_bias": False, "mlp_bias": False}
_QWEN = {**_COMMON, "vocab_size": 151936, "intermediate_size": 22016, "num_key_value_heads": 32,
         "max_position_embeddings": 32768, "use_sliding_window": False, "sliding_window": 4096,
         "max_window_layers": 28}
DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {**_COMMON, "intermediate_size": 11008, "num_key_value_heads": None, "max_position_embeddings": 2048},
    "mistral": {**_COMMON, "intermediate_size": 14336, "num_key_value_heads": 8, "max_position_embeddings": 131072,
                "sliding_window": 4096},
    "qwen2": _QWEN,
    "qwen3": {**_QWEN, "head_dim": 128},
}

# our name inside a layer -> HF's, for `layers.N.<ours>.weight|bias` <-> `model.layers.N.<HF>.weight|bias`
LAYER_NAMES = {
    "attention.wq": "self_attn.q_proj", "attention.wk": "self_attn.k_proj", "attention.wv": "self_attn.v_proj",
    "attention.wo": "self_attn.o_proj", "attention.q_norm": "self_attn.q_norm", "attention.k_norm": "self_attn.k_norm",
    "attention_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
    "feed_forward.w1": "mlp.gate_proj", "feed_forward.w3": "mlp.up_proj", "feed_forward.w2": "mlp.down_proj",
}
TOP_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}


def defaults(arch: str) -> dict[str, Any]:
    return DEFAULTS[MODEL_TYPES[arch]]


# -- import ------------------------------------------------------------------------------------
def attention_shape(c: HFConfig) -> tuple[int, int, int]:
    """(hidden size, heads, layers), refusing a head_dim our Llama cannot express."""
    n_embd, n_head, n_layer = c.int("hidden_size"), c.int("num_attention_heads"), c.int("num_hidden_layers")
    head_dim = c.get("head_dim") or n_embd // n_head
    if head_dim * n_head != n_embd:
        raise c.refuse("head_dim", head_dim, f"our Llama's head dim is hidden_size / num_attention_heads = "
                       f"{n_embd / n_head:g} (model/llama.py has no separate head_dim)")
    return n_embd, n_head, n_layer


def config_from_hf(c: HFConfig, arch: str) -> LlamaConfig:
    model_type = MODEL_TYPES[arch]
    n_embd, n_head, n_layer = attention_shape(c)
    c.require("hidden_act", ("silu",), "our feed-forward is SwiGLU with SiLU")
    if model_type == "llama":
        c.require("mlp_bias", (False,), "our feed-forward has no biases")
    # Qwen2 always has q/k/v biases; Llama's and Qwen3's attention_bias adds them to o_proj as well,
    # which `prepare_hf` accepts only when those o_proj biases are all zero.
    bias = model_type == "qwen2" or (model_type in ("llama", "qwen3") and bool(c.get("attention_bias")))
    block_size = c.int("max_position_embeddings")
    rope = rope_from_hf(c, block_size)
    return LlamaConfig(
        vocab_size=c.int("vocab_size"), pad_vocab_to=1, block_size=block_size,
        n_layer=n_layer, n_head=n_head, n_embd=n_embd, n_kv_head=c.get("num_key_value_heads") or n_head,
        ffn_hidden=c.int("intermediate_size"), norm_eps=float(c.get("rms_norm_eps")), dropout=0.0, bias=bias,
        tie_embeddings=bool(c.get("tie_word_embeddings")), rope=rope, qk_norm=model_type == "qwen3",
        sliding_window=window_from_hf(c, model_type, n_layer),
    )


def _mscale(factor: float, k: float = 1.0) -> float:
    """YaRN's attention temperature, as HF computes it (1 for factor <= 1)."""
    return 1.0 if factor <= 1 else 0.1 * k * math.log(factor) + 1.0


def rope_from_hf(c: HFConfig, max_positions: int) -> RopeConfig:
    """Our rope section (theta, scaling, factor, original_context) from either spelling:
    transformers 5's `rope_parameters` (theta inside) or 4's top-level `rope_theta` + `rope_scaling`."""
    key = "rope_parameters" if c.fields.get("rope_parameters") else "rope_scaling"
    params = dict(c.fields.get(key) or {})
    if params and all(isinstance(v, dict) for v in params.values()):  # one entry per layer type
        if len({json.dumps(v, sort_keys=True) for v in params.values()}) > 1:
            raise c.refuse(key, "per layer type", "our Llama uses one RoPE in every layer")
        params = next(iter(params.values()))
    theta = float(params.get("rope_theta") or c.get("rope_theta") or 10000.0)
    partial = params.get("partial_rotary_factor", c.get("partial_rotary_factor"))
    if partial not in (None, 1, 1.0):
        raise c.refuse("partial_rotary_factor", partial, "our RoPE rotates every dimension of a head")
    kind_key = "rope_type" if "rope_type" in params else "type"  # "type" in older files
    kind = params.get(kind_key, "default")
    if kind == "default":
        return RopeConfig(theta=theta)
    if kind == "linear":
        return RopeConfig(theta=theta, scaling="linear", factor=float(params["factor"]))
    if kind != "yarn":
        raise c.refuse(f"{key}.{kind_key}", kind, "our RoPE has default, linear and yarn scaling only (its 'ntk' is "
                       "static, not HF's 'dynamic'; llama3 and longrope are not implemented)")
    original = int(params.get("original_max_position_embeddings") or c.get("original_max_position_embeddings")
                   or max_positions)
    factor = float(params.get("factor") or max_positions / original)
    if factor < 1:
        raise c.refuse(f"{key}.factor", factor, "yarn shrinking the context (factor < 1) is not supported")
    for name, ok in (("beta_fast", (None, 32)), ("beta_slow", (None, 1)), ("truncate", (None, True))):
        if params.get(name) not in ok:
            raise c.refuse(f"{key}.{name}", params[name], f"our YaRN uses the paper's value {ok[1]}")
    mscale, mscale_all = params.get("mscale"), params.get("mscale_all_dim")
    attention = params.get("attention_factor")
    if attention is None:
        attention = _mscale(factor, mscale) / _mscale(factor, mscale_all) if mscale and mscale_all else _mscale(factor)
    if abs(attention - _mscale(factor)) > 1e-9:
        raise c.refuse(f"{key}.attention_factor", attention,
                       f"our YaRN scales attention by 0.1·ln(factor) + 1 = {_mscale(factor):.6g}")
    return RopeConfig(theta=theta, scaling="yarn", factor=factor, original_context=original)


def window_from_hf(c: HFConfig, model_type: str, n_layer: int) -> int:
    """Our single sliding window (0 = off). Qwen2/3 may window only some layers; ours windows all or none."""
    if model_type == "mistral":
        return int(c.get("sliding_window") or 0)
    if model_type not in ("qwen2", "qwen3") or not c.get("use_sliding_window") or not c.get("sliding_window"):
        return 0
    max_window_layers = c.get("max_window_layers") or 0
    kinds = c.get("layer_types") or ["sliding_attention" if i >= max_window_layers else "full_attention"
                                     for i in range(n_layer)]
    return single_window(c, kinds)


def single_window(c: HFConfig, kinds: list[str]) -> int:
    """Our one sliding window (0 = off) from HF's per-layer attention kinds: all full or all sliding."""
    if all(k == "full_attention" for k in kinds):
        return 0
    if all(k == "sliding_attention" for k in kinds):
        return int(c.get("sliding_window"))
    field = "layer_types" if c.get("layer_types") else "max_window_layers"
    raise c.refuse(field, c.get(field), "our Llama applies model.sliding_window to every layer or to none")


def prepare_hf(sd: dict[str, torch.Tensor], m: LlamaConfig, where: str) -> None:
    """Normalise an HF state dict in place: the `model.` prefix (absent in base-model files),
    minus old rotary buffers, zero o_proj biases, and the tied lm_head copy."""
    if "model.embed_tokens.weight" not in sd and "embed_tokens.weight" in sd:
        for k in [k for k in sd if k != "lm_head.weight"]:
            sd["model." + k] = sd.pop(k)
    for k in [k for k in sd if k.endswith("rotary_emb.inv_freq")]:
        del sd[k]
    for k in [k for k in sd if k.endswith("self_attn.o_proj.bias")]:
        if torch.count_nonzero(sd[k]):
            raise UserError(f"{where}: {k} is not zero, and our Llama's output projection (wo) has no bias",
                            fix="such a model needs wo biases in model/llama.py")
        del sd[k]
    if m.tie_embeddings:
        sd.pop("lm_head.weight", None)


def hf_name(ours: str, m: LlamaConfig) -> tuple[str, bool]:
    """Our tensor name -> (HF name, stored transposed: never for this family)."""
    if ours in TOP_NAMES:
        return TOP_NAMES[ours], False
    _, i, rest = ours.split(".", 2)  # layers.N.<module>.<weight|bias>
    module, leaf = rest.rsplit(".", 1)
    return f"model.layers.{i}.{LAYER_NAMES[module]}.{leaf}", False


# -- export ------------------------------------------------------------------------------------
def hf_model_type(m: LlamaConfig) -> str:
    if m.qk_norm:
        return "qwen3"
    if m.bias:
        return "qwen2"
    return "mistral" if m.sliding_window else "llama"


def rope_to_hf(m: LlamaConfig) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, the scaling dict or None) that make HF compute our inverse frequencies."""
    r = m.rope
    scaling = r.scaling if r.factor != 1.0 else "none"
    head_dim = m.n_embd // m.n_head
    if scaling == "none":
        return r.theta, None
    if scaling == "ntk":  # the same expression as layers.rope_frequencies, so the base is bit-identical
        return r.theta * r.factor ** (head_dim / (head_dim - 2)), None
    if scaling == "linear":
        return r.theta, {"rope_type": "linear", "factor": r.factor}
    if scaling == "yarn":
        return r.theta, {"rope_type": "yarn", "factor": r.factor,
                         "original_max_position_embeddings": r.original_context or m.block_size}
    raise UserError(f"model.rope.scaling={r.scaling!r} has no HF counterpart")


def config_to_hf(m: LlamaConfig, eos_id: int | None) -> dict[str, Any]:
    model_type = hf_model_type(m)
    arch = next(a for a, t in MODEL_TYPES.items() if t == model_type)
    theta, scaling = rope_to_hf(m)
    out: dict[str, Any] = {
        "architectures": [arch], "model_type": model_type,
        "vocab_size": m.vocab_size, "hidden_size": m.n_embd, "intermediate_size": ffn_hidden(m),
        "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_kv_head or m.n_head, "head_dim": m.n_embd // m.n_head, "hidden_act": "silu",
        "max_position_embeddings": m.block_size, "rms_norm_eps": m.norm_eps,
        "tie_word_embeddings": m.tie_embeddings, "attention_dropout": m.dropout,
        # Both spellings: transformers 5 reads rope_parameters (theta inside), 4.x rope_theta + rope_scaling.
        "rope_theta": theta, "rope_scaling": scaling,
        "rope_parameters": {**(scaling or {"rope_type": "default"}), "rope_theta": theta},
        "bos_token_id": eos_id, "eos_token_id": eos_id, "pad_token_id": None,
        "dtype": "float32", "torch_dtype": "float32",
    }
    if model_type == "llama":
        out.update(attention_bias=False, mlp_bias=False)
    elif model_type == "mistral":
        out["sliding_window"] = m.sliding_window
    else:  # Qwen2/3: a window on every layer (max_window_layers=0), or none
        out.update(use_sliding_window=m.sliding_window > 0, sliding_window=m.sliding_window or None,
                   max_window_layers=0,
                   layer_types=[("sliding" if m.sliding_window else "full") + "_attention"] * m.n_layer)
        if model_type == "qwen3":
            out["attention_bias"] = m.bias
    return out


def extra_hf_tensors(m: LlamaConfig) -> dict[str, torch.Tensor]:
    """Qwen3 with attention_bias has o_proj biases, which our model lacks: they are zero."""
    if hf_model_type(m) == "qwen3" and m.bias:
        return {f"model.layers.{i}.self_attn.o_proj.bias": torch.zeros(m.n_embd) for i in range(m.n_layer)}
    return {}


def extra_tensors(m: LlamaConfig) -> dict[str, torch.Tensor]:
    """Our persistent buffers with no HF counterpart: none (RoPE's tables are not persistent)."""
    return {}


def finish_hf(tensors: dict[str, torch.Tensor], m: LlamaConfig) -> None:
    """The exported tensors are already in HF's layout."""
