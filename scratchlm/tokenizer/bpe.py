"""Byte-level BPE, trained and applied here (GPT-2 / GPT-4 style).

Training (Sennrich et al. 2016, on bytes as in GPT-2):
1. Split text into pre-tokens with a regex (GPT-2's or GPT-4's), so merges never cross word,
   number or punctuation boundaries, and count each distinct pre-token once (the dedup that
   makes training fast: tinyshakespeare's 300k pre-tokens are 25k distinct ones).
2. Start from the 256 single bytes. Repeatedly merge the most frequent adjacent pair. Pair counts
   are kept incrementally: a merge only touches the words that contain the pair (an index from
   pair to words), and a heap with lazy invalidation gives the next best pair, instead of a
   recount of every pair per merge. Ties break on the smaller (left id, right id), so training
   is deterministic.
3. A merge whose bytes already exist as a token reuses that token's id, so every id stands for
   a distinct byte string (as tiktoken requires).

Encoding follows tiktoken's rule, which for a vocabulary learned this way equals applying the
merges in training order: within a pre-token, repeatedly merge the adjacent pair whose
concatenation has the lowest id (leftmost on ties); a pre-token that is itself a token maps
straight to it. Two paths implement it: `encode_python` (readable, here) and a fast path that
hands our own ranks to `tiktoken.Encoding` as an engine. They are tested to agree on arbitrary
unicode.

Ids: 0..255 are the raw bytes, merges follow in order, special tokens come last. The GPT-2
files (`encoder.json` + `vocab.bpe`) load into the same class with GPT-2's own ids.
"""

from __future__ import annotations

import base64
import heapq
import json
import os
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Any

import regex
from tqdm import tqdm

from scratchlm.config import TokenizerConfig
from scratchlm.errors import UserError
from scratchlm.io import atomic_open, write_json
from scratchlm.tokenizer.base import Tokenizer, register

# Pre-tokenization regexes. GPT-2: contractions, letters, numbers, other symbols, each with an
# optional leading space; whitespace runs keep their last space for the next word. GPT-4
# (cl100k): case-insensitive contractions, digits in groups of at most three, newlines apart.
PATTERNS = {
    "gpt2": r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""",
    "gpt4": (
        r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]++[\r\n]*"""
        r"""|\s*[\r\n]|\s+(?!\S)|\s+"""
    ),
}


@lru_cache(maxsize=1)
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable stand-in for every byte: printable Latin-1 bytes stand for themselves,
    the rest (controls, space, ...) are shifted to code points 256 and up. Used by the GPT-2 and
    HF `tokenizer.json` formats, and to show tokens readably in our own files."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in keep:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


@lru_cache(maxsize=1)
def unicode_to_bytes() -> dict[str, int]:
    return {c: b for b, c in bytes_to_unicode().items()}


def token_to_str(token: bytes) -> str:
    table = bytes_to_unicode()
    return "".join(table[b] for b in token)


def str_to_token(s: str) -> bytes:
    table = unicode_to_bytes()
    return bytes(table[c] for c in s)


def resolve_pattern(name_or_regex: str) -> str:
    return PATTERNS.get(name_or_regex, name_or_regex)


def count_pretokens(texts: list[str], pattern: str) -> Counter:
    """Distinct pre-tokens and their frequencies (about 0.1 s per MB here, so one process suffices)."""
    pat = regex.compile(pattern)
    counts: Counter = Counter()
    for t in texts:
        counts.update(pat.findall(t))
    return counts


def merge_pair(word: list[int], a: int, b: int, new_id: int) -> list[int]:
    """`word` with every non-overlapping (a, b), left to right, replaced by new_id."""
    out, i, n = [], 0, len(word)
    while i < n:
        if i < n - 1 and word[i] == a and word[i + 1] == b:
            out.append(new_id)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return out


