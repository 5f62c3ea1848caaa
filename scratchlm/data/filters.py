"""The document rules of `scratchlm data prepare`: which documents are dropped and why, and PII scrubbing.

Rules, in order; each dropped document is counted under the first rule that drops it, and a rule
that is off (its setting at the "off" value) is not listed in the manifest's `filtered`:
- `duplicate`: the same text was seen before, compared after normalising case, punctuation and
  whitespace (`data.dedup_normalize`; the raw text otherwise), when `data.dedup` (dedup.py);
- `too_short`: fewer than `data.min_chars` characters once surrounding whitespace is stripped;
- `repeated_lines`: the fraction of non-empty lines (compared stripped) that repeat an earlier
  line of the same document is above `data.max_repeated_line_ratio` (boilerplate, menus, spam).
Then heuristics in the style of Gopher's quality filters (Rae et al. 2021, appendix A) and C4's
(Raffel et al. 2020), on whitespace-separated words and non-empty lines:
- `word_count`: fewer words than `data.min_words` or more than `data.max_words`;
- `mean_word_length`: mean word length (characters) outside [min_mean_word_length, max_mean_word_length];
- `symbol_ratio`: ("#" + "..." + "…") per word above `data.max_symbol_word_ratio`;
- `bullet_lines`: fraction of lines starting with a bullet (•, -, *, ...) above `data.max_bullet_line_ratio`;
- `ellipsis_lines`: fraction of lines ending in "..." or "…" above `data.max_ellipsis_line_ratio`;
- `alpha_words`: fraction of words holding a letter below `data.min_alpha_word_fraction`;
- `stop_words`: fewer than `data.min_stop_words` distinct words of `STOP_WORDS` (our own short list of
  the commonest English function words): real English prose has them, word lists and spam often not;
- `script`: fraction of the letters that belong to `data.script` (latin, cyrillic, ...) below
  `data.min_script_fraction`: a cheap stand-in for language identification;
- `top_ngram`: the most frequent word 2-, 3- or 4-gram, when it repeats, covers more than a fraction of the
  characters: `data.max_top_ngram_fraction` for 2-grams, scaled by Gopher's ratios for 3 and 4
  (0.20 : 0.18 : 0.16);
- `dup_ngram`: the word n-grams (n = 5..10) that occur more than once cover more than a fraction of
  the characters: `data.max_dup_ngram_fraction` for 5-grams, scaled by Gopher's ratios for 6..10
  (0.15 : 0.14 : ... : 0.10).
The n-gram rules work on the normalised words (dedup.py's `normalize`), as near-dedup does.
Last, over the survivors of all the rules above, `near_duplicate` (MinHash + LSH, dedup.py).

PII scrubbing (`data.scrub_pii`) replaces e-mail addresses with "<email>" and IPv4 addresses with
"<ipv4>" before any rule runs, and the scrubbed text is what gets tokenised.

Left out: model-based quality scores and language identification, C4's line-level rules (lines
without terminal punctuation, "javascript", "lorem ipsum"), and name, phone-number and postal
address scrubbing.
"""

from __future__ import annotations

import hashlib
from functools import cached_property

import numpy as np
import regex

from scratchlm.config import DataConfig
from scratchlm.data.dedup import ngram_hashes, normalize, word_hashes

RULES = ("duplicate", "too_short", "repeated_lines", "word_count", "mean_word_length", "symbol_ratio",
         "bullet_lines", "ellipsis_lines", "alpha_words", "stop_words", "script", "top_ngram", "dup_ngram",
         "near_duplicate")
DOCUMENT_RULES = RULES[1:-1]  # the rules that judge a document on its own

