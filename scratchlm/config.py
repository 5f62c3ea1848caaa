"""Typed configuration: one dataclass per pipeline stage, named presets, CLI overrides.

A run's configuration is a `Config` holding one section per stage. Presets are named functions
that start from the defaults and change a few fields. The CLI applies `--section.key=value`
overrides on top; an unknown section or key fails with the close matches listed. The resolved
configuration is written as `config.json` beside every artifact a stage writes, and can be read
back with `Config.from_dict`.

Later stages add their section here (model, train, ...), each as its own dataclass.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError
from scratchlm.io import write_json

# Reserved special tokens every BPE we train carries: document separator plus the chat markers
# the SFT stage uses, so a pretrained model never needs its embedding resized for chat.
DEFAULT_SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]


@dataclass
class TokenizerConfig:
    """How to build a tokenizer (`scratchlm tokenizer train`)."""

    kind: str = "bpe"  # bpe | wordpiece | unigram | byte | char
    vocab_size: int = 4096  # total, special tokens included
    pattern: str = "gpt4"  # BPE pre-tokenization regex: gpt2 | gpt4
    special_tokens: list[str] = field(default_factory=lambda: list(DEFAULT_SPECIALS))
    jsonl_field: str = "text"  # field read from JSONL inputs
    max_chars: int = 0  # read at most this many characters of training text; 0 = all


@dataclass
class DataConfig:
    """How to turn documents into token shards (`scratchlm data prepare`)."""

    jsonl_field: str = "text"  # field read from JSONL inputs
    val_fraction: float = 0.05  # fraction of documents held out for validation
    dedup: bool = True  # drop exact duplicate documents
    min_chars: int = 16  # drop documents shorter than this
    max_repeated_line_ratio: float = 0.5  # drop documents where more lines than this repeat
    shard_tokens: int = 16_777_216  # tokens per shard file
    workers: int = 0  # tokenization processes; 0 = one per core
    seed: int = 1337  # seeds the train/val split


@dataclass
class ModelConfig:
    """The network (`scratchlm/model/`). Sizes default to nanoGPT's CPU "baby" model."""

    arch: str = "gpt"  # gpt | llama | moe | bigram | mlp
    vocab_size: int = 0  # 0 = the tokenizer's vocabulary, padded up to a multiple of pad_vocab_to
    pad_vocab_to: int = 64  # round the embedding table up for faster matmuls (GPT-2: 50257 -> 50304)
    block_size: int = 64  # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 128
    dropout: float = 0.0
    bias: bool = True  # biases in linears and LayerNorms, as GPT-2
    pos_emb: str = "learned"  # learned | sinusoidal
    attn_impl: str = "sdpa"  # sdpa (fused kernel) | explicit (softmax(QK^T/sqrt(d) + mask) V, for teaching)
    tie_embeddings: bool = True  # LM head shares the token embedding matrix
    mlp_context: int = 3  # arch=mlp: previous tokens the MLP sees (makemore-style)
    mlp_hidden: int = 256  # arch=mlp: hidden units
    # arch=llama (the modern decoder): RMSNorm, RoPE, SwiGLU, grouped-query attention
    n_kv_head: int = 0  # key/value heads; 0 = n_head (plain multi-head), 1 = multi-query
    ffn_hidden: int = 0  # SwiGLU hidden size; 0 = 8/3 x n_embd rounded up to a multiple of 64
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: str = "none"  # none | linear | ntk | yarn: stretch RoPE past the trained context
    rope_factor: float = 1.0  # context extension factor for rope_scaling
    rope_original_context: int = 0  # yarn: the context the model was trained with; 0 = block_size
    qk_norm: bool = False  # RMSNorm on each head's queries and keys (Qwen3, OLMo 2)
    sliding_window: int = 0  # attend to at most this many previous tokens (Mistral); 0 = full causal
    # arch=moe (mixture of experts on top of the llama blocks)
    n_experts: int = 8  # routed experts per MoE layer
    n_active_experts: int = 2  # top-k experts each token is sent to
    n_shared_experts: int = 0  # experts every token passes through (DeepSeek-MoE)
    expert_hidden: int = 0  # SwiGLU hidden size of one expert; 0 = ffn_hidden / n_active_experts
    router: str = "softmax"  # softmax (Switch/Mixtral) | sigmoid (DeepSeek-V3, aux-loss-free bias balancing)
    router_norm_topk: bool = True  # renormalise the top-k weights to sum to 1
    dropless: bool = True  # every routed token is computed; False = capacity limit with dropping
    capacity_factor: float = 1.25  # when not dropless: slots per expert = factor x tokens x k / n_experts
    moe_every: int = 1  # every k-th layer is MoE (hybrid models), counted from moe_first_dense
    moe_first_dense: int = 0  # the first n layers stay dense
    aux_loss_coef: float = 0.01  # Switch/GShard load-balancing loss weight (0 with the sigmoid router)
    z_loss_coef: float = 0.001  # router z-loss weight (ST-MoE)
    bias_update_rate: float = 0.001  # sigmoid router: per-step nudge of each expert's selection bias


