"""The sections of a run's configuration, the whole `Config`, and CLI overrides.

A run's configuration is a `Config` holding one section per stage (the model section is one class
per model family: `model.py`). The CLI applies `--section.key=value` overrides on top of a preset
(`presets.py`); an unknown section or key fails with the close matches listed; `--model.arch=NAME`
switches the model family, carrying over the fields both have, and is applied before the other
overrides, so the family's own keys may come first on the command line. The resolved configuration
is written as `config.json` beside every artifact a stage writes, and read back with
`Config.from_dict` (which also reads the flat model section of old).

`Config.validate()` checks every field, then the rules that tie fields together (n_embd divisible
by n_head, min_lr <= lr, ...), and raises a one-line `UserError` naming `section.key=value` and
what is allowed. It runs where a config is built: at the end of `apply_overrides` (a preset plus
the command line) and of `from_dict` (a `config.json` read back), so a bad setting fails before any
data is read or any model is built. Code that builds a config by assignment (tests, benches) may
call `validate()` itself; the stages do not re-check.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

from scratchlm.config.align import CAIConfig, DPOConfig, PrefConfig, RMConfig
from scratchlm.config.fields import (
    DEVICE,
    DISTINCT_TEXTS,
    PATTERN,
    SEED,
    TEXT,
    TEXTS,
    VOCAB_CAP,
    Range,
    check_fields,
    flatten,
    set_field,
)
from scratchlm.config.model import GPTConfig, ModelConfig, check_model_key, migrate_flat_model, switch_arch
from scratchlm.config.rl import RLConfig
from scratchlm.errors import UserError
from scratchlm.io import write_json

# Reserved special tokens every BPE we train carries: document separator plus the chat markers
# the SFT stage uses, so a pretrained model never needs its embedding resized for chat.
DEFAULT_SPECIALS = ["<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|pad|>"]


@dataclass
class TokenizerConfig:
    """How to build a tokenizer (`scratchlm tokenizer train`)."""

    kind: Literal["bpe", "wordpiece", "unigram", "byte", "char"] = "bpe"
    vocab_size: Annotated[int, Range(f"[1, {VOCAB_CAP}]")] = 4096  # total, specials included; byte/char: from the data
    pattern: Annotated[str, PATTERN] = "gpt4"  # BPE pre-tokenization regex: gpt2 | gpt4 | a regex of your own
    special_tokens: Annotated[list[str], DISTINCT_TEXTS] = field(default_factory=lambda: list(DEFAULT_SPECIALS))
    jsonl_field: Annotated[str, TEXT] = "text"  # field read from JSONL inputs
    max_chars: Annotated[int, Range(">= 0", "0 = all")] = 0  # read at most this many characters of training text

    def validate(self) -> None:
        check_fields(self, "tokenizer.")
        least = 256 + len(self.special_tokens)  # byte-level BPE starts from the 256 bytes
        if self.kind == "bpe" and self.vocab_size < least:
            raise UserError(f"tokenizer.vocab_size={self.vocab_size} must be >= {least} for kind=bpe "
                            f"(256 bytes + {len(self.special_tokens)} special tokens)",
                            fix=f"use --tokenizer.vocab_size={least} or more")


@dataclass
class DataConfig:
    """How to turn documents into token shards (`scratchlm data prepare`)."""

    jsonl_field: Annotated[str, TEXT] = "text"  # field read from JSONL inputs
    val_fraction: Annotated[float, Range("[0, 1)")] = 0.05  # fraction of documents held out for validation
    dedup: bool = True  # drop exact duplicate documents
    dedup_normalize: bool = True  # exact dedup compares text with case, punctuation and whitespace normalised
    near_dedup: bool = True  # drop near-duplicate documents (MinHash + LSH), keeping the first of each cluster
    # the Jaccard similarity of shingle sets above which documents are near duplicates
    near_dedup_threshold: Annotated[float, Range("(0, 1]")] = 0.8
    near_dedup_ngram: Annotated[int, Range("[1, 64]")] = 5  # shingle size, in words or characters
    near_dedup_unit: Literal["word", "char"] = "word"  # shingles of words or of characters
    near_dedup_perms: Annotated[int, Range("[1, 1024]")] = 128  # MinHash permutations (signature length)
    # LSH bands (rows = perms // bands; approximate threshold (1/bands)^(1/rows)); 0 = chosen for the threshold
    near_dedup_bands: Annotated[int, Range(">= 0", "0 = chosen for the threshold")] = 0
    near_dedup_verify: bool = True  # keep only LSH candidates whose estimated Jaccard reaches the threshold
    min_chars: Annotated[int, Range(">= 0")] = 16  # drop documents shorter than this
    # drop documents where more lines than this repeat
    max_repeated_line_ratio: Annotated[float, Range("[0, 1]", "1 = keep all")] = 0.5
    # Gopher/C4-style quality rules (scratchlm/data/filters.py); each has an "off" value
    min_words: Annotated[int, Range(">= 0", "0 = off")] = 0  # drop documents with fewer words (Gopher: 50)
    max_words: Annotated[int, Range(">= 0", "0 = off")] = 0  # drop documents with more words (Gopher: 100,000)
    min_mean_word_length: Annotated[float, Range(">= 0", "0 = off")] = 0.0  # Gopher: 3
    max_mean_word_length: Annotated[float, Range(">= 0", "0 = off")] = 0.0  # Gopher: 10
    # ("#" + "..." + "…") per word above this drops a document (Gopher: 0.1)
    max_symbol_word_ratio: Annotated[float, Range(">= 0", "0 = off")] = 0.0
    # fraction of lines starting with a bullet above this drops a document (Gopher: 0.9)
    max_bullet_line_ratio: Annotated[float, Range("[0, 1]", "1 = keep all")] = 0.9
    # fraction of lines ending in an ellipsis above this drops a document (Gopher: 0.3)
    max_ellipsis_line_ratio: Annotated[float, Range("[0, 1]", "1 = keep all")] = 0.3
    # fraction of words holding a letter below this drops a document (Gopher: 0.8)
    min_alpha_word_fraction: Annotated[float, Range("[0, 1]", "0 = off")] = 0.0
    # fewer distinct English stop words than this drops a document (Gopher: 2)
    min_stop_words: Annotated[int, Range(">= 0", "0 = off")] = 0
    # the most frequent word 2-gram's share of the characters above this drops a document (3-, 4-grams:
    # scaled like Gopher's 0.20, 0.18, 0.16)
    max_top_ngram_fraction: Annotated[float, Range("[0, 1]", "1 = keep all")] = 1.0
    # the share of characters inside repeated word 5-grams above this drops a document (6..10-grams: scaled
    # like Gopher's 0.15 .. 0.10)
    max_dup_ngram_fraction: Annotated[float, Range("[0, 1]", "1 = keep all")] = 1.0
    # keep only documents whose letters are mostly of this script
    script: Literal["any", "latin", "cyrillic", "greek", "arabic", "hebrew", "devanagari", "cjk"] = "any"
    min_script_fraction: Annotated[float, Range("[0, 1]")] = 0.5  # the share of letters in `script` required
    scrub_pii: bool = False  # replace e-mail and IPv4 addresses with <email> and <ipv4>
    shard_tokens: Annotated[int, Range(">= 1")] = 16_777_216  # tokens per shard file
    workers: Annotated[int, Range(">= 0", "0 = one per core")] = 0  # tokenization processes
    seed: Annotated[int, SEED] = 1337  # seeds the train/val split

    def validate(self) -> None:
        check_fields(self, "data.")


@dataclass
class TrainConfig:
    """The hand-written pretraining loop (`scratchlm/train/`)."""

    batch_size: Annotated[int, Range(">= 1")] = 12  # sequences per micro-batch
    grad_accum: Annotated[int, Range(">= 1")] = 1  # micro-batches per optimizer step
    max_steps: Annotated[int, Range(">= 1")] = 2000
    lr: Annotated[float, Range("> 0")] = 1e-3
    min_lr: Annotated[float, Range(">= 0")] = 1e-4  # the schedule decays to this
    # cosine (warmup + cosine) | wsd (warmup-stable-decay) | constant
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    warmup_steps: Annotated[int, Range(">= 0")] = 100
    decay_frac: Annotated[float, Range("[0, 1]")] = 0.2  # wsd: fraction of steps spent decaying
    weight_decay: Annotated[float, Range(">= 0")] = 0.1  # matrices only; never norms, biases or embeddings
    beta1: Annotated[float, Range("[0, 1)")] = 0.9
    beta2: Annotated[float, Range("[0, 1)")] = 0.99
    grad_clip: Annotated[float, Range(">= 0", "0 = off")] = 1.0  # clip the global gradient norm
    # fp16 on GPU only, with a gradient scaler
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    compile: bool = False  # torch.compile the model
    # auto: ddp when torchrun starts more than one process, else none | none | ddp | fsdp (FSDP2, per block)
    parallel: Literal["auto", "none", "ddp", "fsdp"] = "auto"
    # recompute each k-th block's activations in backward instead of keeping them: 0 = off, 1 = every block
    activation_checkpointing: Annotated[int, Range(">= 0", "0 = off, 1 = every block")] = 0
    # auto: the largest micro-batch that fits memory_budget_gb, grad_accum raised to keep the step's batch
    micro_batch: Literal["fixed", "auto"] = "fixed"
    # micro_batch=auto's budget per process; 0 = 90% of the GPU's memory, or 80% of the RAM available now
    memory_budget_gb: Annotated[float, Range(">= 0", "0 = auto")] = 0.0
    device: Annotated[str, DEVICE] = "auto"  # auto | cpu | cuda | cuda:N | mps
    # torch CPU threads; 0 = auto: the cores other processes leave free now (OMP_NUM_THREADS, if set, decides)
    threads: Annotated[int, Range(">= 0", "0 = auto")] = 0
    eval_interval: Annotated[int, Range(">= 1")] = 250  # steps between validation passes
    eval_iters: Annotated[int, Range(">= 1")] = 20  # batches per validation pass
    log_interval: Annotated[int, Range(">= 1")] = 10
    # steps between checkpoints; 0 = only at the end
    ckpt_interval: Annotated[int, Range(">= 0", "0 = only at the end")] = 500
    # checkpoints kept besides the best (the latest is always kept)
    keep_last: Annotated[int, Range(">= 0")] = 2
    on_nan: Literal["stop", "skip"] = "stop"  # what a NaN/inf loss does
    profile_steps: Annotated[int, Range(">= 0", "0 = off")] = 0  # > 0: write a torch.profiler trace of this many steps
    tensorboard: bool = True
    wandb: bool = False

    def validate(self) -> None:
        check_fields(self, "train.")
        if self.min_lr > self.lr:
            raise UserError(f"train.min_lr={self.min_lr} must be <= train.lr={self.lr}: the schedule decays from lr "
                            "to min_lr", fix="lower --train.min_lr with --train.lr")


@dataclass
class SampleConfig:
    """Text generation (`scratchlm sample`; later chat, eval and serving use the same settings)."""

    max_new_tokens: Annotated[int, Range(">= 0")] = 200
    temperature: Annotated[float, Range(">= 0", "0 = greedy")] = 0.8
    top_k: Annotated[int, Range(">= 0", "0 = off")] = 0  # keep the k most likely tokens
    # nucleus: keep the smallest set with this much probability
    top_p: Annotated[float, Range("(0, 1]", "1 = off")] = 1.0
    # drop tokens below min_p x the top token's probability
    min_p: Annotated[float, Range("[0, 1]", "0 = off")] = 0.0
    # > 1 discourages tokens already in the context (CTRL-style)
    repetition_penalty: Annotated[float, Range("> 0", "1 = off")] = 1.0
    # stop strings; the EOS token always stops (an empty one would stop at once)
    stop: Annotated[list[str], TEXTS] = field(default_factory=list)
    num_samples: Annotated[int, Range("[1, 10000]")] = 1
    seed: Annotated[int, SEED] = 1337
    stream: bool = True  # print tokens as they come
    # kv (KV cache; slides past the context) | sink (attention sinks + rolling window) | none
    cache: Literal["kv", "sink", "none"] = "kv"
    # cache=sink: the first tokens, kept for good (StreamingLLM's attention sinks)
    sink_tokens: Annotated[int, Range(">= 0")] = 4
    # cache=sink: most recent tokens kept, the new one included; 0 = block_size - sink_tokens
    window: Annotated[int, Range(">= 0", "0 = the rest of the context")] = 0

    def validate(self) -> None:
        check_fields(self, "sample.")


@dataclass
class SFTConfig:
    """Supervised fine-tuning (`scratchlm sft`): data, packing, curriculum, LoRA / QLoRA."""

    base: str = ""  # the pretrained run or checkpoint to start from (a path: checked when opened)
    data: Annotated[list[str], TEXTS] = field(default_factory=list)  # JSON/JSONL files; empty = the embedded tasks
    format: Literal["auto", "alpaca", "messages", "prompt_completion"] = "auto"
    val_fraction: Annotated[float, Range("(0, 1)")] = 0.1  # held out for validation and gold evaluation
    packing: bool = True  # several examples per sequence, attention kept inside each
    overlong: Literal["truncate", "drop"] = "truncate"  # an example longer than the context
    curriculum: Literal["none", "length", "difficulty"] = "none"  # order of the training examples
    n_tasks: Annotated[int, Range(">= 1")] = 3000  # embedded task examples generated
    lora_r: Annotated[int, Range(">= 0", "0 = full fine-tuning")] = 0  # > 0 = LoRA rank
    lora_alpha: Annotated[float, Range("> 0")] = 16.0
    lora_dropout: Annotated[float, Range("[0, 1)")] = 0.0
    # module name patterns; empty = attention + MLP
    lora_targets: Annotated[list[str], TEXTS] = field(default_factory=list)
    quant_bits: Literal[0, 4, 8] = 0  # 4 or 8: QLoRA, the frozen base stored quantized
    # LoRA's adapters learn at train.lr x this (from B = 0, a low-rank update needs bigger steps; bench/sft.py)
    lora_lr_mult: Annotated[float, Range("> 0")] = 5.0
    # token embedding rows (and untied head rows) trained beside the adapters: all (PEFT's modules_to_save),
    # chat (only the chat markers' rows, which pretraining never trained), none
    lora_embedding: Literal["all", "chat", "none"] = "all"
    lora_embedding_lr_mult: Annotated[float, Range("> 0")] = 2.0  # their learning rate: train.lr x this
    eval_max_new_tokens: Annotated[int, Range(">= 1")] = 24

    def validate(self) -> None:
        check_fields(self, "sft.")
        if self.quant_bits and not self.lora_r:
            raise UserError(f"sft.quant_bits={self.quant_bits} needs LoRA (QLoRA trains adapters on a frozen "
                            "quantized base)", fix="set --sft.lora_r=8, or drop --sft.quant_bits")


@dataclass
class Config:
    """A whole run: a name, where artifacts go, and one section per stage."""

    name: Annotated[str, TEXT] = "default"
    out_dir: Annotated[str, TEXT] = "runs/default"
    seed: Annotated[int, SEED] = 1337
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=GPTConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    pref: PrefConfig = field(default_factory=PrefConfig)
    rm: RMConfig = field(default_factory=RMConfig)
    dpo: DPOConfig = field(default_factory=DPOConfig)
    cai: CAIConfig = field(default_factory=CAIConfig)
    rl: RLConfig = field(default_factory=RLConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, source: str = "config") -> Config:
        """The config a `to_dict` wrote (sections nested to any depth; unset keys keep their defaults).
        A model section in the flat layout of old is migrated first (`migrate_flat_model`)."""
        if not isinstance(d, dict):
            raise UserError(f"{source}: not a config (a JSON object of sections)")
        if isinstance(d.get("model"), dict):
            d = {**d, "model": migrate_flat_model(d["model"])}
        cfg = cls()
        for key, value in _arch_first(flatten(d).items()):
            set_setting(cfg, key, value, source=source)
        cfg.validate(source)
        return cfg

    def validate(self, source: str = "") -> None:
        """Check every field's range or choices, then the rules between fields; the first problem
        raises UserError (prefixed with `source`, e.g. the config.json it came from)."""
        try:
            check_fields(self, "")
            for name in SECTIONS:
                getattr(self, name).validate()
        except UserError as e:
            if source:
                raise UserError(f"{source}: {e}") from None
            raise

    def save(self, path: str | Path) -> None:
        write_json(path, self.to_dict())


# Config's fields that are sections
SECTIONS = ("tokenizer", "data", "model", "train", "sample", "sft", "pref", "rm", "dpo", "cai", "rl")


# ----------------------------------------------------------------------------------------------
# overrides


def set_setting(cfg: Config, dotted: str, value: Any, *, source: str = "override") -> None:
    """Set one dotted setting on `cfg`, as `set_field`, knowing the model families: `model.arch`
    switches `cfg.model` to that family (the fields both have carry over), and a model key of
    another family is refused, naming the archs that have it."""
    section, _, key = dotted.partition(".")
    if section == "model" and key:
        try:
            if key == "arch":
                cfg.model = switch_arch(cfg.model, value)
                return
            check_model_key(type(cfg.model), key)
        except UserError as e:
            raise UserError(f"{source}: {e}") from None
    set_field(cfg, dotted, value, source=source)


def _arch_first(items: Any) -> list[tuple[str, Any]]:
    """(dotted key, value) pairs with the model.arch ones first (else in order): the family is
    chosen before its own fields are set."""
    return sorted(items, key=lambda kv: kv[0] != "model.arch")


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--section.key=value` strings, model.arch first and the rest in order, then validate the
    result as a whole (a rule between two fields holds for the final values, whatever order they were
    set in)."""
    pairs = []
    for item in overrides:
        text = item[2:] if item.startswith("--") else item
        if "=" not in text:
            raise UserError(f"override {item!r} has no value", fix="write it as --section.key=value")
        pairs.append(tuple(text.split("=", 1)))
    for key, value in _arch_first(pairs):
        set_setting(cfg, key, value, source=f"--{key}")
    cfg.validate()
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
