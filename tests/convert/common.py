"""Checkpoints shared by the convert tests beyond tests/helpers.py: a chat model (a tokenizer with
the chat specials, as SFT leaves it)."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from scratchlm.tokenizer import BPETokenizer, Tokenizer
from scratchlm.tokenizer.chat import ensure_chat_specials
from tests.helpers import our_checkpoint, tiny_bpe


def checkpoint_with(tmp: Path, tok: Tokenizer, seed: int = 0, std: float = 0.2, **model_kw) \
        -> tuple[Path, nn.Module, Tokenizer]:
    """`tests.helpers.our_checkpoint` with a given tokenizer (and weight scale), a Llama by default."""
    return our_checkpoint(tmp, seed, tok, std, **{"arch": "llama", **model_kw})


def chat_bpe() -> BPETokenizer:
    """The tiny BPE with <|system|>, <|user|>, <|assistant|>, <|end|> appended, as SFT adds them."""
    tok, _ = ensure_chat_specials(tiny_bpe())
    return tok