@dataclass
class TrainConfig:
    """The hand-written pretraining loop (`scratchlm/train/`)."""

    batch_size: int = 12  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 2000
    lr: float = 1e-3
    min_lr: float = 1e-4  # the schedule decays to this
    schedule: str = "cosine"  # cosine (warmup + cosine) | wsd (warmup-stable-decay) | constant
    warmup_steps: int = 100
    decay_frac: float = 0.2  # wsd: fraction of steps spent decaying
    weight_decay: float = 0.1  # matrices only; never norms, biases or embeddings
    beta1: float = 0.9
    beta2: float = 0.99
    grad_clip: float = 1.0  # clip the global gradient norm; 0 = off
    precision: str = "auto"  # auto | fp32 | bf16 | fp16 (fp16 on GPU only, with a gradient scaler)
    compile: bool = False  # torch.compile the model
    device: str = "auto"  # auto | cpu | cuda | mps
    eval_interval: int = 250  # steps between validation passes
    eval_iters: int = 20  # batches per validation pass
    log_interval: int = 10
    ckpt_interval: int = 500  # steps between checkpoints; 0 = only at the end
    keep_last: int = 2  # checkpoints kept besides the best
    on_nan: str = "stop"  # stop | skip: what a NaN/inf loss does
    profile_steps: int = 0  # > 0: write a torch.profiler trace of this many steps
    tensorboard: bool = True
    wandb: bool = False


@dataclass
class SampleConfig:
    """Text generation (`scratchlm sample`; later chat, eval and serving use the same settings)."""

    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0  # keep the k most likely tokens; 0 = off
    top_p: float = 1.0  # nucleus: keep the smallest set with this much probability; 1 = off
    min_p: float = 0.0  # drop tokens below min_p x the top token's probability; 0 = off
    repetition_penalty: float = 1.0  # > 1 discourages tokens already in the context (CTRL-style)
    stop: list[str] = field(default_factory=list)  # stop strings; the EOS token always stops
    num_samples: int = 1
    seed: int = 1337
    stream: bool = True  # print tokens as they come
    cache: str = "kv"  # kv (KV cache; slides past the context) | sink (attention sinks + rolling window) | none
    sink_tokens: int = 4  # cache=sink: the first tokens, kept for good (StreamingLLM's attention sinks)
    window: int = 0  # cache=sink: most recent tokens kept, the new one included; 0 = block_size - sink_tokens


@dataclass
class SFTConfig:
    """Supervised fine-tuning (`scratchlm sft`): data, packing, curriculum, LoRA / QLoRA."""

    base: str = ""  # the pretrained run or checkpoint to start from
    data: list[str] = field(default_factory=list)  # JSON/JSONL files; empty = the embedded tasks
    format: str = "auto"  # auto | alpaca | messages | prompt_completion
    val_fraction: float = 0.1  # held out for validation and gold evaluation
    packing: bool = True  # several examples per sequence, attention kept inside each
    overlong: str = "truncate"  # an example longer than the context: truncate | drop
    curriculum: str = "none"  # none | length | difficulty: order of the training examples
    n_tasks: int = 3000  # embedded task examples generated
    lora_r: int = 0  # 0 = full fine-tuning; > 0 = LoRA rank
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: list[str] = field(default_factory=list)  # module name patterns; empty = attention + MLP
    quant_bits: int = 0  # 4 or 8: QLoRA, the frozen base stored quantized
    eval_max_new_tokens: int = 24


