"""WordPiece (BERT-style), trained and applied here.

Normalisation and pre-tokenization follow BERT's "basic tokenizer" as HF `tokenizers` implements
it (`BertNormalizer` + `BertPreTokenizer`), in this order:
1. clean: drop NUL, U+FFFD and "other" characters (categories Cc, Cf, Co, Cs; unassigned code
   points stay), except tab, newline and carriage return; map whitespace (the Unicode
   White_Space property, plus tab/newline/CR) to a space;
2. put spaces around CJK ideographs, so each becomes a word of its own (HF's list of blocks,
   whose Extension E+ range starts at U+2B920 where BERT's starts at U+2B820);
3. uncased only (the default): decompose (NFD) and drop non-spacing marks, then lowercase one
   character at a time (per character, as HF does, so a final Greek sigma stays σ);
4. split on whitespace, and cut every punctuation character (ASCII punctuation or Unicode
   category P*) out as a word of its own.
A cased tokenizer (`lowercase=False`) skips step 3 entirely, accents included, as BERT does.

Encoding is greedy longest-match-first inside each word: the longest vocabulary entry that
starts the word, then the longest `##`-prefixed entry that continues it, and so on. A word that
cannot be covered this way, or that has more than `max_input_chars_per_word` (100) characters,
becomes one `[UNK]`. This is bit-for-bit the HF `WordPiece` model (tested on tinyshakespeare
and adversarial strings).

Training uses the likelihood criterion of the original WordPiece: starting from characters (the
first character of a word as itself, the others as `##c`), repeatedly merge the adjacent pair
that maximises count(ab) / (count(a) * count(b)): the pair whose parts occur together most
often relative to how often they occur at all. This favours rare tokens, so at small sizes
common words stay split (tinyshakespeare at 2,000 tokens: ~1.5 characters per token, where
HF's `WordPieceTrainer`, which merges by raw count like BPE, gets ~3.5; encoding with a given
vocabulary is the same in both). It runs on
distinct words with their frequencies, and keeps pair counts, token counts and a pair index
incrementally; a heap holds the candidate scores, with stale entries re-checked on pop. Because
a merge lowers count(a) and count(b), which *raises* the score of every other pair holding a or
b, those pairs are re-pushed after each merge. Ties break on the smaller (left id, right id).
Training stops early if every word has become a single token (a tiny corpus).

The base alphabet is every character seen, each as a word-initial token and as `##c`, except
punctuation and CJK characters, which the pre-tokenizer always makes whole words and so never
need a `##` form. Special tokens: BERT's `[PAD] [UNK] [CLS] [SEP] [MASK]` take ids 0-4, then
`cfg.special_tokens` (those not already there) follow, so `<|endoftext|>` keeps working as the
document separator; the learned vocabulary comes after the specials.

Decoding joins tokens with spaces and glues `##` pieces to the one before (BERT's convention);
it cannot restore case, accents or the original spacing around punctuation, and leaves out
HF's optional "cleanup" of spaces before punctuation.

Left out: `tokenize_chinese_chars=False`, a cased tokenizer that still strips accents, and
`never_split` lists. HF's character tables come from other Unicode versions than Python's
`unicodedata`, so characters assigned or re-categorised recently may be normalised or split
differently (559 of the ~194,000 code points in planes 0-2 with tokenizers 0.23 on Python
3.11; none in the parity tests).
"""

from __future__ import annotations

import heapq
import unicodedata
from collections import Counter, defaultdict
from functools import lru_cache
from typing import Any

from tqdm import tqdm

from scratchlm.config import TokenizerConfig
from scratchlm.errors import UserError
from scratchlm.tokenizer.base import Tokenizer, register
from scratchlm.tokenizer.bpe import merge_everywhere

BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PREFIX = "##"
MAX_INPUT_CHARS_PER_WORD = 100

