"""Scoring generated answers against gold answers: exact match, token F1, ROUGE-L.

- exact match: equal after normalisation (lowercase, punctuation and articles removed, spaces
  collapsed; the SQuAD convention);
- token F1: harmonic mean of precision and recall of the normalised tokens' multiset overlap;
- ROUGE-L: F-measure of the longest common subsequence of tokens (Lin 2004), beta = 1.
All three are pure functions on strings; `summarise` averages them per task family.
`paired_bootstrap` puts a confidence interval on the difference of two models' scores on the same items.
"""

from __future__ import annotations

import math
import random
import re
import string
from collections import Counter, defaultdict
from collections.abc import Iterable

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalise(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> float:
    return float(normalise(prediction) == normalise(gold))


def token_f1(prediction: str, gold: str) -> float:
    p, g = normalise(prediction).split(), normalise(gold).split()
    if not p or not g:
        return float(p == g)
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def lcs_length(a: list[str], b: list[str]) -> int:
    """Longest common subsequence by dynamic programming, one row at a time (O(len a * len b))."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, gold: str) -> float:
    p, g = normalise(prediction).split(), normalise(gold).split()
    if not p or not g:
        return float(p == g)
    lcs = lcs_length(p, g)
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(g)
    return 2 * precision * recall / (precision + recall)


def summarise(rows: Iterable[dict]) -> dict[str, dict[str, float]]:
    """rows with keys family, exact, f1, rouge_l (and optional checked) -> per-family means + 'all'."""
    groups: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        groups[r.get("family", "all")].append(r)
        if r.get("family", "all") != "all":
            groups["all"].append(r)
    out = {}
    for fam, rs in sorted(groups.items(), key=lambda kv: (kv[0] == "all", kv[0])):
        keys = [k for k in ("exact", "f1", "rouge_l", "checked") if all(k in r for r in rs)]
        out[fam] = {"n": len(rs), **{k: sum(r[k] for r in rs) / len(rs) for k in keys}}
    return out


def format_summary(named: dict[str, dict[str, dict[str, float]]]) -> str:
    """A markdown table: one row per family, a column group per model (e.g. base vs sft)."""
    models = list(named)
    families = list(next(iter(named.values())))
    metric_keys = [k for k in ("exact", "f1", "rouge_l", "checked") if k in next(iter(named.values()))[families[0]]]
    head = "| family | n | " + " | ".join(f"{m} {k}" for m in models for k in metric_keys) + " |"
    lines = [head, "|" + "---|" * (2 + len(models) * len(metric_keys))]
    for fam in families:
        cells = [f"{named[m][fam][k]:.1%}" if k in ("exact", "checked") else f"{named[m][fam][k]:.3f}"
                 for m in models for k in metric_keys]
        lines.append(f"| {fam} | {named[models[0]][fam]['n']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired_bootstrap(a: list[float], b: list[float], n: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """(mean of a - b, low, high): the percentile 95% interval of the mean difference over n resamples
    of the items with replacement (Efron & Tibshirani 1993). a[i] and b[i] score the same item (one
    prompt answered by two models), so each resample keeps them together: the interval reflects how
    much the difference depends on which items were drawn, not the spread of either score alone."""
    if len(a) != len(b):
        raise ValueError(f"paired scores need the same items: {len(a)} and {len(b)}")
    if not a:
        raise ValueError("no items to compare")
    diffs = [x - y for x, y in zip(a, b)]
    rng, k = random.Random(seed), len(diffs)
    means = sorted(sum(diffs[rng.randrange(k)] for _ in range(k)) / k for _ in range(n))
    return sum(diffs) / k, means[int(0.025 * (n - 1))], means[math.ceil(0.975 * (n - 1))]
