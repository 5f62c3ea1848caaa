"""Duplicate detection for `scratchlm data prepare`: normalised exact keys, and MinHash + LSH near duplicates.

Exact duplicates. `dedup_key` hashes (16-byte blake2b) the text after `normalize`: Unicode NFKC,
case folded, punctuation (`\\p{P}`) removed, runs of whitespace made one space. Two documents that
differ only in case, punctuation or line wrapping get the same key.

Near duplicates (Broder 1997, "On the resemblance and containment of documents"; the banding of
Indyk & Motwani 1998, as in Leskovec, Rajaraman & Ullman, "Mining of Massive Datasets", ch. 3):
- Shingles: the set of n-grams of the normalised text, of words (`unit="word"`) or of characters
  (`unit="char"`); a text shorter than n is one shingle. Each shingle becomes a 32-bit value: words
  are hashed once each (blake2b, cached), an n-gram's word hashes are combined polynomially (mod
  2^64) and mixed with the splitmix64 finaliser, and the top 32 bits kept.
- Signature: `num_perm` hash functions h_k(x) = (a_k * x + b_k) mod p with p = 2^31 - 1 (a
  Mersenne prime) and a_k in [1, p), b_k in [0, p) drawn from a fixed seed, so every run and every
  part of a sharded run uses the same family. The signature of a document is min over its shingles
  of each h_k: two documents' signatures agree in position k with probability equal to the
  Jaccard similarity J of their shingle sets (up to hash collisions), so the fraction of equal
  positions estimates J. With x < 2^32 and a_k < 2^31, a_k * x + b_k < 2^64: the arithmetic is
  exact in uint64, vectorised over (num_perm, shingles) blocks.
- LSH banding: the signature is cut into b bands of r rows (b * r <= num_perm). Two documents are
  candidates when all r rows of at least one band agree, which happens with probability
  1 - (1 - J^r)^b: an S-curve whose steepest point sits near J = (1/b)^(1/r), the approximate
  threshold. `lsh_params` picks (b, r) for a threshold t by minimising the area of false
  positives (J < t) plus false negatives (J >= t) under that curve, as datasketch does.
- Clusters: candidates are joined by union-find (optionally only those whose estimated J is >= t,
  `verify`); each connected cluster keeps its first document (lowest index) and drops the rest.
  A chain a ~ b ~ c drops c even when a and c alone are not similar: a cluster is one group.

Left out: suffix-array exact substring dedup (Lee et al. 2022), and dedup of paragraphs or lines
across documents; signatures are held in memory (num_perm * 4 bytes per document).
"""

from __future__ import annotations

import functools
import hashlib
import math
import unicodedata

import numpy as np
import regex

P31 = (1 << 31) - 1  # the hash functions' prime modulus
EMPTY = np.uint32(0xFFFFFFFF)  # the signature of a text without shingles (no h_k reaches it)
SEED = 0x5C7A7C  # the permutations' seed: fixed, so signatures from any run or part compare

_PUNCT = regex.compile(r"\p{P}+")
_MUL = np.uint64(0x9E3779B97F4A7C15)  # odd 64-bit constant of the polynomial n-gram combination
_BLOCK = 1 << 14  # shingles per (num_perm, block) slab of the signature computation
_WORD_CACHE_MAX = 1 << 20


def normalize(text: str) -> str:
    """NFKC, case folded, punctuation removed, whitespace runs made one space (the exact-dedup form)."""
    return " ".join(_PUNCT.sub("", unicodedata.normalize("NFKC", text).casefold()).split())