# The Unicode White_Space property (what Rust's `char::is_whitespace` tests, and so HF), which is
# not quite Python's `str.isspace` (that also counts U+001C..U+001F, which are controls here).
_WHITESPACE = frozenset(
    "\t\n\x0b\x0c\r \x85\xa0\u1680\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
_ASCII_PUNCT = frozenset("!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~")

# ASCII fast path of the cleaning step: controls other than \t \n \r vanish, those three become spaces.
_ASCII_CLEAN = {c: None for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), 0x7F]}
_ASCII_CLEAN.update({0x09: " ", 0x0A: " ", 0x0D: " "})


def _is_cjk(cp: int) -> bool:
    """The CJK ideograph blocks that BERT (as HF implements it) treats as words of one character."""
    return (
        0x4E00 <= cp <= 0x9FFF
        or 0x3400 <= cp <= 0x4DBF
        or 0x20000 <= cp <= 0x2A6DF
        or 0x2A700 <= cp <= 0x2B73F
        or 0x2B740 <= cp <= 0x2B81F
        or 0x2B920 <= cp <= 0x2CEAF  # sic: HF's range (BERT's starts at 0x2B820); parity wins
        or 0xF900 <= cp <= 0xFAFF
        or 0x2F800 <= cp <= 0x2FA1F
    )


@lru_cache(maxsize=65536)
def _clean_char(c: str) -> str:
    """Steps 1-2 for one character: dropped, a space, padded with spaces (CJK), or itself."""
    if c == "\x00" or c == "\ufffd":
        return ""
    if c in "\t\n\r":
        return " "
    if unicodedata.category(c) in ("Cc", "Cf", "Co", "Cs"):
        return ""
    if c in _WHITESPACE:
        return " "
    if _is_cjk(ord(c)):
        return f" {c} "
    return c


@lru_cache(maxsize=65536)
def _is_punct(c: str) -> bool:
    return c in _ASCII_PUNCT or unicodedata.category(c)[0] == "P"


@lru_cache(maxsize=65536)
def _lower_char(c: str) -> str:
    return c.lower()


def normalize(text: str, lowercase: bool = True) -> str:
    """BERT's normalizer: clean, pad CJK, and (uncased) strip accents then lowercase."""
    if text.isascii():
        # Nothing to decompose and no CJK: the cleaning is a table lookup and lower() is per character.
        text = text.translate(_ASCII_CLEAN)
        return text.lower() if lowercase else text
    text = "".join(map(_clean_char, text))
    if lowercase:
        # NFD runs on the whole string (it reorders combining marks across characters), then the
        # non-spacing marks go; lowercasing comes after, as in HF's BertNormalizer.
        text = "".join(c for c in unicodedata.normalize("NFD", text) if unicodedata.category(c) != "Mn")
        text = "".join(map(_lower_char, text))
    return text


def pre_tokenize(normalized: str) -> list[str]:
    """BERT's pre-tokenizer on normalized text: whitespace splits, each punctuation mark is a word."""
    words: list[str] = []
    # After cleaning the only whitespace left is the plain space, so str.split() is exact here.
    for chunk in normalized.split():
        if chunk.isalnum():
            words.append(chunk)
            continue
        start = 0
        for i, c in enumerate(chunk):
            if _is_punct(c):
                if i > start:
                    words.append(chunk[start:i])
                words.append(c)
                start = i + 1
        if start < len(chunk):
            words.append(chunk[start:])
    return words


def _special_ids(extra: list[str]) -> dict[str, int]:
    specials = list(dict.fromkeys([*BERT_SPECIALS, *extra]))
    return {s: i for i, s in enumerate(specials)}


