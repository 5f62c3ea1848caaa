"""WordPiece and Unigram through `train_tokenizer` and the CLI: train, save, encode, size errors."""

from __future__ import annotations

import random

import pytest

from scratchlm.cli import main
from scratchlm.config import TokenizerConfig
from scratchlm.tokenizer import load_tokenizer, train_tokenizer
from scratchlm.tokenizer.unigram import UnigramTokenizer
from scratchlm.tokenizer.wordpiece import WordPieceTokenizer


def synthetic_text(words: int = 3000) -> str:
    """Made-up words from a few syllables: enough distinct substrings to fill a small vocabulary."""
    rng = random.Random(0)
    syllables = ["ka", "lo", "mi", "ren", "tu", "sha", "ve", "dor", "qui", "zen", "pa", "the"]
    return " ".join("".join(rng.choices(syllables, k=rng.randint(1, 4))) for _ in range(words)) + ".\n"


@pytest.mark.parametrize("kind, cls", [("wordpiece", WordPieceTokenizer), ("unigram", UnigramTokenizer)])
def test_train_tokenizer_and_cli(tmp_path, capsys, kind, cls):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(synthetic_text(), encoding="utf-8")
    tok = train_tokenizer([corpus.read_text(encoding="utf-8")], TokenizerConfig(kind=kind, vocab_size=80),
                          progress=False)
    assert isinstance(tok, cls) and tok.vocab_size == 80

    out = tmp_path / "tok.json"
    rc = main(["tokenizer", "train", "--quiet", f"--tokenizer.kind={kind}", "--tokenizer.vocab_size=80",
               str(corpus), "--out", str(out)])
    assert rc == 0
    assert load_tokenizer(out).to_dict() == tok.to_dict()
    capsys.readouterr()
    assert main(["tokenizer", "encode", "--tokenizer", str(out), "kalo mi renzen"]) == 0
    ids = [int(x) for x in capsys.readouterr().out.split()]
    assert ids == tok.encode_ordinary("kalo mi renzen")

    rc = main(["tokenizer", "train", "--quiet", f"--tokenizer.kind={kind}", "--tokenizer.vocab_size=20",
               str(corpus), "--out", str(tmp_path / "small.json")])
    assert rc == 2
    assert "tokenizer.vocab_size=20" in capsys.readouterr().err
