"""Tiny models and checkpoints for the inference and visualisation tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scratchlm.config import Config, ModelConfig
from scratchlm.model import build_model
from scratchlm.tokenizer import CharTokenizer
from scratchlm.train.checkpoint import save_checkpoint

CHARS = sorted(set("abcdefgh ijklmnop.\n"))


def tiny_config(**kw) -> ModelConfig:
    base = dict(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(seed: int = 0, std: float = 0.3, **kw) -> nn.Module:
    """A random tiny GPT in eval mode. Weights wider than GPT-2's init (std 0.3, not 0.02) spread
    the logits, so greedy choices are far from ties and sampled text varies with the seed."""
    torch.manual_seed(seed)
    model = build_model(tiny_config(**kw))
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, std)
    return model.eval()


def char_tokenizer() -> CharTokenizer:
    return CharTokenizer(CHARS, {"<|endoftext|>": len(CHARS)})


def make_checkpoint(run_dir: Path, **model_kw) -> Path:
    """A run folder with one checkpoint of a tiny random model and a char tokenizer."""
    tok = char_tokenizer()
    cfg = Config()
    cfg.tokenizer.kind = "char"
    cfg.model = tiny_config(**model_kw)
    model = tiny_model(**model_kw)
    save_checkpoint(run_dir, 1, model, torch.optim.AdamW(model.parameters()), cfg, tok, trainer={}, keep_last=1)
    return run_dir