def train_wordpiece(
    texts: list[str],
    vocab_size: int,
    special_tokens: list[str] | tuple[str, ...] = (),
    *,
    lowercase: bool = True,
    progress: bool = True,
) -> WordPieceTokenizer:
    """Learn a WordPiece vocabulary (specials included) of `vocab_size` tokens by likelihood merges."""
    specials = _special_ids(list(special_tokens))
    counts: Counter = Counter()
    for t in texts:
        counts.update(pre_tokenize(normalize(t, lowercase)))
    # Longer words always encode to [UNK], so they teach nothing.
    counts = Counter({w: f for w, f in counts.items() if len(w) <= MAX_INPUT_CHARS_PER_WORD})

    alphabet = sorted(set().union(*map(set, counts)))
    pieces: list[str] = []
    for c in alphabet:
        pieces.append(c)
        if not (_is_punct(c) or _is_cjk(ord(c))):
            pieces.append(PREFIX + c)
    minimum = len(specials) + len(pieces)
    if vocab_size < minimum:
        raise UserError(
            f"tokenizer.vocab_size={vocab_size} is below the minimum {minimum} for this text "
            f"({len(specials)} special tokens + {len(pieces)} base characters)",
            fix=f"use --tokenizer.vocab_size={minimum} or more",
        )
    target = vocab_size - len(specials)
    ids: dict[str, int] = {p: i for i, p in enumerate(pieces)}

    words: list[list[int]] = [[ids[w[0]], *(ids[PREFIX + c] for c in w[1:])] for w in counts]
    freqs: list[int] = list(counts.values())

    token_count: list[int] = [0] * len(pieces)
    pair_count: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)  # pair -> words that (may) hold it
    pairs_of: dict[int, set[tuple[int, int]]] = defaultdict(set)  # token -> live pairs holding it
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for t in w:
            token_count[t] += f
        for p in zip(w, w[1:]):
            pair_count[p] += f
            where[p].add(wi)
    for a, b in pair_count:
        pairs_of[a].add((a, b))
        pairs_of[b].add((a, b))

    def score(p: tuple[int, int]) -> float:
        return pair_count[p] / (token_count[p[0]] * token_count[p[1]])

    heap = [(-score(p), p[0], p[1]) for p in pair_count]
    heapq.heapify(heap)

    bar = tqdm(total=target - len(pieces), desc="wordpiece merges", unit="merge", disable=not progress, leave=False)
    while len(pieces) < target and heap:
        neg, a, b = heapq.heappop(heap)
        if pair_count.get((a, b), 0) <= 0:
            continue
        s = score((a, b))
        if s != -neg:  # stale: push it back with today's score
            heapq.heappush(heap, (-s, a, b))
            continue
        merged = pieces[a] + pieces[b][len(PREFIX):]
        new_id = ids.get(merged)
        if new_id is None:
            new_id = len(pieces)
            pieces.append(merged)
            ids[merged] = new_id
            token_count.append(0)
            bar.update(1)

        delta, merged_count = merge_everywhere(words, freqs, where, a, b, new_id)
        token_count[a] -= merged_count
        token_count[b] -= merged_count
        token_count[new_id] += merged_count
        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_count.get(p, 0) + d
            if c > 0:
                if p not in pair_count:
                    pairs_of[p[0]].add(p)
                    pairs_of[p[1]].add(p)
                pair_count[p] = c
            else:
                pair_count.pop(p, None)
                pairs_of[p[0]].discard(p)
                pairs_of[p[1]].discard(p)
        # a and b are rarer now, so every pair holding them scores higher: push fresh entries.
        # Pairs whose own count rose get one too; lowered scores are caught lazily on pop.
        fresh = pairs_of[a] | pairs_of[b] | {p for p, d in delta.items() if d > 0 and p in pair_count}
        for p in fresh:
            heapq.heappush(heap, (-score(p), *p))
    bar.close()
    return WordPieceTokenizer(pieces, specials, lowercase=lowercase)


