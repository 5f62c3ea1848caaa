"""The model layer: baselines (bigram, MLP), the GPT and the Llama family built from a `ModelConfig`,
and the parts applied to a built model: LoRA (`lora.py`), quantized linears (`quant.py`), a grown vocabulary."""

from __future__ import annotations

import torch
from torch import nn

from scratchlm.config import ModelConfig
from scratchlm.errors import UserError
from scratchlm.model.base import LanguageModel
from scratchlm.model.baselines import MLPLM, BigramLM
from scratchlm.model.diff_attn import DiffTransformer
from scratchlm.model.gpt import GPT
from scratchlm.model.jamba import Jamba
from scratchlm.model.llama import Llama
from scratchlm.model.mla import MLA
from scratchlm.model.moe import MoE
from scratchlm.model.nsa import NSATransformer


def padded_vocab(cfg: ModelConfig, tokenizer_vocab: int) -> int:
    """The embedding rows: the tokenizer's vocabulary rounded up to a multiple of `pad_vocab_to`."""
    v = cfg.vocab_size or tokenizer_vocab
    if v < tokenizer_vocab:
        raise UserError(f"model.vocab_size={v} is smaller than the tokenizer's {tokenizer_vocab} tokens",
                        fix="set --model.vocab_size=0 to follow the tokenizer")
    m = max(cfg.pad_vocab_to, 1)
    return (v + m - 1) // m * m


def build_model(cfg: ModelConfig) -> LanguageModel:
    """Instantiate `cfg.arch` (its `vocab_size` already resolved by `padded_vocab`)."""
    archs = {"gpt": GPT, "llama": Llama, "moe": MoE, "bigram": BigramLM, "mlp": MLPLM, "mla": MLA,
             "diff": DiffTransformer, "jamba": Jamba, "nsa": NSATransformer}
    if cfg.arch not in archs:
        raise UserError(f"model.arch={cfg.arch!r} is unknown", fix=f"use one of {', '.join(archs)}")
    if cfg.vocab_size <= 0:
        raise UserError("model.vocab_size is not set", fix="build the model through the pretraining stage")
    return archs[cfg.arch](cfg)


def resize_embeddings(model: LanguageModel, new_vocab: int) -> bool:
    """Grow the token embedding (and an untied output head) to `new_vocab` rows; new rows are the
    mean of the old ones, a neutral start that gives new tokens average logits. Returns whether it grew."""
    emb = model.embedding
    if emb is None or emb.num_embeddings >= new_vocab:
        return False
    old = emb.weight.data
    grown = torch.cat([old, old.mean(0, keepdim=True).expand(new_vocab - old.size(0), -1)])
    emb.weight = nn.Parameter(grown)
    emb.num_embeddings = new_vocab
    head = model.unembedding
    if head is not None:
        if model.config.tie_embeddings:
            head.weight = emb.weight
        else:
            h = head.weight.data
            head.weight = nn.Parameter(torch.cat([h, h.mean(0, keepdim=True).expand(new_vocab - h.size(0), -1)]))
        head.out_features = new_vocab
    model.config.vocab_size = new_vocab
    return True
