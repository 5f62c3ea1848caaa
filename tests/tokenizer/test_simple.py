"""Byte and character tokenizers: exact round trips, specials, unknown characters, file format."""

from __future__ import annotations

import pytest

from scratchlm.config import TokenizerConfig
from scratchlm.tokenizer import ByteTokenizer, CharTokenizer, load_tokenizer, train_tokenizer


def test_byte_tokenizer_is_utf8():
    tok = train_tokenizer(["x"], TokenizerConfig(kind="byte", special_tokens=["<|endoftext|>"]))
    assert isinstance(tok, ByteTokenizer) and tok.vocab_size == 257 and tok.eot_id == 256
    text = "naïve 你好 🙂"
    ids = tok.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids + [256] + ids) == text + "<|endoftext|>" + text


def test_char_tokenizer_vocab_is_sorted_training_chars(tmp_path):
    cfg = TokenizerConfig(kind="char", special_tokens=[])
    tok = train_tokenizer(["hello", "world!"], cfg)
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == sorted(set("helloworld!"))
    assert tok.decode(tok.encode("low!")) == "low!"
    with pytest.raises(ValueError, match="'z' is not in this character vocabulary"):
        tok.encode("z")
    tok.save(tmp_path / "c.json")
    again = load_tokenizer(tmp_path / "c.json")
    assert again.encode("hello") == tok.encode("hello") and again.fingerprint() == tok.fingerprint()


def test_shakespeare_char_has_65_symbols(shakespeare):
    tok = train_tokenizer([shakespeare], TokenizerConfig(kind="char", special_tokens=[]))
    assert tok.vocab_size == 65  # the classic shakespeare_char vocabulary
    assert tok.decode(tok.encode(shakespeare[:1000])) == shakespeare[:1000]
