"""The tokenizer stage: byte, character, byte-level BPE, WordPiece and Unigram, written here.

`train_tokenizer(texts, cfg)` builds any kind from a `TokenizerConfig`; `load_tokenizer(path)`
reads any saved one back.
"""

from __future__ import annotations

from scratchlm.config import TokenizerConfig
from scratchlm.errors import UserError
from scratchlm.tokenizer import bpe, simple, unigram, wordpiece  # noqa: F401  (registers the kinds)
from scratchlm.tokenizer.base import KINDS, SpecialTokenError, Tokenizer, load_tokenizer
from scratchlm.tokenizer.bpe import BPETokenizer, train_bpe
from scratchlm.tokenizer.simple import ByteTokenizer, CharTokenizer
from scratchlm.tokenizer.unigram import UnigramTokenizer
from scratchlm.tokenizer.wordpiece import WordPieceTokenizer

__all__ = [
    "BPETokenizer", "ByteTokenizer", "CharTokenizer", "SpecialTokenError", "Tokenizer", "UnigramTokenizer",
    "WordPieceTokenizer", "load_tokenizer", "train_bpe", "train_tokenizer",
]


def train_tokenizer(texts: list[str], cfg: TokenizerConfig, progress: bool = True) -> Tokenizer:
    if cfg.kind not in KINDS:
        raise UserError(f"tokenizer.kind={cfg.kind!r} is unknown", fix=f"use one of {', '.join(sorted(KINDS))}")
    if not any(t.strip() for t in texts):
        raise UserError("no training text: every input is empty")
    return KINDS[cfg.kind].train(texts, cfg, progress=progress)
