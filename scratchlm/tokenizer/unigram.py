"""Unigram language-model tokenizer (SentencePiece-style), trained and applied here.

Text handling: every space becomes `▁` (U+2581) and one `▁` is put in front of the text
(SentencePiece's `add_dummy_prefix`), so "Hello world" is segmented as "▁Hello▁world". There
is no other normalisation: no NFKC, no collapsing of repeated spaces, and newlines and tabs
stay ordinary characters. This is SentencePiece with `normalizer_spec.name="identity"`,
`add_dummy_prefix=True`, `remove_extra_whitespaces=False`, `escape_whitespaces=True`, and the
encoder matches that configuration of the `sentencepiece` library id for id (tested).

Encoding is the Viterbi segmentation: the pieces whose log-probabilities sum highest. It is
done the way SentencePiece does it, so even ties and near-ties come out the same: scores are
float32, each path sum is rounded to float32, positions are visited left to right and a
candidate replaces the best one ending at the same place only if strictly better (so on a tie
the longest last piece wins). A character with no piece of its own is `<unk>`; a run of such
characters becomes one `<unk>`, as in SentencePiece. Each stretch of ordinary text between
special tokens is encoded (and decoded) as its own "sentence", with its own `▁` prefix. A `▁`
already in the input is indistinguishable from a space and decodes as one (as in SentencePiece).

Training (Kudo 2018, as in SentencePiece's trainer, written from the description):
1. Pre-tokens: the text is cut before each `▁`, between letters, digits and other symbols, and
   around newlines, so pieces never span two words, never mix letters with digits or
   punctuation, and hold `▁` only at the start. Distinct pre-tokens are counted once with their
   frequency; longer than 64 characters they are cut into 64-character chunks.
2. Seed vocabulary: every character, plus the most frequent substrings of pre-tokens (2 to 16
   characters, seen at least twice), ranked by frequency times length; 8x the target size (at
   least 20,000), which on a small corpus is close to every candidate anyway.
3. EM: the E-step runs forward-backward (exact expected counts, not a Viterbi approximation)
   over the lattice of every distinct pre-token, weighted by its frequency; the M-step drops
   pieces expected less than 0.5 times and sets log p = digamma(count) - digamma(total) (the
   Bayesian estimate SentencePiece uses, which pushes rare pieces down). Two EM rounds per step.
4. Pruning: segment every pre-token with Viterbi, and for each piece its best segmentation
   without itself (its "alternative"). Removing a piece that occurs f times moves those f
   occurrences onto its alternative pieces; the loss is the drop in log-likelihood this
   causes, f * (log p(piece) - sum of log p'(alternatives)) with p' re-estimated after the
   move (SentencePiece weights by the share of sentences holding the piece instead of f). The
   pieces with the smallest loss go, 25% per step, until `vocab_size` is reached.
   Single characters are never removed, so every training character stays encodable. On a tiny
   corpus EM may leave fewer useful pieces than asked for; the vocabulary is then smaller.
All of it runs on flat numpy arrays: the lattice edges of all pre-tokens are stored once and
filtered as pieces go, and forward, backward and Viterbi advance one character position at a
time across every pre-token at once.

Ids: `<unk>` is 0, then `cfg.special_tokens` (1..k), then the pieces by descending score. The
file stores pieces and float32 scores.

Left out: sampling (subword regularisation), n-best, byte fallback, user-defined symbols,
unicode-script splitting beyond letters/digits/other, and SentencePiece's final 10% overshoot
before trimming to `vocab_size`. Encoding is pure Python (a few microseconds per character).
"""

from __future__ import annotations

from array import array
from collections import Counter
from typing import Any

import numpy as np
import regex
from tqdm import tqdm

from scratchlm.config import TokenizerConfig
from scratchlm.errors import UserError
from scratchlm.tokenizer.base import Tokenizer, register

SPACE = "\u2581"
UNK = "<unk>"
UNK_PENALTY = 10.0  # an unknown character scores this much below the rarest piece (as SentencePiece)
MAX_PIECE_LEN = 16
MAX_PRETOKEN_LEN = 64
SHRINK = 0.75
EM_ROUNDS = 2
MIN_EXPECTED = 0.5  # the M-step drops pieces expected fewer times than this

# Pre-tokens for training: an optional ▁ then a run of letters (with their marks), of digits, or
# of other symbols; newlines alone; a ▁ that starts nothing (before another space or a newline).
_PRETOKEN = regex.compile(
    rf"{SPACE}?[\p{{L}}\p{{M}}]+|{SPACE}?\p{{N}}+|{SPACE}?[^\p{{L}}\p{{M}}\p{{N}}{SPACE}\n]+|\n|{SPACE}"
)