def merge_everywhere(
    words: list[list[int]], freqs: list[int], where: dict[tuple[int, int], set[int]], a: int, b: int, new_id: int
) -> tuple[dict[tuple[int, int], int], int]:
    """Merge (a, b) into new_id in every word the pair index lists, updating words and the index.

    Returns the change of each adjacent pair's frequency-weighted count, and how many merges were
    made (weighted by word frequency). Shared by BPE and WordPiece training."""
    delta: dict[tuple[int, int], int] = defaultdict(int)
    merged = 0
    for wi in where.pop((a, b)):
        w, f = words[wi], freqs[wi]
        nw = merge_pair(w, a, b, new_id)
        if len(nw) == len(w):
            continue  # the index is loose: this word no longer holds the pair
        merged += (len(w) - len(nw)) * f
        for p in zip(w, w[1:]):
            delta[p] -= f
        for p in zip(nw, nw[1:]):
            delta[p] += f
            where[p].add(wi)
        words[wi] = nw
    return delta, merged


def train_bpe(
    texts: list[str],
    vocab_size: int,
    pattern: str = "gpt4",
    special_tokens: Iterable[str] = (),
    *,
    progress: bool = True,
) -> BPETokenizer:
    """Learn merges until the vocabulary (bytes + merges + specials) has `vocab_size` tokens."""
    specials = list(dict.fromkeys(special_tokens))
    target = vocab_size - len(specials)  # byte-level tokens to end with
    if target < 256:
        raise UserError(
            f"vocab_size={vocab_size} is below 256 bytes + {len(specials)} special tokens",
            fix=f"use --tokenizer.vocab_size={256 + len(specials)} or more",
        )
    pat = resolve_pattern(pattern)
    try:
        regex.compile(pat)
    except regex.error as e:
        raise UserError(f"tokenizer.pattern: not a valid regex ({e})", fix="use gpt2 or gpt4") from None

    counts = count_pretokens(texts, pat)
    words: list[list[int]] = [list(w.encode("utf-8")) for w in counts]
    freqs: list[int] = list(counts.values())

    # pair -> total frequency, and pair -> indices of words that (may) contain it
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, (w, f) in enumerate(zip(words, freqs)):
        for p in zip(w, w[1:]):
            pair_counts[p] += f
            where[p].add(wi)
    heap = [(-c, a, b) for (a, b), c in pair_counts.items()]
    heapq.heapify(heap)

    vocab: list[bytes] = [bytes([i]) for i in range(256)]
    ids: dict[bytes, int] = {t: i for i, t in enumerate(vocab)}
    merges: list[tuple[int, int]] = []
    bar = tqdm(total=target - 256, desc="bpe merges", unit="merge", disable=not progress, leave=False)
    while len(vocab) < target and heap:
        neg, a, b = heapq.heappop(heap)
        count = pair_counts.get((a, b), 0)
        if count != -neg:  # stale entry: the count changed since it was pushed
            if count > 0:
                heapq.heappush(heap, (-count, a, b))
            continue
        merged = vocab[a] + vocab[b]
        new_id = ids.get(merged)
        if new_id is None:
            new_id = len(vocab)
            vocab.append(merged)
            ids[merged] = new_id
            bar.update(1)
        merges.append((a, b))

        delta, _ = merge_everywhere(words, freqs, where, a, b, new_id)
        for p, d in delta.items():
            if d == 0:
                continue
            c = pair_counts[p] + d
            if c > 0:
                pair_counts[p] = c
                if d > 0:  # a raised count needs a fresh heap entry; a lowered one is fixed lazily
                    heapq.heappush(heap, (-c, *p))
            else:
                del pair_counts[p]
    bar.close()
    if len(vocab) < target:
        warnings.warn(
            f"the training text ran out of pairs to merge at {len(vocab) + len(specials)} tokens, "
            f"below vocab_size={vocab_size}; train on more text for a larger vocabulary",
            stacklevel=2,
        )
    special_ids = {s: len(vocab) + i for i, s in enumerate(specials)}
    return BPETokenizer(vocab, merges, pattern, special_ids)