# Our own list: the commonest English function words.
STOP_WORDS = frozenset(
    "the of and to a in is that it was for on with as he be at by his i not this but from or they have "
    "you had are which we she her there an were all their been one so if will would".split()
)
BULLETS = ("•", "●", "○", "■", "□", "▪", "▫", "◦", "‣", "⁃", "-", "*")
ELLIPSES = ("...", "…")
TOP_NGRAM_SCALE = {2: 1.0, 3: 0.18 / 0.20, 4: 0.16 / 0.20}
DUP_NGRAM_SCALE = {n: (0.20 - 0.01 * n) / 0.15 for n in range(5, 11)}  # 0.15, 0.14, ..., 0.10 over 0.15
SCRIPTS = {
    "latin": r"\p{Latin}", "cyrillic": r"\p{Cyrillic}", "greek": r"\p{Greek}", "arabic": r"\p{Arabic}",
    "hebrew": r"\p{Hebrew}", "devanagari": r"\p{Devanagari}", "cjk": r"[\p{Han}\p{Hiragana}\p{Katakana}\p{Hangul}]",
}
_LETTERS = regex.compile(r"\p{L}+")
_SCRIPT_RE = {name: regex.compile(f"{pat}+") for name, pat in SCRIPTS.items()}
_NO_LETTER_WORD = regex.compile(r"(?<!\S)[^\s\p{L}]+(?!\S)")
EMAIL = regex.compile(r"[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}")
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
IPV4 = regex.compile(rf"(?<![\d.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\.?\d)")


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=16).digest()


def scrub_pii(text: str) -> tuple[str, int, int]:
    """`text` with e-mail addresses -> "<email>" and IPv4 addresses -> "<ipv4>", and the two counts."""
    text, emails = EMAIL.subn("<email>", text)
    text, ips = IPV4.subn("<ipv4>", text)
    return text, emails, ips


def repeated_line_ratio(text: str) -> float:
    """Fraction of the non-empty lines (stripped) that repeat an earlier line of the same text."""
    seen: set[str] = set()
    lines = repeats = 0
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        lines += 1
        if line in seen:
            repeats += 1
        else:
            seen.add(line)
    return repeats / lines if lines else 0.0


def active_rules(data: DataConfig) -> tuple[str, ...]:
    """The rules `data` turns on, in order."""
    on = {
        "duplicate": data.dedup,
        "too_short": data.min_chars > 0,
        "repeated_lines": data.max_repeated_line_ratio < 1,
        "word_count": data.min_words > 0 or data.max_words > 0,
        "mean_word_length": data.min_mean_word_length > 0 or data.max_mean_word_length > 0,
        "symbol_ratio": data.max_symbol_word_ratio > 0,
        "bullet_lines": data.max_bullet_line_ratio < 1,
        "ellipsis_lines": data.max_ellipsis_line_ratio < 1,
        "alpha_words": data.min_alpha_word_fraction > 0,
        "stop_words": data.min_stop_words > 0,
        "script": data.script != "any",
        "top_ngram": data.max_top_ngram_fraction < 1,
        "dup_ngram": data.max_dup_ngram_fraction < 1,
        "near_duplicate": data.near_dedup,
    }
    return tuple(r for r in RULES if on[r])