def dedup_key(form: str) -> bytes:
    """16-byte key of exact dedup: a hash of the text as compared (`normalize(text)`, or the raw text)."""
    return hashlib.blake2b(form.encode("utf-8", errors="surrogatepass"), digest_size=16).digest()


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: every input bit affects every output bit (uint64, wraps)."""
    h = h ^ (h >> np.uint64(30))
    h = h * np.uint64(0xBF58476D1CE4E5B9)
    h = h ^ (h >> np.uint64(27))
    h = h * np.uint64(0x94D049BB133111EB)
    return h ^ (h >> np.uint64(31))


_word_cache: dict[str, int] = {}


def word_hashes(words: list[str]) -> np.ndarray:
    """A 64-bit hash per word (blake2b, the same in every process), shape (len(words),) uint64."""
    cache = _word_cache
    if len(cache) > _WORD_CACHE_MAX:
        cache.clear()
    out = np.empty(len(words), dtype=np.uint64)
    for i, w in enumerate(words):
        h = cache.get(w)
        if h is None:
            h = cache[w] = int.from_bytes(hashlib.blake2b(w.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                          "little")
        out[i] = h
    return out


def ngram_hashes(units: np.ndarray, n: int) -> np.ndarray:
    """64-bit hashes of the n-grams of a sequence of unit hashes (L,) -> (max(L - n + 1, 1),), or (0,)
    for an empty sequence; a sequence shorter than n is one n-gram."""
    L = len(units)
    if L == 0:
        return np.zeros(0, dtype=np.uint64)
    n = min(n, L)
    with np.errstate(over="ignore"):
        h = units[: L - n + 1].copy()
        for k in range(1, n):
            h = h * _MUL + units[k : L - n + 1 + k]
        return _mix(h)


def shingles(norm: str, n: int, unit: str = "word") -> np.ndarray:
    """The 32-bit shingle values of a normalised text (`normalize`): its word or character n-grams, (S,) uint64."""
    if unit == "word":
        units = word_hashes(norm.split())
    else:
        units = _mix(np.frombuffer(norm.encode("utf-32-le"), dtype="<u4").astype(np.uint64))
    return ngram_hashes(units, n) >> np.uint64(32)


class MinHasher:
    """MinHash signatures (n, num_perm) uint32 of texts, with the fixed-seed family h_k = (a_k x + b_k) mod p."""

    def __init__(self, num_perm: int = 128, ngram: int = 5, unit: str = "word") -> None:
        self.num_perm, self.ngram, self.unit = num_perm, ngram, unit
        rng = np.random.default_rng(SEED)
        self.a = rng.integers(1, P31, size=(num_perm, 1), dtype=np.uint64)
        self.b = rng.integers(0, P31, size=(num_perm, 1), dtype=np.uint64)

    def signatures(self, texts: list[str]) -> np.ndarray:
        return self.signatures_of([self.shingles(normalize(t)) for t in texts])

    def shingles(self, norm: str) -> np.ndarray:
        return shingles(norm, self.ngram, self.unit)

    def signatures_of(self, shingle_sets: list[np.ndarray]) -> np.ndarray:
        """Signatures of shingle arrays (values < 2^32); a document without shingles gets all EMPTY."""
        sig = np.full((len(shingle_sets), self.num_perm), EMPTY, dtype=np.uint32)
        # Cut documents into pieces of at most _BLOCK shingles and pack pieces into blocks of at most
        # _BLOCK columns; one (num_perm, block) slab per block, min-reduced per piece.
        pieces: list[tuple[int, np.ndarray]] = []
        size = 0
        for doc, s in enumerate(shingle_sets):
            for start in range(0, len(s), _BLOCK):
                piece = s[start : start + _BLOCK]
                if size + len(piece) > _BLOCK:
                    self._reduce(pieces, sig)
                    pieces, size = [], 0
                pieces.append((doc, piece))
                size += len(piece)
        if pieces:
            self._reduce(pieces, sig)
        return sig

    def _reduce(self, pieces: list[tuple[int, np.ndarray]], sig: np.ndarray) -> None:
        x = np.concatenate([p for _, p in pieces])  # (S,)
        starts = np.cumsum([0] + [len(p) for _, p in pieces[:-1]])
        v = self.a * x[None, :] + self.b  # (num_perm, S), < 2^64: exact
        v %= np.uint64(P31)
        mins = np.minimum.reduceat(v, starts, axis=1).T.astype(np.uint32)  # (pieces, num_perm)
        np.minimum.at(sig, np.array([d for d, _ in pieces]), mins)


# ----------------------------------------------------------------------------------------------
# LSH


def candidate_probability(j: np.ndarray | float, bands: int, rows: int) -> np.ndarray | float:
    """P(two documents with Jaccard j share at least one band) = 1 - (1 - j^r)^b."""
    return 1.0 - (1.0 - np.asarray(j, dtype=np.float64) ** rows) ** bands


def approx_threshold(bands: int, rows: int) -> float:
    """Where the S-curve rises steepest: (1/b)^(1/r)."""
    return (1.0 / bands) ** (1.0 / rows)


def _area(y: np.ndarray, x: np.ndarray) -> float:
    """The trapezoid rule."""
    return float(((y[1:] + y[:-1]) * np.diff(x)).sum() / 2) if len(x) > 1 else 0.0


@functools.lru_cache(maxsize=64)
def lsh_params(threshold: float, num_perm: int, bands: int = 0) -> tuple[int, int]:
    """(bands, rows) for `num_perm` permutations: rows = num_perm // bands when `bands` is given,
    else the pair minimising false-positive plus false-negative area around `threshold`."""
    if bands:
        return bands, num_perm // bands
    grid = np.linspace(0.0, 1.0, 1001)
    below, above = grid <= threshold, grid >= threshold
    best, best_cost = (1, num_perm), math.inf
    for b in range(1, num_perm + 1):
        for r in range(1, num_perm // b + 1):
            p = candidate_probability(grid, b, r)
            cost = _area(p[below], grid[below]) + _area(1.0 - p[above], grid[above])
            if cost < best_cost:
                best, best_cost = (b, r), cost
    return best


def band_hashes(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(n, bands) uint64: a hash of each band's `rows` signature values."""
    s = sig[:, : bands * rows].astype(np.uint64).reshape(len(sig), bands, rows)
    with np.errstate(over="ignore"):
        h = s[:, :, 0] + np.uint64(1)
        for k in range(1, rows):
            h = h * _MUL + s[:, :, k]
        return _mix(h)


