"""WordPiece: id-for-id parity with HF `tokenizers` (BERT normalizer + pre-tokenizer + WordPiece
model given our vocabulary), the likelihood training criterion, determinism, the file format,
the vocab-size error, and the `train_tokenizer` / CLI entry points."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, normalizers, pre_tokenizers

from scratchlm.config import TokenizerConfig
from scratchlm.errors import UserError
from scratchlm.tokenizer import WordPieceTokenizer, load_tokenizer, train_tokenizer
from scratchlm.tokenizer.wordpiece import BERT_SPECIALS, _is_punct, normalize, pre_tokenize, train_wordpiece
from tests.helpers import shared_file

ADVERSARIAL = [
    "",
    "   ",
    "Hello, World! HELLO world.",
    "Café naïve résumé ÀÉÎÕÜ façade coöperate",
    "combining: e\u0301 n\u0303 a\u030a\u0301 \u0301leading-mark",
    "İstanbul ΟΔΟΣ Straße ﬁnance Ǆemal ǅ ǆ",
    "中文字符，和日本語のテキスト。한국어 텍스트",
    "emoji 😀🎉 👍🏽 👨\u200d👩\u200d👧 🇫🇷 🥰",
    "!!!???...,,,;;;--- ((([[[{{{ }}}]]]))) «»“”‘’ ¿¡",
    "ascii symbols that BERT counts as punctuation: $ + < = > ^ ` | ~ and @#%&*",
    "controls a\x00b\x01c\x1cd\x7fe\x0bf\x85g\ufffdh soft\u00adhyphen zero\u200bwidth",
    "whitespace\tTAB\nNL\r\nCRLF\u00a0NBSP\u2003EM\u3000IDEO\u2028LS\u2029PS end",
    "fullwidth ＡＢＣ１２３ digits ١٢٣ ½ ² ① Ⅷ",
    "math 𝔘𝔫𝔦𝔠𝔬𝔡𝔢 and Arabic مَرْحَبًا and Hebrew שָׁלוֹם",
    "x" * 100,
    "y" * 101,
    "[CLS] [UNK] [MASK] <|endoftext|> ##ing ##",
    "don't can't won't o'clock e-mail 3.14 1,000",
]


def hf_wordpiece(tok: WordPieceTokenizer) -> HFTokenizer:
    hf = HFTokenizer(models.WordPiece(vocab=tok.vocab_dict(), unk_token="[UNK]", max_input_chars_per_word=100))
    hf.normalizer = normalizers.BertNormalizer(
        lowercase=True, strip_accents=True, clean_text=True, handle_chinese_chars=True
    )
    hf.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    return hf


def _hand_vocab(pieces: list[str]) -> WordPieceTokenizer:
    return WordPieceTokenizer(pieces, {s: i for i, s in enumerate(BERT_SPECIALS)})


@pytest.fixture(scope="module")
def shakespeare_text() -> str:
    return shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")


@pytest.fixture(scope="module")
def trained(shakespeare_text: str) -> WordPieceTokenizer:
    return train_wordpiece([shakespeare_text], 2000, ["<|endoftext|>"], progress=False)


@pytest.fixture(scope="module")
def adversarial_tok() -> WordPieceTokenizer:
    """Trained on the adversarial strings themselves, so their characters are in the vocabulary."""
    corpus = ADVERSARIAL * 3 + ["the quick brown fox jumps over the lazy dog"] * 5
    return train_wordpiece(corpus, 400, progress=False)


# -- parity with HF tokenizers ------------------------------------------------------------------


@pytest.mark.parametrize("text", ADVERSARIAL)
def test_normalizer_and_pre_tokenizer_match_hf(text):
    norm = normalizers.BertNormalizer(lowercase=True, strip_accents=True, clean_text=True, handle_chinese_chars=True)
    ours = normalize(text)
    assert ours == norm.normalize_str(text)
    assert pre_tokenize(ours) == [w for w, _ in pre_tokenizers.BertPreTokenizer().pre_tokenize_str(ours)]


def test_parity_on_every_line_of_shakespeare(trained, shakespeare_text):
    hf = hf_wordpiece(trained)
    lines = shakespeare_text.split("\n")
    expected = [e.ids for e in hf.encode_batch(lines, add_special_tokens=False)]
    assert [trained.encode_ordinary(line) for line in lines] == expected
    chunk = shakespeare_text[:100_000]  # newlines inside one text too
    assert trained.encode_ordinary(chunk) == hf.encode(chunk, add_special_tokens=False).ids


@pytest.mark.parametrize("which", ["trained", "adversarial_tok"])
def test_parity_on_adversarial_strings(which, request):
    tok: WordPieceTokenizer = request.getfixturevalue(which)
    hf = hf_wordpiece(tok)
    for text in ADVERSARIAL:
        assert tok.encode_ordinary(text) == hf.encode(text, add_special_tokens=False).ids, text


def test_adversarial_vocab_covers_the_strings(adversarial_tok):
    # Guards the parity test above: with this vocabulary most words really are split into pieces.
    ids = [i for t in ADVERSARIAL for i in adversarial_tok.encode_ordinary(t)]
    assert ids.count(adversarial_tok.unk_id) == 1  # only the 101-character word
    assert len([i for i in ids if len(adversarial_tok.id_to_piece(i).removeprefix("##")) > 1]) > 50


@settings(max_examples=100, deadline=None)
@given(
    pieces=st.sets(st.text(alphabet="abcé中", min_size=1, max_size=4) |
                   st.text(alphabet="abcé", min_size=1, max_size=4).map(lambda p: "##" + p), max_size=30),
    texts=st.lists(st.text(alphabet="abcAÉé中 ,.-#\t\n\x00", max_size=30), min_size=1, max_size=5),
)
def test_parity_on_random_vocabularies(pieces, texts):
    tok = _hand_vocab(sorted(pieces))
    hf = hf_wordpiece(tok)
    for text in texts:
        assert tok.encode_ordinary(text) == hf.encode(text, add_special_tokens=False).ids, text


# -- encoding rules -----------------------------------------------------------------------------


def test_greedy_longest_match_first():
    tok = _hand_vocab(["un", "u", "##n", "##nz", "##aff", "##a", "##f", "##able", "##ab", "##le", "x"])
    pieces = [tok.id_to_piece(i) for i in tok.encode_ordinary("unaffable")]
    assert pieces == ["un", "##aff", "##able"]
    # Greedy, no backtracking: "un" is taken first and strands "z", so the whole word is [UNK]
    # although u + ##nz would cover it. Other words are unaffected.
    assert [tok.id_to_piece(i) for i in tok.encode_ordinary("unz x")] == ["[UNK]", "x"]
    assert [tok.id_to_piece(i) for i in tok.encode_ordinary("unknown")] == ["[UNK]"]


def test_long_words_are_unknown():
    tok = _hand_vocab(["x", "##x"])
    assert len(tok.encode_ordinary("x" * 100)) == 100
    assert tok.encode_ordinary("x" * 101) == [tok.unk_id]


def test_decode_joins_continuations():
    tok = _hand_vocab(["un", "##aff", "##able", ",", "hello"])
    ids = tok.encode_ordinary("Unaffable, HELLO")
    assert tok.decode(ids) == "unaffable , hello"
    assert tok.decode([tok.special_tokens["[CLS]"], *ids]) == "[CLS] unaffable , hello"


# -- training -----------------------------------------------------------------------------------


def test_training_merges_by_likelihood_not_count():
    # "ab" is the most frequent pair (10), but a and b are common; q and z only ever occur
    # together, so count(qz) / (count(q) count(z)) = 2/4 beats 10/(20*20).
    corpus = ["ab"] * 10 + ["ac"] * 10 + ["db"] * 10 + ["qz"] * 2
    minimum = len(BERT_SPECIALS) + 2 * 6  # a b c d q z, each plain and ##
    tok = train_wordpiece([" ".join(corpus)], minimum + 1, progress=False)
    assert tok.vocab[-1] == "qz"
    tok = train_wordpiece([" ".join(corpus)], minimum + 3, progress=False)
    # Then ac and db tie at 10/(20*10); a has the smaller id, so ac. That makes a rarer, which
    # raises ab to 10/(10*20), tying db again: ab. (A count-based trainer would start with ab.)
    assert tok.vocab[-3:] == ["qz", "ac", "ab"]


def naive_train(text: str, vocab_size: int) -> list[str]:
    """Reference trainer: recount every token and pair before each merge; same tie rule."""
    words = Counter(pre_tokenize(normalize(text)))
    alphabet = sorted(set("".join(words)))
    pieces = [p for c in alphabet for p in ([c] if _is_punct(c) else [c, "##" + c])]
    ids = {p: i for i, p in enumerate(pieces)}
    seqs = {w: [ids[w[0]], *(ids["##" + c] for c in w[1:])] for w in words}
    while len(pieces) + len(BERT_SPECIALS) < vocab_size:
        tokens: Counter = Counter()
        pairs: Counter = Counter()
        for w, seq in seqs.items():
            for t in seq:
                tokens[t] += words[w]
            for p in zip(seq, seq[1:]):
                pairs[p] += words[w]
        if not pairs:
            break
        a, b = min(pairs, key=lambda p: (-pairs[p] / (tokens[p[0]] * tokens[p[1]]), p))
        merged = pieces[a] + pieces[b][2:]
        if merged not in ids:
            ids[merged] = len(pieces)
            pieces.append(merged)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(ids[merged])
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return pieces


def test_incremental_training_equals_naive_recount(shakespeare_text):
    text = shakespeare_text[:8_000]
    assert train_wordpiece([text], 400, progress=False).vocab == naive_train(text, 400)


def test_training_is_deterministic_and_hits_vocab_size(trained, shakespeare_text):
    again = train_wordpiece([shakespeare_text], 2000, ["<|endoftext|>"], progress=False)
    assert again.to_dict() == trained.to_dict()
    assert trained.vocab_size == 2000
    assert [trained.id_to_piece(i) for i in range(6)] == [*BERT_SPECIALS, "<|endoftext|>"]
    assert trained.eot_id == 5


def test_trained_vocabulary_is_used(trained, shakespeare_text):
    sample = shakespeare_text[:20_000]
    ids = trained.encode_ordinary(sample)
    base = {i for i, p in enumerate(trained._itos) if len(p.removeprefix("##")) == 1}
    learned = [i for i in ids if i not in base and i >= 6]
    # The likelihood criterion favours pairs of rare tokens, so at 2,000 tokens common words are
    # still split ("the" -> th ##e) and compression is modest; merged pieces are in use all the same.
    assert len(learned) > len(ids) // 10
    assert len(ids) < 0.8 * len(sample)
    assert [trained.id_to_piece(i) for i in trained.encode_ordinary("King")] == ["king"]
    assert trained.unk_id not in ids


def test_special_tokens(trained):
    eot = trained.eot_id
    assert trained.encode("a<|endoftext|>b", allowed_special="all") == [
        *trained.encode_ordinary("a"), eot, *trained.encode_ordinary("b")
    ]
    assert trained.decode(trained.encode("the king<|endoftext|>", allowed_special="all")) == "the king <|endoftext|>"


def test_save_load_round_trip(trained, tmp_path, shakespeare_text):
    path = tmp_path / "wp.json"
    trained.save(path)
    loaded = load_tokenizer(path)
    assert isinstance(loaded, WordPieceTokenizer)
    assert loaded.to_dict() == trained.to_dict()
    assert loaded.fingerprint() == trained.fingerprint()
    assert loaded.encode_ordinary(shakespeare_text[:5000]) == trained.encode_ordinary(shakespeare_text[:5000])


def test_cased_tokenizer_keeps_case_and_accents():
    tok = train_wordpiece(["Café CAFÉ café"], 40, lowercase=False, progress=False)
    assert normalize("Café", lowercase=False) == "Café"
    assert len({tuple(tok.encode_ordinary(w)) for w in ["Café", "CAFÉ", "café"]}) == 3
    assert load_tokenizer_round_trip(tok).encode_ordinary("CAFÉ") == tok.encode_ordinary("CAFÉ")


def load_tokenizer_round_trip(tok: WordPieceTokenizer) -> WordPieceTokenizer:
    from scratchlm.tokenizer.base import tokenizer_from_dict

    return tokenizer_from_dict(tok.to_dict())  # type: ignore[return-value]


def test_vocab_too_small_is_a_user_error():
    with pytest.raises(UserError) as e:
        train_tokenizer(["hello world"], TokenizerConfig(kind="wordpiece", vocab_size=10, special_tokens=[]))
    msg = str(e.value)
    assert "tokenizer.vocab_size" in msg and "\n" not in msg
    # 5 specials + h e l o w r d, each plain and ##
    assert "minimum 19" in msg
    train_tokenizer(["hello world"], TokenizerConfig(kind="wordpiece", vocab_size=19, special_tokens=[]))
