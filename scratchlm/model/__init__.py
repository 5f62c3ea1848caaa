"""The model stage: baselines (bigram, MLP), the GPT and the Llama family, built from a `ModelConfig`."""

from __future__ import annotations

from torch import nn

from scratchlm.config import ModelConfig
from scratchlm.errors import UserError


def padded_vocab(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    """The embedding rows: the tokenizer's vocabulary rounded up to a multiple of `pad_vocab_to`."""
    v = cfg.vocab_size or tokenizer_vocab
    if v < tokenizer_vocab:
        raise UserError(f"model.vocab_size={v} is smaller than the tokenizer's {tokenizer_vocab} tokens",
                        fix="set --model.vocab_size=0 to follow the tokenizer")
    m = max(cfg.pad_vocab_to, 1)
    return (v + m - 1) // m * m


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate `cfg.arch` (its `vocab_size` already resolved by `padded_vocab`)."""
    from scratchlm.model.baselines import MLPLM, BigramLM
    from scratchlm.model.gpt import GPT
    from scratchlm.model.llama import Llama
    from scratchlm.model.moe import MoE

    archs = {"gpt": GPT, "llama": Llama, "moe": MoE, "bigram": BigramLM, "mlp": MLPLM}
    if cfg.arch not in archs:
        raise UserError(f"model.arch={cfg.arch!r} is unknown", fix=f"use one of {', '.join(archs)}")
    if cfg.vocab_size <= 0:
        raise UserError("model.vocab_size is not set", fix="build the model through the pretraining stage")
    return archs[cfg.arch](cfg)
