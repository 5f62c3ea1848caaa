"""What a trained reward model is checked with on held-out pairs, and the surface cues it must beat.

- pairwise accuracy: the share of pairs where the chosen response scores above the rejected one
  (a tie counts half), overall, per kind of pair (corrupted, on_policy, file) and per task family;
- the rewards of chosen and rejected responses (their histograms should separate), and reward
  against response length in tokens with the Pearson correlation: a reward model that learned
  "longer is better" shows it there before it shows anywhere else (Singhal et al. 2023);
- a few example pairs with their scores, the first misranked one among them when there is one;
- surface-cue baselines: scorers that see one surface property of a response, its length in
  characters (`length_cue`) or its format (`format_cue`: each word reduced to its shape, a run of
  digits to 9 and of letters to a, other characters kept: "the lord is" -> "a a a", "81." -> "9.").
  Each is fitted on the training pairs, a value scoring (times chosen - times rejected) / times seen
  (`cue_scorer`), the best a scorer of that property alone can learn from those pairs, and scored on
  the same held-out pairs as the reward model. Corrupted pairs keep the form of the right answer, so
  these sit near 50%; a reward model far above them reads more than the surface.

Everything is printed as one markdown table and saved as `rm_summary.json` / `.md` and one PNG
(histograms, the length scatter, accuracy per group beside the baselines).

Left out: calibration (whether σ(r_c - r_r) matches how often the chosen side wins) and
agreement with a second labeller.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from scratchlm.io import atomic_open

Cue = Callable[[str], Any]


@dataclass
class ScoredPair:
    """One held-out pair as the reward model scored it."""

    source: str
    kind: str  # corrupted / on_policy / file
    family: str  # the task family, "all" for pairs from files
    prompt: str  # the last user turn
    chosen: str
    rejected: str
    r_chosen: float
    r_rejected: float
    len_chosen: int  # response tokens, without the closing <|end|>
    len_rejected: int


def credit(s_chosen: float, s_rejected: float) -> float:
    """1 when the chosen side scores higher, 0.5 on a tie, else 0."""
    return 1.0 if s_chosen > s_rejected else 0.5 if s_chosen == s_rejected else 0.0


# -- surface cues ---------------------------------------------------------------------------------


def length_cue(text: str) -> int:
    """The response's length in characters, spacing at the ends aside."""
    return len(text.strip())


def _shape(word: str) -> str:
    out: list[str] = []
    for ch in word:
        kind = "9" if ch.isdigit() else "a" if ch.isalpha() else ch
        if not (out and out[-1] == kind and kind in "9a"):
            out.append(kind)
    return "".join(out)


def format_cue(text: str) -> str:
    """The response's format: each word's shape (digit runs -> 9, letter runs -> a, other characters
    kept), so the count of words, numbers and punctuation shows and their values do not."""
    return " ".join(_shape(w) for w in text.split())


CUES: dict[str, Cue] = {"length": length_cue, "format": format_cue}


def cue_scorer(cue: Cue, pairs: list[tuple[str, str]]) -> Callable[[str], float]:
    """A scorer of responses that sees only `cue(response)`, fitted on (chosen, rejected) pairs: each
    cue value scores (times on the chosen side - times on the rejected side) / times seen in pairs
    where the two sides' values differ; a value never seen scores 0."""
    wins: Counter = Counter()
    seen: Counter = Counter()
    for chosen, rejected in pairs:
        c, r = cue(chosen), cue(rejected)
        if c != r:
            wins[c], wins[r], seen[c], seen[r] = wins[c] + 1, wins[r] - 1, seen[c] + 1, seen[r] + 1
    table = {k: wins[k] / seen[k] for k in seen}
    return lambda text: table.get(cue(text), 0.0)


def cue_credits(cue: Cue, train: list[tuple[str, str]], held_out: list[tuple[str, str]]) -> list[float]:
    """Per held-out pair, the credit (1, 0.5, 0) of the cue's scorer fitted on `train`."""
    score = cue_scorer(cue, train)
    return [credit(score(c), score(r)) for c, r in held_out]


# -- the checks -----------------------------------------------------------------------------------


def pearson(xs: list[float], ys: list[float]) -> float:
    """The Pearson correlation of two equally long lists; NaN when either is constant or shorter than 2."""
    n = len(xs)
    if n < 2:
        return math.nan
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys))
    sxx, syy = sum((x - mx) ** 2 for x in xs), sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else math.nan


def groups(scored: list[ScoredPair]) -> dict[str, list[int]]:
    """Row name -> indices of its pairs: all, then each kind, then each family (when there are families)."""
    out: dict[str, list[int]] = {"all": list(range(len(scored)))}
    for label, key in (("kind", "kind"), ("family", "family")):
        values = sorted({getattr(s, key) for s in scored})
        if key == "family" and values == ["all"]:
            continue
        for v in values:
            out[f"{label} {v}"] = [i for i, s in enumerate(scored) if getattr(s, key) == v]
    return out


