"""The model section: one config class per model family (scratchlm/model/), as torchtitan keeps
one args class per model.

    ModelConfig                      arch, vocab_size, pad_vocab_to, block_size: what every family reads
    ├── BigramConfig                 arch=bigram: nothing more (a (V, V) table)
    ├── MLPConfig                    arch=mlp: n_embd, mlp_context, mlp_hidden
    └── TransformerConfig            n_layer, n_head, n_embd, dropout, bias, attn_impl, tie_embeddings,
        │                            sliding_window (GPT and Llama alike)
        ├── GPTConfig                arch=gpt: + pos_emb
        └── LlamaConfig              arch=llama: + n_kv_head, ffn_hidden, norm_eps, qk_norm, rope (RopeConfig)
            └── MoEConfig            arch=moe: + the experts and the router
                └── MLAConfig        arch=mla: + latent attention, multi-token prediction (DeepSeek-V3)

`arch` names the family and is fixed by the class. `model_config("llama", n_head=8)` builds a
family by name; a field the family does not have is refused, naming the archs that have it (a
GPT has no `qk_norm`, where the flat config of old ignored it silently). `switch_arch` turns a
config into another family carrying over every field both have (`--model.arch=llama` on a GPT
preset keeps its sizes, its bias, ...). Each class's `validate()` checks the fields it declares and
the rules between them, after its parent's.

`migrate_flat_model` reads the model section of a config.json written before the families (one
flat class of 37 fields): rope_* become the rope section, and the fields of other families, which
that arch ignored, are dropped.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from dataclasses import dataclass, field
from typing import Annotated, Any, Literal

from scratchlm.config.fields import CONTEXT_CAP, VOCAB_CAP, Range, check_fields, flatten, not_one_of, suggest
from scratchlm.errors import UserError

Arch = Literal["gpt", "llama", "moe", "bigram", "mlp", "mla", "diff", "jamba", "nsa"]


@dataclass
class ModelConfig:
    """The network (`scratchlm/model/`): the fields every family reads. Build a family's config
    (`GPTConfig`, `LlamaConfig`, ...; `model_config(arch)`), not this base."""

    arch: Arch = field(default="gpt", init=False)  # the family; each class sets its own
    # 0 = the tokenizer's vocabulary, padded up to a multiple of pad_vocab_to
    vocab_size: Annotated[int, Range(f"[0, {VOCAB_CAP}]", "0 = the tokenizer's")] = 0
    # round the embedding table up for faster matmuls (GPT-2: 50257 -> 50304)
    pad_vocab_to: Annotated[int, Range(">= 1")] = 64
    block_size: Annotated[int, Range(f"[1, {CONTEXT_CAP}]")] = 64  # context length in tokens

    def validate(self) -> None:
        check_fields(self, "model.", ModelConfig)
        if MODEL_FAMILIES[self.arch] is not type(self):
            raise UserError(f"model.arch={self.arch} does not match the {type(self).__name__} holding the model "
                            "settings", fix=f"switch families with switch_arch (the CLI: --model.arch={self.arch})")


@dataclass
class BigramConfig(ModelConfig):
    """arch=bigram: next-token logits read from a (V, V) table; nothing to size but the vocabulary."""

    arch: Arch = field(default="bigram", init=False)


@dataclass
class MLPConfig(ModelConfig):
    """arch=mlp: Bengio et al. 2003 (makemore): the previous tokens' embeddings, one tanh layer."""

    arch: Arch = field(default="mlp", init=False)
    n_embd: Annotated[int, Range(">= 1")] = 128  # embedding width of each context token
    mlp_context: Annotated[int, Range(">= 1")] = 3  # previous tokens the MLP sees
    mlp_hidden: Annotated[int, Range(">= 1")] = 256  # hidden units

    def validate(self) -> None:
        super().validate()
        check_fields(self, "model.", MLPConfig)


@dataclass
class TransformerConfig(ModelConfig):
    """What GPT and the Llama family share: a stack of attention + feed-forward blocks.
    Sizes default to nanoGPT's CPU "baby" model."""

    n_layer: Annotated[int, Range(">= 1")] = 4
    n_head: Annotated[int, Range(">= 1")] = 4
    n_embd: Annotated[int, Range(">= 1")] = 128
    dropout: Annotated[float, Range("[0, 1)")] = 0.0
    bias: bool = True  # biases in linears and norms, as GPT-2 (Llama: in the q/k/v projections, as Qwen2)
    # sdpa (fused kernel) | explicit (softmax(QK^T/sqrt(d) + mask) V, for teaching)
    attn_impl: Literal["sdpa", "explicit"] = "sdpa"
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    # attend to at most this many previous tokens (Mistral); 0 = full causal
    sliding_window: Annotated[int, Range(">= 0", "0 = full causal attention")] = 0

    def validate(self) -> None:
        super().validate()
        check_fields(self, "model.", TransformerConfig)
        if self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} must be a multiple of model.n_head={self.n_head}")