class DocStats:
    """The statistics the rules read, each computed on first use."""

    def __init__(self, text: str, norm: str | None = None) -> None:
        self.text = text
        self._norm = norm  # normalize(text), when the caller has it already

    @cached_property
    def words(self) -> list[str]:
        return self.text.split()

    @cached_property
    def lines(self) -> list[str]:
        return [s for line in self.text.splitlines() if (s := line.strip())]

    @cached_property
    def norm_words(self) -> list[str]:
        return (self._norm if self._norm is not None else normalize(self.text)).split()

    @cached_property
    def norm_hashes(self) -> np.ndarray:
        return word_hashes(self.norm_words)

    @cached_property
    def norm_lengths(self) -> np.ndarray:
        return np.fromiter(map(len, self.norm_words), dtype=np.int64, count=len(self.norm_words))

    def mean_word_length(self) -> float:
        return sum(map(len, self.words)) / len(self.words) if self.words else 0.0

    def symbol_ratio(self) -> float:
        symbols = self.text.count("#") + sum(self.text.count(e) for e in ELLIPSES)
        return symbols / max(len(self.words), 1)

    def line_ratio(self, test) -> float:
        return sum(map(test, self.lines)) / len(self.lines) if self.lines else 0.0

    def alpha_word_fraction(self) -> float:
        return 1.0 - len(_NO_LETTER_WORD.findall(self.text)) / len(self.words) if self.words else 0.0

    def stop_words(self) -> int:
        return len(STOP_WORDS.intersection(self.norm_words))

    def script_fraction(self, script: str) -> float:
        letters = len(self.text) - len(_LETTERS.sub("", self.text))
        in_script = len(self.text) - len(_SCRIPT_RE[script].sub("", self.text))
        return in_script / letters if letters else 0.0

    def top_ngram_fraction(self, n: int) -> float:
        """Characters covered by the most frequent word n-gram (its count x its characters) / all characters,
        at most 1; 0 when no n-gram repeats."""
        total = int(self.norm_lengths.sum())
        if len(self.norm_words) < n or not total:
            return 0.0
        _, first, counts = np.unique(ngram_hashes(self.norm_hashes, n), return_index=True, return_counts=True)
        top = counts.max()
        if top < 2:  # nothing repeats (a short text's one n-gram would otherwise cover much of it)
            return 0.0
        ends = np.concatenate([[0], np.cumsum(self.norm_lengths)])
        starts = first[counts == top]
        chars = int((ends[starts + n] - ends[starts]).max())  # ties: the longest of the most frequent
        return min(1.0, int(top) * chars / total)  # overlapping occurrences can count a character twice

    def dup_ngram_fraction(self, n: int) -> float:
        """Characters of the words inside any word n-gram that occurs more than once / all characters."""
        L, total = len(self.norm_words), int(self.norm_lengths.sum())
        if L < n or not total:
            return 0.0
        _, inverse, counts = np.unique(ngram_hashes(self.norm_hashes, n), return_inverse=True, return_counts=True)
        starts = np.flatnonzero(counts[inverse] > 1)
        depth = np.zeros(L + 1, dtype=np.int64)  # +1 where a repeated n-gram starts, -1 past its end
        np.add.at(depth, starts, 1)
        np.add.at(depth, starts + n, -1)
        covered = np.cumsum(depth[:L]) > 0
        return int(self.norm_lengths[covered].sum()) / total


def fails(rule: str, s: DocStats, data: DataConfig) -> bool:
    """Whether document `s` fails the per-document `rule` under `data`'s settings."""
    if rule == "too_short":
        return len(s.text.strip()) < data.min_chars
    if rule == "repeated_lines":
        return repeated_line_ratio(s.text) > data.max_repeated_line_ratio
    if rule == "word_count":
        n = len(s.words)
        return n < data.min_words or (data.max_words > 0 and n > data.max_words)
    if rule == "mean_word_length":
        m = s.mean_word_length()
        return m < data.min_mean_word_length or (data.max_mean_word_length > 0 and m > data.max_mean_word_length)
    if rule == "symbol_ratio":
        return s.symbol_ratio() > data.max_symbol_word_ratio
    if rule == "bullet_lines":
        return s.line_ratio(lambda line: line.startswith(BULLETS)) > data.max_bullet_line_ratio
    if rule == "ellipsis_lines":
        return s.line_ratio(lambda line: line.endswith(ELLIPSES)) > data.max_ellipsis_line_ratio
    if rule == "alpha_words":
        return s.alpha_word_fraction() < data.min_alpha_word_fraction
    if rule == "stop_words":
        return s.stop_words() < data.min_stop_words
    if rule == "script":
        return s.script_fraction(data.script) < data.min_script_fraction
    if rule == "top_ngram":
        return any(s.top_ngram_fraction(n) > data.max_top_ngram_fraction * k for n, k in TOP_NGRAM_SCALE.items())
    if rule == "dup_ngram":
        return any(s.dup_ngram_fraction(n) > data.max_dup_ngram_fraction * k for n, k in DUP_NGRAM_SCALE.items())
    raise ValueError(f"not a per-document rule: {rule}")


def document_rule(text: str, data: DataConfig, rules: tuple[str, ...], norm: str | None = None) -> str | None:
    """The first of the per-document `rules` (in RULES order) that drops `text`, or None to keep it
    (`norm`: `normalize(text)` when the caller has it)."""
    s = DocStats(text, norm)
    return next((r for r in rules if r in DOCUMENT_RULES and fails(r, s, data)), None)


def failing_rules(text: str, data: DataConfig, rules: tuple[str, ...] = DOCUMENT_RULES) -> list[str]:
    """Every per-document rule of `rules` that `text` fails (measurements: each rule on its own)."""
    s = DocStats(text)
    return [r for r in rules if r in DOCUMENT_RULES and fails(r, s, data)]