@dataclass
class Config:
    """A whole run: a name, where artifacts go, and one section per stage."""

    name: str = "default"
    out_dir: str = "runs/default"
    seed: int = 1337
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> Config:
        cfg = cls()
        for key, value in d.items():
            if isinstance(value, dict):
                for sub, sub_value in value.items():
                    set_field(cfg, f"{key}.{sub}", sub_value, source=source)
            else:
                set_field(cfg, key, value, source=source)
        return cfg

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


# ----------------------------------------------------------------------------------------------
# presets

PRESETS: dict[str, Callable[[], Config]] = {}


def preset(fn: Callable[[], Config]) -> Callable[[], Config]:
    PRESETS[fn.__name__.replace("_", "-")] = fn
    return fn


@preset
def default() -> Config:
    return Config()


@preset
def tiny() -> Config:
    """The demo scale: a small BPE on the embedded corpus, trained in seconds on a laptop."""
    cfg = Config(name="tiny", out_dir="runs/tiny")
    cfg.tokenizer.vocab_size = 2048
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size = 4, 4, 128, 64
    t = cfg.train
    t.batch_size, t.max_steps, t.warmup_steps, t.lr, t.min_lr = 16, 600, 50, 2e-3, 2e-4
    t.eval_interval, t.eval_iters, t.ckpt_interval = 200, 10, 0
    cfg.sample.max_new_tokens = 40
    return cfg


def _shakespeare_char_data(cfg: Config) -> Config:
    """nanoGPT's shakespeare_char data: characters, one document, the last 10% for validation."""
    cfg.tokenizer.kind = "char"
    cfg.tokenizer.special_tokens = []
    cfg.data.val_fraction = 0.1
    cfg.data.dedup = False
    cfg.data.min_chars = 0
    cfg.data.max_repeated_line_ratio = 1.0
    return cfg


@preset
def char_tiny() -> Config:
    """nanoGPT's CPU "baby" shakespeare_char run: 4 layers, 4 heads, 128 dims, block 64, 2,000 steps,
    batch 12, dropout 0. nanoGPT uses lr 1e-3 -> 1e-4 and reaches a validation loss of about 1.88;
    the same model and steps at 2e-3 -> 2e-4 reach 1.82 here (bench/shakespeare_char.py)."""
    cfg = _shakespeare_char_data(Config(name="char-tiny", out_dir="runs/char-tiny"))
    cfg.train.lr, cfg.train.min_lr, cfg.train.max_steps = 2e-3, 2e-4, 2000
    return cfg


@preset
def shakespeare_char() -> Config:
    """nanoGPT's GPU shakespeare_char model: 6 layers, 6 heads, 384 dims, block 256, dropout 0.2."""
    cfg = _shakespeare_char_data(Config(name="shakespeare-char", out_dir="runs/shakespeare-char"))
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size, m.dropout = 6, 6, 384, 256, 0.2
    cfg.train.batch_size, cfg.train.max_steps, cfg.train.warmup_steps = 64, 5000, 100
    return cfg


@preset
def gpt2_124m() -> Config:
    """GPT-2 small: 12 layers, 12 heads, 768 dims, block 1024, vocab 50,257 padded to 50,304."""
    cfg = Config(name="gpt2-124m", out_dir="runs/gpt2-124m")
    m = cfg.model
    m.n_layer, m.n_head, m.n_embd, m.block_size = 12, 12, 768, 1024
    m.vocab_size, m.pad_vocab_to = 50257, 64
    t = cfg.train
    t.batch_size, t.grad_accum, t.lr, t.min_lr, t.beta2 = 8, 64, 6e-4, 6e-5, 0.95
    t.warmup_steps, t.max_steps = 700, 20_000
    return cfg


def _llama(cfg: Config, n_layer: int, n_head: int, n_kv_head: int, n_embd: int, block: int) -> Config:
    m = cfg.model
    m.arch, m.bias, m.dropout = "llama", False, 0.0
    m.n_layer, m.n_head, m.n_kv_head, m.n_embd, m.block_size = n_layer, n_head, n_kv_head, n_embd, block
    return cfg


@preset
def llama_tiny() -> Config:
    """A Llama-family model at demo scale: 4 layers, 4 query heads sharing 2 key/value heads, 128 dims."""
    cfg = _llama(tiny(), 4, 4, 2, 128, 64)
    cfg.name, cfg.out_dir = "llama-tiny", "runs/llama-tiny"
    return cfg