def to_pieces_text(text: str) -> str:
    """SentencePiece's whitespace handling: a ▁ in front, and every space as ▁."""
    return SPACE + text.replace(" ", SPACE) if text else ""


# ------------------------------------------------------------------------------------------------
# training


def _digamma(x: np.ndarray) -> np.ndarray:
    """psi(x) for x > 0: shift x above 6 with psi(x) = psi(x+1) - 1/x, then the asymptotic series."""
    x = np.array(x, dtype=np.float64)
    out = np.zeros_like(x)
    small = x < 6
    while small.any():
        out[small] -= 1.0 / x[small]
        x[small] += 1.0
        small = x < 6
    f = 1.0 / (x * x)
    series = f * (1 / 12 - f * (1 / 120 - f * (1 / 252 - f * (1 / 240 - f / 132))))
    return out + np.log(x) - 0.5 / x - series


class _Lattices:
    """Every occurrence of a vocabulary piece inside a batch of strings, as flat edge arrays.

    String k owns nodes off[k] .. off[k] + len(k) (one per character boundary); an edge is a
    piece spanning node `src` to node `dst`. Forward, backward and Viterbi process all strings
    together, one end (or start) position at a time, with segment reductions over the edges
    that end (or start) there.
    """

    def __init__(self, lengths: np.ndarray, src: np.ndarray, dst: np.ndarray, piece: np.ndarray,
                 string: np.ndarray, off: np.ndarray, active: np.ndarray) -> None:
        self.lengths, self.off, self.active = lengths, off, active
        self.src, self.dst, self.piece, self.string = src, dst, piece, string
        self.num_nodes = int(off[-1] + lengths[-1] + 1) if len(lengths) else 0
        end_pos = dst - off[string]
        start_pos = src - off[string]
        self.fwd = self._groups(end_pos, dst)
        self.bwd = self._groups(start_pos, src)

    @classmethod
    def build(cls, strings: list[str], ids: dict[str, int], skip_whole: bool = False) -> _Lattices:
        """Find every piece of `ids` in every string (the whole string itself left out if asked)."""
        lengths = np.array([len(s) for s in strings], dtype=np.int64)
        off = np.zeros(len(strings), dtype=np.int64)
        if len(strings) > 1:
            off[1:] = np.cumsum(lengths[:-1] + 1)
        src: list[int] = []
        dst: list[int] = []
        piece: list[int] = []
        string: list[int] = []
        for k, s in enumerate(strings):
            n, base = len(s), int(off[k])
            for i in range(n):
                for j in range(i + 1, min(n, i + MAX_PIECE_LEN) + 1):
                    p = ids.get(s[i:j])
                    if p is not None and not (skip_whole and i == 0 and j == n):
                        src.append(base + i)
                        dst.append(base + j)
                        piece.append(p)
                        string.append(k)
        as_arr = lambda xs: np.array(xs, dtype=np.int64)  # noqa: E731
        return cls(lengths, as_arr(src), as_arr(dst), as_arr(piece), as_arr(string), off,
                   np.ones(len(strings), dtype=bool))

    def keep(self, keep_piece: np.ndarray, keep_string: np.ndarray | None = None) -> _Lattices:
        """Drop the edges of removed pieces (and, optionally, whole strings); renumber pieces."""
        new_id = np.cumsum(keep_piece) - 1
        active = self.active if keep_string is None else self.active & keep_string
        m = keep_piece[self.piece] & active[self.string]
        return _Lattices(self.lengths, self.src[m], self.dst[m], new_id[self.piece[m]], self.string[m],
                         self.off, active)

    @staticmethod
    def _groups(pos: np.ndarray, node: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """For each position: (edge indices sorted by node, segment starts, the node of each segment)."""
        order = np.lexsort((node, pos))
        pos_sorted = pos[order]
        groups = []
        bounds = np.flatnonzero(np.diff(pos_sorted)) + 1
        for chunk in np.split(order, bounds):
            if len(chunk) == 0:
                continue
            nodes = node[chunk]
            seg = np.concatenate(([0], np.flatnonzero(np.diff(nodes)) + 1))
            groups.append((chunk, seg, nodes[seg]))
        return groups

    def _sweep(self, lp: np.ndarray, forward: bool, viterbi: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Forward (or backward) log-sum-exp, or Viterbi max with back-pointers, over all strings."""
        score = np.full(self.num_nodes, -np.inf)
        starts = self.off if forward else self.off + self.lengths
        score[starts] = 0.0
        back = np.full(self.num_nodes, -1, dtype=np.int64) if viterbi else None
        frm = self.src if forward else self.dst
        groups = self.fwd if forward else self.bwd[::-1]
        for chunk, seg, nodes in groups:
            vals = score[frm[chunk]] + lp[self.piece[chunk]]
            mx = np.maximum.reduceat(vals, seg)
            if viterbi:
                sizes = np.diff(np.append(seg, len(vals)))
                is_best = vals == np.repeat(mx, sizes)
                first = np.minimum.reduceat(np.where(is_best, np.arange(len(vals)), len(vals)), seg)
                back[nodes] = chunk[first]
                score[nodes] = mx
            else:
                sizes = np.diff(np.append(seg, len(vals)))
                total = np.add.reduceat(np.exp(vals - np.repeat(mx, sizes)), seg)
                score[nodes] = mx + np.log(total)
        return score, back

    def expected_counts(self, lp: np.ndarray, freq: np.ndarray) -> tuple[np.ndarray, float]:
        """E-step: expected occurrences of every piece, and the total log-likelihood."""
        alpha, _ = self._sweep(lp, forward=True, viterbi=False)
        beta, _ = self._sweep(lp, forward=False, viterbi=False)
        z = alpha[self.off + self.lengths]
        post = np.exp(alpha[self.src] + lp[self.piece] + beta[self.dst] - z[self.string])
        counts = np.bincount(self.piece, weights=post * freq[self.string], minlength=len(lp))
        return counts, float((freq * z)[self.active].sum())

    def viterbi(self, lp: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The best segmentation of every active string, as flat (string, piece) arrays."""
        _, back = self._sweep(lp, forward=True, viterbi=True)
        strings, pieces = [], []
        ks = np.flatnonzero(self.active)
        cur = self.off[ks] + self.lengths[ks]
        done = self.off[ks]
        while len(ks):
            e = back[cur]
            strings.append(ks)
            pieces.append(self.piece[e])
            cur = self.src[e]
            more = cur != done
            ks, cur, done = ks[more], cur[more], done[more]
        if not strings:
            return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.int64)
        return np.concatenate(strings), np.concatenate(pieces)


def _pretokens(texts: list[str]) -> Counter:
    counts: Counter = Counter()
    for t in texts:
        counts.update(_PRETOKEN.findall(to_pieces_text(t)))
    chunked: Counter = Counter()
    for w, f in counts.items():
        for i in range(0, len(w), MAX_PRETOKEN_LEN):
            chunked[w[i : i + MAX_PRETOKEN_LEN]] += f
    return chunked


def _seed(words: Counter, size: int) -> tuple[list[str], np.ndarray]:
    """All characters plus the `size` substrings with the highest frequency × length."""
    chars: Counter = Counter()
    subs: Counter = Counter()
    for w, f in words.items():
        n = len(w)
        for i in range(n):
            chars[w[i]] += f
            for j in range(i + 2, min(n, i + MAX_PIECE_LEN) + 1):
                subs[w[i:j]] += f
    ranked = sorted(((f * len(s), s) for s, f in subs.items() if f >= 2), key=lambda t: (-t[0], t[1]))[:size]
    pieces = sorted(chars) + [s for _, s in ranked]
    freq = np.array([chars[c] for c in sorted(chars)] + [subs[s] for _, s in ranked], dtype=np.float64)
    return pieces, freq


def train_unigram(
    texts: list[str],
    vocab_size: int,
    special_tokens: list[str] | tuple[str, ...] = (),
    *,
    seed_size: int | None = None,
    progress: bool = True,
) -> UnigramTokenizer:
    """Learn a Unigram vocabulary of `vocab_size` tokens (`<unk>` and specials included)."""
    specials = {s: i for i, s in enumerate(dict.fromkeys([UNK, *special_tokens]))}
    words = _pretokens(texts)
    if not words:
        raise UserError("no training text: every input is empty")
    strings = list(words)
    wfreq = np.array(list(words.values()), dtype=np.float64)
    n_chars = len(set().union(*map(set, strings))) if strings else 0
    minimum = len(specials) + n_chars
    if vocab_size < minimum:
        raise UserError(
            f"tokenizer.vocab_size={vocab_size} is below the minimum {minimum} for this text "
            f"({len(specials)} special tokens + {n_chars} characters)",
            fix=f"use --tokenizer.vocab_size={minimum} or more",
        )
    target = vocab_size - len(specials)
    # A seed of 8x the target shrinks to size in ~7 pruning steps; much larger seeds cost time
    # on a small corpus without changing the result much.
    pieces, freq = _seed(words, seed_size if seed_size is not None else max(8 * target, 20_000))
    is_char = np.array([len(p) == 1 for p in pieces])
    lp = np.log(freq) - np.log(freq.sum())

    words_lat = _Lattices.build(strings, {p: i for i, p in enumerate(pieces)})
    # The alternatives of a piece: its own segmentation without itself (characters have none).
    pieces_lat = _Lattices.build(pieces, {p: i for i, p in enumerate(pieces)}, skip_whole=True)
    pieces_lat = pieces_lat.keep(np.ones(len(pieces), dtype=bool), ~is_char)
    piece_index = np.arange(len(pieces))  # position of each current piece in the pieces lattice

    def restrict(keep: np.ndarray) -> None:
        nonlocal pieces, lp, is_char, words_lat, pieces_lat, piece_index
        keep_string = np.zeros(pieces_lat.active.shape, dtype=bool)
        keep_string[piece_index[keep]] = True
        words_lat = words_lat.keep(keep)
        pieces_lat = pieces_lat.keep(keep, keep_string)
        pieces = [p for p, k in zip(pieces, keep) if k]
        lp, is_char, piece_index = lp[keep], is_char[keep], piece_index[keep]

    def em(drop: bool) -> float:
        nonlocal lp
        counts, loglik = words_lat.expected_counts(lp, wfreq)
        if drop:
            keep = (counts >= MIN_EXPECTED) | is_char
            if not keep.all():
                counts = counts[keep]
                restrict(keep)
        counts = np.maximum(counts, MIN_EXPECTED)  # a character nobody expects still gets a score
        lp = _digamma(counts) - _digamma(counts.sum())
        return loglik

    seeded = len(pieces)
    bar = tqdm(desc="unigram pruning", unit="piece", total=max(seeded - target, 0), disable=not progress, leave=False)
    while True:
        for _ in range(EM_ROUNDS):
            loglik = em(drop=True)
        bar.set_postfix(pieces=len(pieces), loglik=f"{loglik:.4g}")
        bar.update(min(seeded - len(pieces), bar.total) - bar.n)
        if len(pieces) <= target:
            break
        size = max(target, int(len(pieces) * SHRINK))
        restrict(_prune(words_lat, pieces_lat, piece_index, lp, wfreq, is_char, size))
        if len(pieces) == target:
            for _ in range(EM_ROUNDS):
                em(drop=False)  # settle the scores; dropping now would undershoot vocab_size
            break
    bar.close()

    scores = lp.astype(np.float32)
    order = sorted(range(len(pieces)), key=lambda k: (-scores[k], pieces[k]))
    return UnigramTokenizer([(pieces[k], float(scores[k])) for k in order], specials)


def _prune(words_lat: _Lattices, pieces_lat: _Lattices, piece_index: np.ndarray, lp: np.ndarray,
           wfreq: np.ndarray, is_char: np.ndarray, size: int) -> np.ndarray:
    """Keep the `size` pieces whose removal would cost the most likelihood (and every character)."""
    v = len(lp)
    seg_string, seg_piece = words_lat.viterbi(lp)
    freq = np.bincount(seg_piece, weights=wfreq[seg_string], minlength=v)
    total = freq.sum()

    owner_slot, alt = pieces_lat.viterbi(lp)  # owner_slot indexes the pieces lattice's strings
    slot_to_piece = np.full(len(pieces_lat.active), -1, dtype=np.int64)
    slot_to_piece[piece_index] = np.arange(v)
    owner = slot_to_piece[owner_slot]
    n_alt = np.bincount(owner, minlength=v)

    # After removing piece i, its freq[i] occurrences become occurrences of each alternative.
    total_after = total + freq * (n_alt - 1)
    with np.errstate(divide="ignore", invalid="ignore"):  # pieces never used: log 0, masked below
        lp_before = np.log(freq) - np.log(total)
        alt_lp = np.log(freq[alt] + freq[owner]) - np.log(total_after[owner])
        lp_after = np.bincount(owner, weights=alt_lp, minlength=v)
        loss = np.where(freq > 0, freq * (lp_before - lp_after), 0.0)
    loss[is_char] = np.inf

    order = np.lexsort((np.arange(v), -lp, -loss))  # biggest loss first; ties: likelier, then older
    keep = np.zeros(v, dtype=bool)
    keep[order[:size]] = True
    keep |= is_char
    return keep


# ------------------------------------------------------------------------------------------------
# the tokenizer


@register
class UnigramTokenizer(Tokenizer):
    kind = "unigram"

    def __init__(self, pieces: list[tuple[str, float]], special_tokens: dict[str, int] | None = None) -> None:
        super().__init__(special_tokens)
        n = len(self.special_tokens)
        if sorted(self.special_tokens.values()) != list(range(n)) or self.special_tokens.get(UNK) != 0:
            raise ValueError(f"special tokens must hold ids 0..n-1 with {UNK} at 0")
        # Scores are float32, as SentencePiece stores and sums them.
        self.pieces = [(str(p), float(np.float32(s))) for p, s in pieces]
        self.piece_ids = {p: n + k for k, (p, _) in enumerate(self.pieces)}
        if len(self.piece_ids) != len(self.pieces) or "" in self.piece_ids:
            raise ValueError("pieces must be distinct and non-empty")
        self.unk_id = 0
        self._itos = [""] * n + [p for p, _ in self.pieces]
        for s, i in self.special_tokens.items():
            self._itos[i] = s
        min_score = min((s for _, s in self.pieces), default=0.0)
        self._unk_score = float(np.float32(np.float32(min_score) - np.float32(UNK_PENALTY)))
        # Every prefix of every piece maps to (id, score) if it is a piece, else None: the
        # search from a position stops at the first string that starts no piece (a trie walk).
        self._prefixes: dict[str, tuple[int, float] | None] = {}
        for k, (p, s) in enumerate(self.pieces):
            for j in range(1, len(p)):
                self._prefixes.setdefault(p[:j], None)
            self._prefixes[p] = (n + k, s)
        self._f32 = array("f", [0.0])

    @classmethod
    def train(cls, texts: list[str], cfg: TokenizerConfig, progress: bool = True) -> UnigramTokenizer:
        return train_unigram(texts, cfg.vocab_size, cfg.special_tokens, progress=progress)

    @property
    def vocab_size(self) -> int:
        return len(self._itos)

    # -- encoding -------------------------------------------------------------------------------
    def _viterbi(self, s: str) -> list[int]:
        n = len(s)
        prefixes, f32, unk_score = self._prefixes, self._f32, self._unk_score
        best: list[float | None] = [None] * (n + 1)
        best[0] = 0.0
        start = [0] * (n + 1)
        ident = [0] * (n + 1)
        for i in range(n):
            here = best[i]
            single = False
            for j in range(i + 1, n + 1):
                hit = prefixes.get(s[i:j], False)
                if hit is False:
                    break  # no piece starts with s[i:j]
                if hit is None:
                    continue
                f32[0] = hit[1] + here  # round the path score to float32, as SentencePiece does
                cand = f32[0]
                old = best[j]
                if old is None or cand > old:
                    best[j], start[j], ident[j] = cand, i, hit[0]
                if j == i + 1:
                    single = True
            if not single:
                f32[0] = unk_score + here
                cand = f32[0]
                old = best[i + 1]
                if old is None or cand > old:
                    best[i + 1], start[i + 1], ident[i + 1] = cand, i, self.unk_id
        out: list[int] = []
        j = n
        while j > 0:
            out.append(ident[j])
            j = start[j]
        out.reverse()
        # A run of unknown characters is one <unk>.
        return [t for k, t in enumerate(out) if t != self.unk_id or k == 0 or out[k - 1] != self.unk_id]

    def encode_ordinary(self, text: str) -> list[int]:
        return self._viterbi(to_pieces_text(text))

    def encode_as_pieces(self, text: str) -> list[str]:
        return [self._itos[i] for i in self.encode_ordinary(text)]

    # -- decoding -------------------------------------------------------------------------------
    def decode(self, ids: list[int]) -> str:
        out: list[str] = []
        run: list[str] = []

        def flush() -> None:
            text = "".join(run).replace(SPACE, " ")
            out.append(text[1:] if text.startswith(" ") else text)  # the dummy prefix
            run.clear()

        n = len(self.special_tokens)
        for i in ids:
            if 0 < i < n:
                flush()
                out.append(self._itos[i])
            else:
                run.append(self._itos[i])
        flush()
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        return self._itos[i]

    def score(self, i: int) -> float:
        """The log-probability of a piece (0.0 for specials)."""
        n = len(self.special_tokens)
        return self.pieces[i - n][1] if i >= n else 0.0

    # -- file format ----------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        return {"pieces": [[p, s] for p, s in self.pieces]}

    @classmethod
    def _from_state(cls, d: dict[str, Any], special_tokens: dict[str, int]) -> UnigramTokenizer:
        return cls([(str(p), float(s)) for p, s in d["pieces"]], special_tokens)