def pick_examples(scored: list[ScoredPair], k: int = 5) -> list[ScoredPair]:
    """Up to k pairs: the first of each family (the first pairs when there are no families), then the
    first misranked pair when there is one."""
    firsts: dict[str, ScoredPair] = {}
    for s in scored:
        firsts.setdefault(s.family, s)
    picks = (list(firsts.values()) if len(firsts) > 1 else list(scored))[: k - 1]
    wrong = next((s for s in scored if s.r_chosen <= s.r_rejected), None)
    if wrong is not None and wrong not in picks:
        picks.append(wrong)
    return picks


def summarize(scored: list[ScoredPair], train: list[tuple[str, str]]) -> dict[str, Any]:
    """The checks as JSON-able numbers: accuracy per group beside each cue baseline (fitted on the
    `train` (chosen, rejected) texts), the mean rewards, the length correlation and the examples."""
    held = [(s.chosen, s.rejected) for s in scored]
    rm = [credit(s.r_chosen, s.r_rejected) for s in scored]
    base = {name: cue_credits(cue, train, held) for name, cue in CUES.items()}
    rows = {}
    for name, idx in groups(scored).items():
        n = len(idx)
        rows[name] = {"n": n, "rm": sum(rm[i] for i in idx) / n,
                      **{f"{b}_only": sum(c[i] for i in idx) / n for b, c in base.items()}}
    rewards = [s.r_chosen for s in scored] + [s.r_rejected for s in scored]
    lengths = [s.len_chosen for s in scored] + [s.len_rejected for s in scored]
    return {
        "n_held_out": len(scored), "accuracy": rows,
        "reward_chosen_mean": sum(s.r_chosen for s in scored) / len(scored),
        "reward_rejected_mean": sum(s.r_rejected for s in scored) / len(scored),
        "length_correlation": pearson(lengths, rewards),
        "examples": [asdict(s) for s in pick_examples(scored)],
    }


def _short(text: str, n: int = 48) -> str:
    text = " ".join(text.split()).replace("|", "/")
    return text if len(text) <= n else text[: n - 1] + "…"


def format_checks(summary: dict[str, Any]) -> str:
    """The summary as markdown: the accuracy table, rewards and length correlation, the examples."""
    lines = [f"held-out pairwise accuracy on {summary['n_held_out']} pairs (a tie counts half); the "
             "baselines see only the response's length / format, fitted on the training pairs", "",
             "| pairs | n | reward model | length only | format only |", "|---|---:|---:|---:|---:|"]
    for name, row in summary["accuracy"].items():
        lines.append(f"| {name} | {row['n']} | {row['rm']:.1%} | {row['length_only']:.1%} | "
                     f"{row['format_only']:.1%} |")
    lines += ["", f"mean reward: chosen {summary['reward_chosen_mean']:+.3f}, rejected "
              f"{summary['reward_rejected_mean']:+.3f}; reward vs response length (tokens): Pearson r = "
              f"{summary['length_correlation']:+.3f}", "",
              "| prompt | chosen | r chosen | rejected | r rejected |", "|---|---|---:|---|---:|"]
    for e in summary["examples"]:
        lines.append(f"| {_short(e['prompt'])} | {_short(e['chosen'], 32)} | {e['r_chosen']:+.2f} | "
                     f"{_short(e['rejected'], 32)} | {e['r_rejected']:+.2f} |")
    return "\n".join(lines)


def plot_checks(scored: list[ScoredPair], summary: dict[str, Any], out: Path) -> None:
    """One PNG: reward histograms (chosen, rejected), reward vs response length, accuracy per group
    beside the cue baselines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_h, ax_l, ax_a) = plt.subplots(1, 3, figsize=(16, 4.6))
    chosen, rejected = [s.r_chosen for s in scored], [s.r_rejected for s in scored]
    lo, hi = min(chosen + rejected), max(chosen + rejected)
    bins = [lo + (hi - lo + 1e-9) * i / 40 for i in range(41)]
    ax_h.hist(chosen, bins=bins, alpha=0.6, label="chosen")
    ax_h.hist(rejected, bins=bins, alpha=0.6, label="rejected")
    ax_h.set_xlabel("reward")
    ax_h.set_ylabel("responses")
    ax_h.set_title(f"held-out rewards ({len(scored)} pairs)")
    ax_h.legend()
    ax_l.scatter([s.len_chosen for s in scored], chosen, s=8, alpha=0.5, label="chosen")
    ax_l.scatter([s.len_rejected for s in scored], rejected, s=8, alpha=0.5, label="rejected")
    ax_l.set_xlabel("response length (tokens)")
    ax_l.set_ylabel("reward")
    ax_l.set_title(f"reward vs length: Pearson r = {summary['length_correlation']:+.2f}")
    ax_l.legend()
    names = list(summary["accuracy"])
    width = 0.27
    for j, (key, label) in enumerate((("rm", "reward model"), ("length_only", "length only"),
                                      ("format_only", "format only"))):
        ax_a.bar([i + (j - 1) * width for i in range(len(names))], [summary["accuracy"][n][key] for n in names],
                 width, label=label)
    ax_a.axhline(0.5, color="grey", linestyle="--", linewidth=1)
    ax_a.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax_a.set_ylim(0, 1)
    ax_a.set_ylabel("held-out pairwise accuracy")
    ax_a.set_title("accuracy per group")
    ax_a.legend(fontsize=8)
    fig.tight_layout()
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)