@dataclass
class GPTConfig(TransformerConfig):
    """arch=gpt: GPT-2 (LayerNorm, GELU MLP, positions added to the token embedding)."""

    arch: Arch = field(default="gpt", init=False)
    pos_emb: Literal["learned", "sinusoidal"] = "learned"

    def validate(self) -> None:
        super().validate()
        check_fields(self, "model.", GPTConfig)


@dataclass
class RopeConfig:
    """Rotary positions (Su et al. 2021) and how to stretch them past the trained context."""

    theta: Annotated[float, Range("> 0")] = 10000.0
    scaling: Literal["none", "linear", "ntk", "yarn"] = "none"  # stretch RoPE past the trained context
    factor: Annotated[float, Range(">= 1")] = 1.0  # context extension factor for scaling
    # yarn: the context the model was trained with; 0 = block_size
    original_context: Annotated[int, Range(">= 0", "0 = block_size")] = 0

    def validate(self) -> None:
        check_fields(self, "model.rope.")


@dataclass
class LlamaConfig(TransformerConfig):
    """arch=llama, the modern decoder: RMSNorm, RoPE, SwiGLU, grouped-query attention."""

    arch: Arch = field(default="llama", init=False)
    # key/value heads; 0 = n_head (plain multi-head), 1 = multi-query
    n_kv_head: Annotated[int, Range(">= 0", "0 = n_head")] = 0
    # SwiGLU hidden size; 0 = 8/3 x n_embd rounded up to a multiple of 64
    ffn_hidden: Annotated[int, Range(">= 0", "0 = 8/3 x n_embd")] = 0
    norm_eps: Annotated[float, Range("> 0")] = 1e-5
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3, OLMo 2)
    rope: RopeConfig = field(default_factory=RopeConfig)

    def validate(self) -> None:
        super().validate()
        check_fields(self, "model.", LlamaConfig)
        self.rope.validate()
        if self.n_head % (self.n_kv_head or self.n_head):
            raise UserError(f"model.n_kv_head={self.n_kv_head} must divide model.n_head={self.n_head}",
                            fix="use a divisor of n_head: 1 = multi-query, 0 = n_head")
        if (self.n_embd // self.n_head) % 2:
            raise UserError(f"model.n_embd={self.n_embd} / model.n_head={self.n_head} must give an even head "
                            "dim: RoPE rotates pairs of dims")


@dataclass
class MoEConfig(LlamaConfig):
    """arch=moe: the Llama blocks with routed experts in place of some feed-forwards."""

    arch: Arch = field(default="moe", init=False)
    n_experts: Annotated[int, Range(">= 1")] = 8  # routed experts per MoE layer
    n_active_experts: Annotated[int, Range(">= 1")] = 2  # top-k experts each token is sent to
    n_shared_experts: Annotated[int, Range(">= 0")] = 0  # experts every token passes through (DeepSeek-MoE)
    # SwiGLU hidden size of one expert; 0 = ffn_hidden / n_active_experts
    expert_hidden: Annotated[int, Range(">= 0", "0 = ffn_hidden / n_active_experts")] = 0
    # softmax (Switch/Mixtral) | sigmoid (DeepSeek-V3, aux-loss-free bias balancing)
    router: Literal["softmax", "sigmoid"] = "softmax"
    router_norm_topk: bool = True  # renormalise the top-k weights to sum to 1
    # group-limited routing (DeepSeek-V3): experts in this many equal groups, each token routed within the
    # topk_groups groups whose two best selection scores sum highest; 1 = no groups, topk_groups 0 = all groups
    expert_groups: Annotated[int, Range(">= 1")] = 1
    topk_groups: Annotated[int, Range(">= 0", "0 = all groups")] = 0
    routed_scale: Annotated[float, Range("> 0")] = 1.0  # routed experts' weights times this (routed_scaling_factor)
    dropless: bool = True  # every routed token is computed; False = capacity limit with dropping
    # when not dropless: slots per expert = factor x tokens x k / n_experts
    capacity_factor: Annotated[float, Range("> 0")] = 1.25
    # every k-th layer is MoE (hybrid models), counted from moe_first_dense
    moe_every: Annotated[int, Range(">= 1")] = 1
    moe_first_dense: Annotated[int, Range(">= 0")] = 0  # the first n layers stay dense
    # Switch/GShard load-balancing loss weight; None = 0.01 with the softmax router, 0 with the sigmoid one
    # (aux-loss-free: its selection bias balances instead)
    aux_loss_coef: Annotated[float | None, Range(">= 0", "unset = 0.01 with softmax, 0 with sigmoid")] = None
    z_loss_coef: Annotated[float, Range(">= 0")] = 0.001  # router z-loss weight (ST-MoE)
    # sigmoid router: per-step nudge of each expert's selection bias
    bias_update_rate: Annotated[float, Range(">= 0")] = 0.001

    def validate(self) -> None:
        super().validate()
        check_fields(self, "model.", MoEConfig)
        for name in ("n_active_experts", "n_shared_experts"):
            if getattr(self, name) > self.n_experts:
                raise UserError(f"model.{name}={getattr(self, name)} must be <= model.n_experts={self.n_experts}")
        if self.moe_first_dense >= self.n_layer:
            raise UserError(f"model.moe_first_dense={self.moe_first_dense} must be < model.n_layer={self.n_layer}",
                            fix="leave at least one MoE layer")
        if self.n_experts % self.expert_groups:
            raise UserError(f"model.expert_groups={self.expert_groups} must divide model.n_experts={self.n_experts}")
        if self.topk_groups > self.expert_groups:
            raise UserError(f"model.topk_groups={self.topk_groups} must be <= model.expert_groups={self.expert_groups}")
        if self.topk_groups and self.topk_groups * (self.n_experts // self.expert_groups) < self.n_active_experts:
            raise UserError(f"model.topk_groups={self.topk_groups} groups of {self.n_experts // self.expert_groups} "
                            f"experts hold fewer than model.n_active_experts={self.n_active_experts}",
                            fix="route within more groups")


@dataclass
class MLAConfig(MoEConfig):
    """arch=mla, DeepSeek-V3 (model/mla.py): multi-head latent attention over a compressed key/value
    latent with a decoupled RoPE key, the MoE blocks (`moe_first_dense` dense layers first), and
    optional multi-token prediction modules."""

    arch: Arch = field(default="mla", init=False)
    kv_lora_rank: Annotated[int, Range(">= 1")] = 64  # width of the cached key/value latent
    q_lora_rank: Annotated[int, Range(">= 0", "0 = queries not compressed")] = 0  # width of the query latent
    qk_nope_head_dim: Annotated[int, Range(">= 1")] = 32  # per head: query/key dims without positions
    qk_rope_head_dim: Annotated[int, Range(">= 2")] = 16  # per head: query dims (one shared key) RoPE rotates
    v_head_dim: Annotated[int, Range(">= 1")] = 32  # per head: value dims
    # which attention path: naive (expand K and V from the latent) or absorbed (attend in the latent);
    # decode = absorbed with a cache (decoding), naive without (training); equal up to rounding
    mla_absorb: Literal["decode", "always", "never"] = "decode"
    mtp_depth: Annotated[int, Range(">= 0", "0 = no multi-token prediction")] = 0  # MTP modules (DeepSeek-V3)
    # training loss = next-token loss + weight x mean of the MTP depths' losses; 0 = MTP not trained
    mtp_loss_weight: Annotated[float, Range(">= 0", "0 = off")] = 0.3

    def validate(self) -> None:
        super().validate()
        check_fields(self, "model.", MLAConfig)
        if self.qk_rope_head_dim % 2:
            raise UserError(f"model.qk_rope_head_dim={self.qk_rope_head_dim} must be even: RoPE rotates pairs")
        if self.rope.scaling != "none":
            raise UserError(f"model.rope.scaling={self.rope.scaling} is not supported with arch=mla",
                            fix="use --model.rope.scaling=none")


@dataclass
class DiffConfig(LlamaConfig):
    """arch=diff: the Llama blocks with differential attention (Ye et al. 2024, model/diff_attn.py):
    each output is softmax(Q1K1ᵀ)V - λ·softmax(Q2K2ᵀ)V, the n_head query heads forming n_head/2 pairs."""

    arch: Arch = field(default="diff", init=False)
    lambda_std: Annotated[float, Range(">= 0")] = 0.1  # init std of λ's four vectors (HF's lambda_std_dev)
    # The per-pair RMSNorm x (1 - λ_init) on the attention output. false drops it: an ablation, not the
    # paper's model (preset diff-nonorm-tiny; `scratchlm experiment arch` shows what the norm costs here).
    sub_norm: bool = True

    def validate(self) -> None:
        super().validate()
        check_fields(self, "model.", DiffConfig)
        for name, n in (("n_head", self.n_head), ("n_kv_head", self.n_kv_head or self.n_head)):
            if n % 2:
                raise UserError(f"model.{name}={n} must be even for arch=diff: heads pair up into the two "
                                "softmax maps", fix=f"use an even model.{name}")


@dataclass
class JambaConfig(MoEConfig):
    """arch=jamba, the Jamba hybrid (Lieber et al. 2024, model/jamba.py): Mamba layers with one attention
    layer in every `attn_layer_period` (at `attn_layer_offset`), an MoE feed-forward every `moe_every`-th
    layer from `moe_first_dense` (Jamba's expert_layer_period / offset), the rest dense. Attention has
    no positional encoding (the Mamba layers carry order), so the rope section is not read."""

    arch: Arch = field(default="jamba", init=False)
    bias: bool = False
    attn_layer_period: Annotated[int, Range(">= 1")] = 4  # one attention layer in this many (Jamba v0.1: 8)
    attn_layer_offset: Annotated[int, Range(">= 0")] = 2  # the first attention layer's index (Jamba v0.1: 4)
    moe_every: Annotated[int, Range(">= 1")] = 2  # Jamba's expert_layer_period
    moe_first_dense: Annotated[int, Range(">= 0")] = 1  # Jamba's expert_layer_offset
    router_norm_topk: bool = False  # Jamba weighs the top-k by their softmax probabilities, unrenormalised
    mamba_d_state: Annotated[int, Range(">= 1")] = 16  # N: state size per channel
    mamba_d_conv: Annotated[int, Range(">= 1")] = 4  # width of the causal depthwise conv
    mamba_expand: Annotated[int, Range(">= 1")] = 2  # inner width = expand x n_embd
    mamba_dt_rank: Annotated[int, Range(">= 0", "0 = ceil(n_embd / 16)")] = 0  # rank of the step-size projection
    mamba_conv_bias: bool = True
    mamba_proj_bias: bool = False  # biases in in_proj and out_proj
    # sequential (a loop over time) | chunked (parallel prefix scan within chunks) | auto (chunked on
    # accelerators, sequential on CPUs); equal up to rounding
    mamba_scan: Literal["auto", "chunked", "sequential"] = "auto"
    mamba_chunk: Annotated[int, Range(">= 1")] = 16  # steps per chunk of the chunked scan

    def validate(self) -> None:
        super().validate()
        check_fields(self, "model.", JambaConfig)
        if self.attn_layer_offset >= self.attn_layer_period:
            raise UserError(f"model.attn_layer_offset={self.attn_layer_offset} must be < "
                            f"model.attn_layer_period={self.attn_layer_period}")


@dataclass
class NSAConfig(LlamaConfig):
    """arch=nsa: the Llama blocks with native sparse attention (DeepSeek 2025, model/nsa.py): per query, a
    gated sum of attention over compressed blocks, over the top-scoring blocks in full, and over a window."""

    arch: Arch = field(default="nsa", init=False)
    nsa_cmp_block: Annotated[int, Range(">= 1")] = 8  # l: tokens per compressed block
    nsa_cmp_stride: Annotated[int, Range(">= 1")] = 4  # d: positions between compressed blocks' starts
    nsa_sel_block: Annotated[int, Range(">= 1")] = 8  # l': tokens per selection block
    # n: blocks each query attends in full, the first block and its own among them
    nsa_n_selected: Annotated[int, Range(">= 2")] = 4
    nsa_window: Annotated[int, Range(">= 1")] = 16  # w: the sliding window branch's latest tokens

    def validate(self) -> None:
        super().validate()
        check_fields(self, "model.", NSAConfig)
        for name in ("nsa_cmp_block", "nsa_sel_block"):
            if getattr(self, name) % self.nsa_cmp_stride:
                raise UserError(f"model.{name}={getattr(self, name)} must be a multiple of "
                                f"model.nsa_cmp_stride={self.nsa_cmp_stride}", fix="blocks start on the stride's grid")
        if self.sliding_window:
            raise UserError(f"model.sliding_window={self.sliding_window} is not read by arch=nsa",
                            fix="set model.nsa_window (its window branch) and leave sliding_window=0")


MODEL_FAMILIES: dict[str, type[ModelConfig]] = {
    "gpt": GPTConfig, "llama": LlamaConfig, "moe": MoEConfig, "bigram": BigramConfig, "mlp": MLPConfig,
    "mla": MLAConfig, "diff": DiffConfig, "jamba": JambaConfig, "nsa": NSAConfig}


# ----------------------------------------------------------------------------------------------
# building, switching and checking families by name


@functools.cache
def field_names(cls: type) -> tuple[str, ...]:
    """A config class's fields, `arch` included, in declaration order."""
    return tuple(f.name for f in dataclasses.fields(cls))


def family_keys(cls: type[ModelConfig]) -> list[str]:
    """A family's settings as dotted keys (`rope.theta` for a nested section), `arch` left out."""
    return [k for k in flatten(dataclasses.asdict(cls())) if k != "arch"]


def family(arch: Any) -> type[ModelConfig]:
    """The config class of `arch`, or the error that lists the archs."""
    if not isinstance(arch, str) or arch not in MODEL_FAMILIES:
        raise not_one_of("model.arch", arch, MODEL_FAMILIES)
    return MODEL_FAMILIES[arch]


def check_model_key(cls: type[ModelConfig], key: str) -> None:
    """Refuse a model setting (`qk_norm`, `rope.theta`, ...) that `cls` lacks but another family has,
    or a flat name of old (`rope_theta`); names no family has are left to the caller's unknown-key error."""
    name = key.split(".", 1)[0]
    if name in field_names(cls):
        return
    if name in LEGACY_ROPE:
        raise UserError(f"model.{name} is now model.rope.{LEGACY_ROPE[name]}",
                        fix=f"write --model.rope.{LEGACY_ROPE[name]}=VALUE; arch=llama and moe have it")
    owners = [arch for arch, c in MODEL_FAMILIES.items() if name in field_names(c)]
    if owners:
        raise UserError(f"model.{name} is not a setting of model.arch={cls.arch}: only arch={', '.join(owners)} "
                        "have it", fix=f"set --model.arch={owners[0]}, which keeps the fields both have, or drop it")


def model_config(arch: str = "gpt", **fields: Any) -> ModelConfig:
    """The config of family `arch` with `fields` set; a field the family lacks raises UserError."""
    cls = family(arch)
    for name in fields:
        check_model_key(cls, name)
        if name not in field_names(cls):
            raise UserError(f"model.{name} is not a setting of model.arch={cls.arch}",
                            fix=suggest(name, field_names(cls), "keys"))
    return cls(**fields)


def switch_arch(model: ModelConfig, arch: Any) -> ModelConfig:
    """`model` as family `arch`: every field both families have carries over (copied), the rest
    take the new family's defaults. The same object when it already is that family."""
    cls = family(arch)
    if type(model) is cls:
        return model
    shared = {f.name: copy.deepcopy(getattr(model, f.name)) for f in dataclasses.fields(cls)
              if f.init and f.name in field_names(type(model))}
    return cls(**shared)


# ----------------------------------------------------------------------------------------------
# the flat layout of old

# The old flat names of the rope section's fields.
LEGACY_ROPE = {"rope_theta": "theta", "rope_scaling": "scaling", "rope_factor": "factor",
               "rope_original_context": "original_context"}


def migrate_flat_model(section: dict[str, Any]) -> dict[str, Any]:
    """A config.json's model section in today's layout. One written before the model families (a
    flat dict holding every field of every arch, rope_* among them) is rewritten: rope_* become
    `rope`, and the fields of other families, which its arch ignored, are dropped. Names no family
    has are kept, to fail by name when set. Today's layout (no rope_* keys) comes back as it is."""
    if not any(k in LEGACY_ROPE for k in section):
        return section
    arch = section.get("arch", "gpt")
    cls = MODEL_FAMILIES.get(arch) if isinstance(arch, str) else None
    if cls is None:
        return section  # setting the arch fails by name
    known = {name for c in MODEL_FAMILIES.values() for name in field_names(c)}
    out = {k: v for k, v in section.items() if k in field_names(cls) or (k not in known and k not in LEGACY_ROPE)}
    if "rope" in field_names(cls):
        out["rope"] = {new: section[old] for old, new in LEGACY_ROPE.items() if old in section}
    return out
