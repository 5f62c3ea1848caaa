"""Checkpoints shared by the convert tests beyond tests/helpers.py: a chat model (a tokenizer with
the chat specials, as SFT leaves it)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from scratchlm.checkpoint import save_checkpoint
from scratchlm.config import Config, GPTConfig, TokenizerConfig, switch_arch
from scratchlm.model import build_model, padded_vocab
from scratchlm.tokenizer import BPETokenizer, Tokenizer
from scratchlm.tokenizer.chat import ensure_chat_specials
from tests.helpers import randomize, tiny_bpe


def checkpoint_with(tmp: Path, tok: Tokenizer, seed: int = 0, std: float = 0.2, **model_kw) \
        -> tuple[Path, nn.Module, Tokenizer]:
    """`tests.helpers.our_checkpoint` with a given tokenizer (and weight scale)."""
    cfg = Config(name="t", out_dir=str(tmp / "run"))
    cfg.tokenizer = TokenizerConfig(kind=tok.kind, vocab_size=tok.vocab_size, special_tokens=list(tok.special_tokens))
    arch = model_kw.pop("arch", "llama")
    cfg.model = replace(switch_arch(GPTConfig(block_size=16, n_layer=2, n_head=4, n_embd=32), arch), **model_kw)
    cfg.model.vocab_size = padded_vocab(cfg.model, tok.vocab_size)
    torch.manual_seed(seed)
    model = randomize(build_model(cfg.model), seed, std)
    save_checkpoint(Path(cfg.out_dir), 0, model, torch.optim.AdamW(model.parameters()), cfg, tok,
                    {"best_val_loss": None})
    return Path(cfg.out_dir), model, tok


def chat_bpe() -> BPETokenizer:
    """The tiny BPE with <|system|>, <|user|>, <|assistant|>, <|end|> appended, as SFT adds them."""
    tok, _ = ensure_chat_specials(tiny_bpe())
    return tok
