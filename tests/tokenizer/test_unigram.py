"""Unigram: id-for-id parity with the `sentencepiece` library given our pieces and scores (on
tinyshakespeare, adversarial strings and random vocabularies full of ties), the trainer's
invariants, determinism, the file format, round trips, and the entry points.

The SentencePiece model is handed over as a serialized `ModelProto`. It is written here with a
dozen lines of protobuf wire format (field numbers from `sentencepiece_model.proto`), because the
package's own `sentencepiece_model_pb2` needs the `protobuf` package, which is not a dependency;
when `protobuf` happens to be installed, a test checks that the bytes parse as intended."""

from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.config import TokenizerConfig
from scratchlm.errors import UserError
from scratchlm.tokenizer import UnigramTokenizer, load_tokenizer, train_tokenizer
from scratchlm.tokenizer.base import tokenizer_from_dict
from scratchlm.tokenizer.unigram import SPACE, UNK, _digamma, train_unigram
from tests.helpers import shared_file

ADVERSARIAL = [
    "",
    " ",
    "   ",
    "Hello world",
    "  leading, double  and trailing spaces  ",
    "tabs\tand\nnewlines\r\n and CR",
    "Café naïve e\u0301 n\u0303 Ωmega ΟΔΟΣ",
    "中文字符和日本語のテキスト 한국어",
    "emoji 😀🎉 👍🏽 👨\u200d👩\u200d👧 🇫🇷",
    "!!!???...,,,;;;--- ~~~ ``` ### @@@",
    "unknown runs: ☃☃☃ and ☃x☃ and ~~",
    "already has ▁ markers ▁▁ in it",
    "qqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqqq",
    "\x00\x01 control \x7f chars \ufffd",
    "<unk> <|endoftext|> as plain text",
    "I'm sure they'll say it's what we've done",
]

# -- a SentencePiece model from our pieces -------------------------------------------------------

NORMAL, UNKNOWN, CONTROL = 1, 2, 3  # ModelProto.SentencePiece.Type
UNIGRAM = 1  # TrainerSpec.ModelType


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, value: bytes | int | float) -> bytes:
    """One protobuf field: bytes are length-delimited, ints varints, floats 32-bit."""
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3 | 0) + _varint(value)


def sentencepiece_model(tok: UnigramTokenizer) -> bytes:
    """Our vocabulary as a SentencePiece ModelProto: identity normalizer, dummy prefix, no space folding."""
    pieces = [(s, 0.0, UNKNOWN if s == UNK else CONTROL)
              for s, _ in sorted(tok.special_tokens.items(), key=lambda kv: kv[1])]
    pieces += [(p, score, NORMAL) for p, score in tok.pieces]
    out = bytearray()
    for piece, score, kind in pieces:  # ModelProto.pieces = 1: piece = 1, score = 2, type = 3
        out += _field(1, _field(1, piece.encode()) + _field(2, score) + _field(3, kind))
    out += _field(2, _field(3, UNIGRAM) + _field(4, len(pieces)))  # trainer_spec: model_type, vocab_size
    # normalizer_spec: name, add_dummy_prefix, remove_extra_whitespaces, escape_whitespaces
    out += _field(3, _field(1, b"identity") + _field(3, 1) + _field(4, 0) + _field(5, 1))
    return bytes(out)


def sentencepiece_processor(tok: UnigramTokenizer) -> spm.SentencePieceProcessor:
    sp = spm.SentencePieceProcessor(model_proto=sentencepiece_model(tok))
    assert sp.vocab_size() == tok.vocab_size
    return sp


def test_model_proto_parses_as_intended():
    pytest.importorskip("google.protobuf", reason="protobuf is not installed (the parity tests do not need it)")
    from sentencepiece import sentencepiece_model_pb2 as pb

    tok = UnigramTokenizer([("▁a", -1.5), ("b", -2.25)], {UNK: 0, "<s>": 1})
    m = pb.ModelProto.FromString(sentencepiece_model(tok))
    assert [(p.piece, p.score, p.type) for p in m.pieces] == [
        ("<unk>", 0.0, pb.ModelProto.SentencePiece.UNKNOWN), ("<s>", 0.0, pb.ModelProto.SentencePiece.CONTROL),
        ("▁a", -1.5, pb.ModelProto.SentencePiece.NORMAL), ("b", -2.25, pb.ModelProto.SentencePiece.NORMAL),
    ]
    assert m.trainer_spec.model_type == pb.TrainerSpec.UNIGRAM
    n = m.normalizer_spec
    assert (n.name, n.add_dummy_prefix, n.remove_extra_whitespaces, n.escape_whitespaces) == (
        "identity", True, False, True)


# -- fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(shakespeare_text: str) -> UnigramTokenizer:
    return train_unigram([shakespeare_text], 2000, ["<|endoftext|>"], progress=False)


@pytest.fixture(scope="module")
def adversarial_tok() -> UnigramTokenizer:
    """Trained on the adversarial strings, so most of their characters are pieces."""
    corpus = ADVERSARIAL[:-5] * 3 + ["the quick brown fox jumps over the lazy dog"] * 5
    return train_unigram(corpus, 150, progress=False)


# -- parity with sentencepiece -------------------------------------------------------------------


def test_parity_on_every_line_of_shakespeare(trained, shakespeare_text):
    sp = sentencepiece_processor(trained)
    lines = shakespeare_text.split("\n")
    assert [trained.encode_ordinary(line) for line in lines] == sp.encode(lines)
    chunk = shakespeare_text[:50_000]  # newlines inside one "sentence" too
    assert trained.encode_ordinary(chunk) == sp.encode(chunk)