@preset
def llama_30m() -> Config:
    """About 30M parameters: 8 layers, 8 heads, 4 key/value heads, 512 dims, context 512."""
    cfg = _llama(Config(name="llama-30m", out_dir="runs/llama-30m"), 8, 8, 4, 512, 512)
    cfg.tokenizer.vocab_size = 8192
    return cfg


@preset
def llama_125m() -> Config:
    """A Llama-style ~125M model: 12 layers, 12 heads, 4 key/value heads, 768 dims, context 1024."""
    cfg = _llama(Config(name="llama-125m", out_dir="runs/llama-125m"), 12, 12, 4, 768, 1024)
    cfg.tokenizer.vocab_size = 32768
    t = cfg.train
    t.batch_size, t.grad_accum, t.lr, t.min_lr, t.beta2 = 8, 64, 6e-4, 6e-5, 0.95
    t.warmup_steps, t.max_steps = 700, 20_000
    return cfg


@preset
def moe_tiny() -> Config:
    """The demo's MoE: llama-tiny with 8 experts, top-2, each expert half the dense FFN, so the
    active parameters per token equal the dense model's."""
    cfg = llama_tiny()
    cfg.name, cfg.out_dir = "moe-tiny", "runs/moe-tiny"
    cfg.model.arch = "moe"
    return cfg


@preset
def sft_tiny() -> Config:
    """Fine-tuning the demo's model on the embedded tasks: a few hundred steps at a lower learning rate."""
    cfg = tiny()
    cfg.name, cfg.out_dir = "sft-tiny", "runs/sft-tiny"
    t = cfg.train
    t.max_steps, t.lr, t.min_lr, t.warmup_steps, t.eval_interval, t.eval_iters = 300, 1e-3, 1e-4, 20, 100, 5
    t.weight_decay = 0.0
    return cfg


def get_preset(name: str) -> Config:
    if name not in PRESETS:
        raise UserError(f"unknown preset {name!r}", fix=_suggest(name, PRESETS, "presets"))
    return PRESETS[name]()


# ----------------------------------------------------------------------------------------------
# overrides


def _suggest(word: str, options: typing.Iterable[str], what: str) -> str:
    options = sorted(options)
    close = difflib.get_close_matches(word, options, n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(close) + "?"
    return f"known {what}: " + ", ".join(options)


def _coerce(value: Any, tp: Any, name: str, source: str) -> Any:
    """Turn a CLI string (or JSON value) into the field's declared type."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, args[0], name, source)
    try:
        if origin is list:
            (item_tp,) = typing.get_args(tp)
            if isinstance(value, str):
                value = json.loads(value) if value.startswith("[") else [v for v in value.split(",") if v]
            return [_coerce(v, item_tp, name, source) for v in value]
        if tp is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() else int(value)
        if tp is float:
            return float(value)
        if tp is str:
            return str(value)
    except (ValueError, TypeError, json.JSONDecodeError):
        tname = getattr(tp, "__name__", str(tp))
        raise UserError(f"{source}: {name}={value!r} is not a valid {tname}") from None
    return value


def set_field(cfg: Any, dotted: str, value: Any, *, source: str = "override") -> None:
    """Set `section.key` (or a top-level `key`) on a config, with type checks and suggestions."""
    obj = cfg
    parts = dotted.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(obj)}
        if part not in fields:
            where = ".".join(parts[:i]) or "config"
            raise UserError(
                f"{source}: unknown key {dotted!r} in {where}",
                fix=_suggest(part, fields, "keys"),
            )
        if i == len(parts) - 1:
            hints = typing.get_type_hints(type(obj))
            if dataclasses.is_dataclass(hints[part]):
                raise UserError(f"{source}: {dotted!r} is a section; set one of its keys, e.g. {dotted}.KEY=VALUE")
            setattr(obj, part, _coerce(value, hints[part], dotted, source))
        else:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise UserError(f"{source}: {'.'.join(parts[: i + 1])!r} is not a section")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--section.key=value` strings in order."""
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise UserError(f"override {item!r} has no value", fix="write it as --section.key=value")
        key, value = text.split("=", 1)
        set_field(cfg, key, value, source=f"--{key}")
    return cfg


def load_config(path: str | Path) -> Config:
    """Read a `config.json` written beside an artifact."""
    path = Path(path)
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such config file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e})", fix="delete it and re-run the stage") from None
    return Config.from_dict(d, source=str(path))