@register
class WordPieceTokenizer(Tokenizer):
    kind = "wordpiece"

    def __init__(
        self,
        vocab: list[str],
        special_tokens: dict[str, int] | None = None,
        *,
        lowercase: bool = True,
        unk_token: str = "[UNK]",
        max_input_chars_per_word: int = MAX_INPUT_CHARS_PER_WORD,
    ) -> None:
        super().__init__(special_tokens)
        n = len(self.special_tokens)
        if sorted(self.special_tokens.values()) != list(range(n)):
            raise ValueError("special tokens must hold ids 0..n-1, before the vocabulary")
        if unk_token not in self.special_tokens:
            raise ValueError(f"the unknown token {unk_token!r} is not among the special tokens")
        self.vocab = vocab  # the learned pieces; piece k has id n + k
        self.lowercase = lowercase
        self.unk_token = unk_token
        self.unk_id = self.special_tokens[unk_token]
        self.max_input_chars_per_word = max_input_chars_per_word
        self.piece_ids = {p: n + k for k, p in enumerate(vocab)}
        if len(self.piece_ids) != len(vocab):
            raise ValueError("vocabulary has duplicate pieces")
        self._itos = [""] * n + list(vocab)
        for s, i in self.special_tokens.items():
            self._itos[i] = s
        # Longest piece, in characters after the prefix: no match can be longer, so the greedy
        # search starts there instead of at the end of a long word.
        self._max_len = max((len(p) - (len(PREFIX) if p.startswith(PREFIX) else 0) for p in vocab), default=1)
        self._cache: dict[str, list[int]] = {}

    @classmethod
    def train(cls, texts: list[str], cfg: TokenizerConfig, progress: bool = True) -> WordPieceTokenizer:
        return train_wordpiece(texts, cfg.vocab_size, cfg.special_tokens, progress=progress)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    # -- encoding -------------------------------------------------------------------------------
    def encode_word(self, word: str) -> list[int]:
        """Greedy longest-match-first over one pre-tokenized word; [UNK] if it cannot be covered."""
        if len(word) > self.max_input_chars_per_word:
            return [self.unk_id]
        ids, start, n, table = [], 0, len(word), self.piece_ids
        while start < n:
            end = min(n, start + self._max_len)
            while end > start:
                piece = word[start:end] if start == 0 else PREFIX + word[start:end]
                i = table.get(piece)
                if i is not None:
                    ids.append(i)
                    break
                end -= 1
            else:
                return [self.unk_id]  # no piece continues the word: the whole word is unknown
            start = end
        return ids

    def encode_ordinary(self, text: str) -> list[int]:
        out: list[int] = []
        cache = self._cache
        for word in pre_tokenize(normalize(text, self.lowercase)):
            ids = cache.get(word)
            if ids is None:
                ids = self.encode_word(word)
                if len(cache) > 200_000:
                    cache.clear()
                cache[word] = ids
            out.extend(ids)
        return out

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        parts: list[str] = []
        for i in ids:
            piece = self._itos[i]
            if piece.startswith(PREFIX) and parts and i >= len(self.special_tokens):
                parts.append(piece[len(PREFIX):])
            else:
                parts.append(" " + piece if parts else piece)
        return "".join(parts)

    def id_to_piece(self, i: int) -> str:
        return self._itos[i]

    def vocab_dict(self) -> dict[str, int]:
        """Every token (specials included) and its id, as HF's `WordPiece(vocab=...)` takes it."""
        return {p: i for i, p in enumerate(self._itos)}

    # -- file format ----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {
            "lowercase": self.lowercase,
            "unk_token": self.unk_token,
            "max_input_chars_per_word": self.max_input_chars_per_word,
            "vocab": self.vocab,
        }

    @classmethod
    def _from_state(cls, d: dict[str, Any], special_tokens: dict[str, int]) -> WordPieceTokenizer:
        return cls(
            [str(p) for p in d["vocab"]],
            special_tokens,
            lowercase=bool(d.get("lowercase", True)),
            unk_token=str(d.get("unk_token", "[UNK]")),
            max_input_chars_per_word=int(d.get("max_input_chars_per_word", MAX_INPUT_CHARS_PER_WORD)),
        )