@pytest.mark.parametrize("which", ["trained", "adversarial_tok"])
def test_parity_on_adversarial_strings(which, request):
    tok: UnigramTokenizer = request.getfixturevalue(which)
    sp = sentencepiece_processor(tok)
    for text in ADVERSARIAL:
        assert tok.encode_ordinary(text) == sp.encode(text), text


def test_runs_of_unknown_characters_are_one_unk():
    tok = UnigramTokenizer([(SPACE, -1.0), ("x", -2.0)], {UNK: 0})
    assert tok.encode_as_pieces("☃☃x☃ ☃") == [SPACE, UNK, "x", UNK, SPACE, UNK]
    assert tok.encode_ordinary("☃☃x☃ ☃") == sentencepiece_processor(tok).encode("☃☃x☃ ☃")


def test_ties_go_to_the_longest_last_piece():
    # ▁|a|bc and ▁|ab|c score the same; SentencePiece keeps the first candidate found for each
    # end position, and candidates are found from the leftmost start: the longest last piece.
    tok = UnigramTokenizer([(SPACE, -1.0), ("a", -1.0), ("b", -1.0), ("c", -1.0), ("ab", -1.0), ("bc", -1.0)],
                           {UNK: 0})
    assert tok.encode_as_pieces("abc") == [SPACE, "a", "bc"]
    assert tok.encode_ordinary("abc") == sentencepiece_processor(tok).encode("abc")


# Scores from a small set (many exact ties) and values whose float32 sums round (near ties).
SCORES = st.sampled_from([-1.0, -2.0, -3.0, -0.1, -0.2, -0.3, -1.1, -2.2, -3.3, -7.7, -1e-3, -12.345678])
PIECES = st.text(alphabet="ab▁c", min_size=1, max_size=4)


@settings(max_examples=150, deadline=None)
@given(
    vocab=st.dictionaries(PIECES, SCORES, min_size=1, max_size=25),
    texts=st.lists(st.text(alphabet="abc d", max_size=25), min_size=1, max_size=5),
)
def test_parity_on_random_vocabularies_with_ties(vocab, texts):
    tok = UnigramTokenizer(sorted(vocab.items()), {UNK: 0, "<s>": 1})
    sp = sentencepiece_processor(tok)
    for text in texts:
        assert tok.encode_ordinary(text) == sp.encode(text), text


# -- training ------------------------------------------------------------------------------------


def test_digamma():
    assert _digamma(np.array([1.0]))[0] == pytest.approx(-0.5772156649015329, abs=1e-9)
    assert _digamma(np.array([0.5]))[0] == pytest.approx(-1.9635100260214235, abs=1e-9)
    assert _digamma(np.array([100.0]))[0] == pytest.approx(4.600161852738087, abs=1e-9)


def test_training_is_deterministic_and_hits_vocab_size(trained, shakespeare_text):
    again = train_unigram([shakespeare_text], 2000, ["<|endoftext|>"], progress=False)
    assert again.to_dict() == trained.to_dict()
    assert trained.vocab_size == 2000
    assert trained.id_to_piece(0) == UNK and trained.eot_id == 1
    # Every character of the training text is a piece, and pieces hold ▁ only at the start.
    pieces = {p for p, _ in trained.pieces}
    assert set(shakespeare_text.replace(" ", SPACE)) <= pieces
    assert not any(SPACE in p[1:] for p in pieces)
    scores = [s for _, s in trained.pieces]
    assert scores == sorted(scores, reverse=True) and all(s < 0 for s in scores)
    assert math.fsum(math.exp(s) for s in scores) == pytest.approx(1.0, abs=0.05)


def test_trained_vocabulary_is_used(trained, shakespeare_text):
    sample = shakespeare_text[:20_000]
    ids = trained.encode_ordinary(sample)
    assert len(ids) < len(sample) / 2.5
    assert UNK not in trained.encode_as_pieces(sample)
    assert trained.encode_as_pieces("the king") == ["▁the", "▁king"]


def test_decode_inverts_encode(trained, shakespeare_text):
    for text in [*shakespeare_text[:20_000].split("\n"), "  two  spaces ", " ", "", "a\n\nb"]:
        assert trained.decode(trained.encode_ordinary(text)) == text
    text = "First part.<|endoftext|> Second part"
    assert trained.decode(trained.encode(text, allowed_special="all")) == text


def test_save_load_round_trip(trained, tmp_path, shakespeare_text):
    path = tmp_path / "ug.json"
    trained.save(path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, UnigramTokenizer)
    assert loaded.to_dict() == trained.to_dict()
    assert loaded.fingerprint() == trained.fingerprint()
    assert loaded.encode_ordinary(shakespeare_text[:5000]) == trained.encode_ordinary(shakespeare_text[:5000])


def test_corrupt_file_is_a_user_error(trained):
    d = trained.to_dict()
    d["special_tokens"] = {"<|endoftext|>": 0}
    with pytest.raises(UserError, match="corrupt unigram"):
        tokenizer_from_dict(d)


def test_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError) as e:
        train_tokenizer(["hello world"], TokenizerConfig(kind="unigram", vocab_size=5, special_tokens=["<s>"]))
    msg = str(e.value)
    assert "tokenizer.vocab_size" in msg and "\n" not in msg
    assert "minimum 10" in msg  # <unk> + <s> + ▁ h e l o w r d
    tok = train_tokenizer(["hello world"], TokenizerConfig(kind="unigram", vocab_size=10, special_tokens=["<s>"]))
    assert tok.decode(tok.encode("hello world")) == "hello world"