@register
class BPETokenizer(Tokenizer):
    kind = "bpe"

    def __init__(
        self,
        vocab: list[bytes],
        merges: list[tuple[int, int]],
        pattern: str = "gpt4",
        special_tokens: dict[str, int] | None = None,
        fast: bool = True,
    ) -> None:
        super().__init__(special_tokens)
        self.vocab = vocab  # id -> bytes, for every non-special id
        self.merges = merges  # (left id, right id) in the order learned; kept for HF export
        self.pattern_name = pattern
        self.pattern = resolve_pattern(pattern)
        self.ranks = {t: i for i, t in enumerate(vocab)}
        if len(self.ranks) != len(vocab):
            raise ValueError("vocabulary has duplicate byte strings")
        if any(bytes([b]) not in self.ranks for b in range(256)):
            raise ValueError("vocabulary lacks some of the 256 single bytes")
        if any(not (0 <= a < len(vocab) and 0 <= b < len(vocab)) for a, b in merges):
            raise ValueError("a merge refers to an id outside the vocabulary")
        for s, i in self.special_tokens.items():
            if i < len(vocab):
                raise ValueError(f"special token {s!r} id {i} collides with a byte-level token")
        self._pat = regex.compile(self.pattern)
        self._id_to_special = {i: s.encode("utf-8") for s, i in self.special_tokens.items()}
        self._cache: dict[str, list[int]] = {}
        self.fast = fast
        self._engine = None

    @classmethod
    def train(cls, texts: list[str], cfg: TokenizerConfig, progress: bool = True) -> BPETokenizer:
        return train_bpe(texts, cfg.vocab_size, cfg.pattern, cfg.special_tokens, progress=progress)

    @property
    def vocab_size(self) -> int:
        return max(len(self.vocab), max(self.special_tokens.values(), default=-1) + 1)

    # -- encoding -------------------------------------------------------------------------------
    def _bpe(self, piece: bytes) -> list[int]:
        ranks = self.ranks
        if piece in ranks:
            return [ranks[piece]]
        parts = [piece[i : i + 1] for i in range(len(piece))]
        while len(parts) > 1:
            best, best_rank = -1, len(ranks)
            for i in range(len(parts) - 1):
                r = ranks.get(parts[i] + parts[i + 1])
                if r is not None and r < best_rank:
                    best, best_rank = i, r
            if best < 0:
                break
            parts[best : best + 2] = [parts[best] + parts[best + 1]]
        return [ranks[p] for p in parts]

    def encode_python(self, text: str) -> list[int]:
        """The readable encoder: regex split, then merges by rank inside each pre-token."""
        out: list[int] = []
        cache = self._cache
        for piece in self._pat.findall(text):
            ids = cache.get(piece)
            if ids is None:
                ids = self._bpe(piece.encode("utf-8"))
                if len(cache) > 200_000:
                    cache.clear()
                cache[piece] = ids
            out.extend(ids)
        return out

    def tiktoken_encoding(self):
        """Our ranks and pattern as a `tiktoken.Encoding` (tiktoken as an engine only)."""
        if self._engine is None:
            import tiktoken

            self._engine = tiktoken.Encoding(
                name=f"scratchlm-{self.fingerprint()}",
                pat_str=self.pattern,
                mergeable_ranks=self.ranks,
                special_tokens=self.special_tokens,
            )
        return self._engine

    def _fast_ok(self) -> bool:
        if not self.fast:
            return False
        try:
            import tiktoken  # noqa: F401
        except ImportError:
            self.fast = False
        return self.fast

    def encode_ordinary(self, text: str) -> list[int]:
        if self._fast_ok():
            return self.tiktoken_encoding().encode_ordinary(text)
        return self.encode_python(text)

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Encode many texts as ordinary text (no specials), threaded in the fast path."""
        if self._fast_ok():
            return self.tiktoken_encoding().encode_ordinary_batch(texts, num_threads=num_threads or os.cpu_count())
        return [self.encode_python(t) for t in texts]

    # -- decoding -------------------------------------------------------------------------------
    def decode_bytes(self, ids: list[int]) -> bytes:
        vocab, n, specials = self.vocab, len(self.vocab), self._id_to_special
        return b"".join(vocab[i] if i < n else specials[i] for i in ids)

    def decode(self, ids: list[int]) -> str:
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def id_to_piece(self, i: int) -> str:
        if i < len(self.vocab):
            return self.vocab[i].decode("utf-8", errors="backslashreplace")
        return self._id_to_special[i].decode()

    # -- file format ----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        # Tokens are written in GPT-2's printable byte alphabet so the file stays readable JSON.
        return {
            "pattern_name": self.pattern_name if self.pattern_name in PATTERNS else None,
            "pattern": self.pattern,
            "tokens": [token_to_str(t) for t in self.vocab],
            "merges": [list(m) for m in self.merges],
        }

    @classmethod
    def _from_state(cls, d: dict[str, Any], special_tokens: dict[str, int]) -> BPETokenizer:
        vocab = [str_to_token(s) for s in d["tokens"]]
        merges = [(int(a), int(b)) for a, b in d["merges"]]
        return cls(vocab, merges, d.get("pattern_name") or d["pattern"], special_tokens)

    # -- the original GPT-2 files ---------------------------------------------------------------
    @classmethod
    def from_gpt2_files(cls, encoder_json: str | Path, vocab_bpe: str | Path) -> BPETokenizer:
        """Load OpenAI's GPT-2 `encoder.json` (token -> id) and `vocab.bpe` (merges in order)."""
        try:
            encoder = json.loads(Path(encoder_json).read_text(encoding="utf-8"))
            lines = Path(vocab_bpe).read_text(encoding="utf-8").split("\n")
        except FileNotFoundError as e:
            raise UserError(f"{e.filename}: no such file") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{encoder_json}: not a GPT-2 encoder.json ({e})") from None
        specials = {tok: i for tok, i in encoder.items() if tok.startswith("<|") and tok.endswith("|>")}
        n = len(encoder) - len(specials)
        vocab: list[bytes | None] = [None] * n
        try:
            for tok, i in encoder.items():
                if tok not in specials:
                    vocab[i] = str_to_token(tok)
        except (KeyError, IndexError):
            raise UserError(f"{encoder_json}: token {tok!r} (id {i}) is not GPT-2 byte-level") from None
        if any(v is None for v in vocab):
            raise UserError(f"{encoder_json}: ids are not contiguous")
        merges = []
        for lineno, line in enumerate(lines, 1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2 or parts[0] not in encoder or parts[1] not in encoder:
                raise UserError(f"{vocab_bpe}:{lineno}: not a merge of two known tokens: {line!r}")
            merges.append((encoder[parts[0]], encoder[parts[1]]))
        return cls(vocab, merges, "gpt2", specials)  # type: ignore[arg-type]

    # -- exports --------------------------------------------------------------------------------
    def save_tiktoken(self, path: str | Path) -> None:
        """tiktoken's rank file: one `base64(token) rank` line per byte-level token."""
        with atomic_open(path, "w", encoding="ascii") as f:
            for i, t in enumerate(self.vocab):
                f.write(f"{base64.b64encode(t).decode()} {i}\n")

    def to_hf_json(self) -> dict[str, Any]:
        """A `tokenizer.json` for HF `tokenizers` / `PreTrainedTokenizerFast` with identical ids.

        Our pre-tokenizer regex becomes a `Split`, then `ByteLevel` maps bytes to GPT-2's
        alphabet. Merges are listed by the id of the token they make (ties in learned order),
        which is the priority tiktoken's rule gives them, and `ignore_merges` maps a whole
        pre-token that is in the vocabulary straight to its id, as tiktoken does.
        """
        order = sorted(range(len(self.merges)), key=lambda k: (self.ranks[self.vocab[self.merges[k][0]] +
                                                                          self.vocab[self.merges[k][1]]], k))
        merges = [[token_to_str(self.vocab[self.merges[k][0]]), token_to_str(self.vocab[self.merges[k][1]])]
                  for k in order]
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": [
                {"id": i, "content": s, "single_word": False, "lstrip": False, "rstrip": False,
                 "normalized": False, "special": True}
                for s, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])
            ],
            "normalizer": None,
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": self.pattern}, "behavior": "Isolated", "invert": False},
                    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
                ],
            },
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": None,
                "end_of_word_suffix": None,
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": True,
                "vocab": {token_to_str(t): i for i, t in enumerate(self.vocab)},
                "merges": merges,
            },
        }

    def save_hf(self, out_dir: str | Path) -> None:
        """Write `tokenizer.json` + `tokenizer_config.json` that `AutoTokenizer` loads offline."""
        out_dir = Path(out_dir)
        write_json(out_dir / "tokenizer.json", self.to_hf_json())
        eos = "<|endoftext|>" if "<|endoftext|>" in self.special_tokens else None
        write_json(out_dir / "tokenizer_config.json", {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "model_max_length": 1_000_000_000,
            "bos_token": eos, "eos_token": eos, "unk_token": None,
            "pad_token": "<|pad|>" if "<|pad|>" in self.special_tokens else None,
            "clean_up_tokenization_spaces": False,
        })
