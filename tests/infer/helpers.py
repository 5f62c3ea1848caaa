"""Tiny models and checkpoints for the inference and visualisation tests (not a test module)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from scratchlm.checkpoint import save_checkpoint
from scratchlm.config import Config, ModelConfig
from scratchlm.model import build_model
from scratchlm.tokenizer import CharTokenizer

CHARS = sorted(set("abcdefgh ijklmnop.\n"))

# Two computations of the same fp32 logits (cached vs uncached, batched vs alone, by hand vs the
# cache, ours vs transformers') sum in different orders: different shapes take different GEMM paths,
# and those differ per CPU. The test models' logits reach about +-6 after 2-3 layers of ~100-term
# sums, each rounding at ~6e-8 relative; measured differences are up to 1.4e-5 (an AMD EPYC, the MoE
# model). A wrong mask, position or cache slot moves logits by 1e-2 or more, so this bound still
# catches every real bug.
LOGITS_ATOL, LOGITS_RTOL = 1e-4, 1e-5


def assert_logits_close(actual: torch.Tensor, expected: torch.Tensor, msg: str | None = None) -> None:
    torch.testing.assert_close(actual, expected, atol=LOGITS_ATOL, rtol=LOGITS_RTOL, msg=msg)


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
