"""The document filters of `scratchlm data prepare`: which documents are dropped, and why.

In order, each document counted by the first that drops it:
- `duplicate`: the exact text was seen before (a 16-byte blake2b hash, `text_hash`), when `data.dedup`;
- `too_short`: fewer than `data.min_chars` characters once surrounding whitespace is stripped;
- `repeated_lines`: the fraction of non-empty lines (compared stripped) that repeat an earlier line
  of the same document is above `data.max_repeated_line_ratio` (boilerplate, navigation menus, spam).

Left out: near-duplicate detection (MinHash), language identification, model-based quality scores.
"""

from __future__ import annotations

import hashlib

from scratchlm.config import DataConfig

FILTERS = ("duplicate", "too_short", "repeated_lines")


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8", errors="surrogatepass"), digest_size=16).digest()


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


def filter_reason(text: str, h: bytes, seen: set[bytes], data: DataConfig) -> str | None:
    """The first filter that drops this document, or None to keep it (adds kept hashes to `seen`)."""
    if data.dedup:
        if h in seen:
            return "duplicate"
        seen.add(h)
    if len(text.strip()) < data.min_chars:
        return "too_short"
    if repeated_line_ratio(text) > data.max_repeated_line_ratio:
        return "repeated_lines"
    return None