def candidate_pairs(sig: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """(k, 2) int64 pairs i < j of rows of `sig` that agree on at least one band, each pair once.
    Rows that are EMPTY (no shingles) take no part."""
    live = np.flatnonzero(sig[:, 0] != EMPTY)
    if len(live) < 2:
        return np.zeros((0, 2), dtype=np.int64)
    bh = band_hashes(sig[live], bands, rows)
    pairs = []
    for band in range(bands):
        order = np.argsort(bh[:, band], kind="stable")
        v = bh[order, band]
        starts = np.flatnonzero(np.r_[True, v[1:] != v[:-1]])  # where each run of equal hashes starts
        lens = np.diff(np.r_[starts, len(v)])
        two = starts[lens == 2]  # most buckets with a pair hold exactly two documents
        pairs.append(np.stack([live[order[two]], live[order[two + 1]]], axis=1))
        for start, size in zip(starts[lens > 2].tolist(), lens[lens > 2].tolist()):
            run = order[start : start + size]
            i, j = np.triu_indices(size, 1)
            pairs.append(np.stack([live[run[i]], live[run[j]]], axis=1))
    p = np.concatenate(pairs).astype(np.int64)
    p.sort(axis=1)
    return np.unique(p, axis=0)


def estimated_jaccard(sig: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """(k,) float64: the fraction of equal signature positions of each pair."""
    out = np.empty(len(pairs), dtype=np.float64)
    for s in range(0, len(pairs), 4096):
        p = pairs[s : s + 4096]
        out[s : s + 4096] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def clusters(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find over `pairs` (k, 2): (n,) the lowest index of each element's connected cluster."""
    parent: dict[int, int] = {}  # only elements that appear in a pair; the others are their own root

    def find(x: int) -> int:
        while parent.get(x, x) != x:
            parent[x] = parent.get(parent[x], parent[x])  # path halving
            x = parent[x]
        return x

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)  # the root is always the lowest index
    root = np.arange(n, dtype=np.int64)
    for x in parent:
        root[x] = find(x)
    return root


def near_duplicate_clusters(sig: np.ndarray, threshold: float, bands: int = 0, verify: bool = True) -> np.ndarray:
    """(n,) int64: the first document of each document's near-duplicate cluster, from signatures
    `sig` (n, num_perm). `bands` 0 = chosen by `lsh_params`; `verify` keeps only the candidate pairs
    whose estimated Jaccard is >= `threshold`."""
    n = len(sig)
    b, r = lsh_params(threshold, sig.shape[1], bands)
    # Identical signatures (estimated Jaccard 1) join their first copy directly, and only one of each
    # takes part in LSH: a bucket of many copies would otherwise cost a pair per two of them.
    rows = np.ascontiguousarray(sig).view(np.dtype((np.void, sig.dtype.itemsize * sig.shape[1]))).ravel()
    _, first, inverse = np.unique(rows, return_index=True, return_inverse=True)
    rep = first[inverse.ravel()]  # each document's first document with the same signature
    copies = np.flatnonzero((rep != np.arange(n)) & (sig[:, 0] != EMPTY))
    distinct = np.flatnonzero(rep == np.arange(n))
    pairs = distinct[candidate_pairs(sig[distinct], b, r)]
    if verify and len(pairs):
        pairs = pairs[estimated_jaccard(sig, pairs) >= threshold]
    return clusters(n, np.concatenate([pairs, np.stack([rep[copies], copies], axis=1)]))


def near_duplicates(sig: np.ndarray, threshold: float, bands: int = 0, verify: bool = True) -> np.ndarray:
    """(n,) bool: True for every document that is not the first of its near-duplicate cluster."""
    return near_duplicate_clusters(sig, threshold, bands, verify) != np.arange(len(sig))
