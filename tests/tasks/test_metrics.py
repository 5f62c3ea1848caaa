"""Gold-answer metrics on hand-worked examples."""

from __future__ import annotations

import pytest

from scratchlm.tasks.metrics import (
    exact_match,
    format_summary,
    lcs_length,
    normalise,
    paired_bootstrap,
    rouge_l,
    summarise,
    token_f1,
)


def test_normalise_and_exact_match():
    assert normalise("The  Cat, sat!") == "cat sat"
    assert exact_match("the cat sat.", "Cat sat") == 1.0
    assert exact_match("a dog", "cat") == 0.0


def test_token_f1_by_hand():
    # prediction: cat sat on mat (4), gold: cat sat (2): overlap 2 -> P = .5, R = 1, F1 = 2/3
    assert token_f1("the cat sat on the mat", "the cat sat") == pytest.approx(2 / 3)
    assert token_f1("", "") == 1.0 and token_f1("x", "") == 0.0 and token_f1("x y", "z") == 0.0


def test_rouge_l_by_hand():
    assert lcs_length("a b c d".split(), "a c d e".split()) == 3
    # prediction: police killed gunman (3), gold: police kill gunman (3): LCS 2 -> P = R = 2/3
    assert rouge_l("police killed the gunman", "the police kill the gunman") == pytest.approx(2 / 3)
    assert rouge_l("one two", "one two") == 1.0


def test_summary_per_family():
    rows = [{"family": "add", "exact": 1.0, "f1": 1.0, "rouge_l": 1.0},
            {"family": "add", "exact": 0.0, "f1": 0.5, "rouge_l": 0.5},
            {"family": "repeat", "exact": 1.0, "f1": 1.0, "rouge_l": 1.0}]
    s = summarise(rows)
    assert s["add"] == {"n": 2, "exact": 0.5, "f1": 0.75, "rouge_l": 0.75}
    assert s["all"]["n"] == 3 and s["all"]["exact"] == pytest.approx(2 / 3)
    table = format_summary({"base": s, "sft": s})
    assert "| add | 2 | 50.0% | 0.750 | 0.750 | 50.0% |" in table


def test_paired_bootstrap():
    assert paired_bootstrap([1.0, 0.0, 1.0], [1.0, 0.0, 1.0]) == (0.0, 0.0, 0.0)
    assert paired_bootstrap([1.0] * 5, [0.0] * 5) == (1.0, 1.0, 1.0)  # every resample differs by 1
    # 60 of 100 items won, 10 lost, 30 tied: the mean difference is 0.5, its standard error
    # sqrt((0.7 - 0.25) / 100) = 0.067, so the interval is about 0.5 +- 0.13
    a, b = [1.0] * 60 + [0.0] * 10 + [1.0] * 30, [0.0] * 60 + [1.0] * 10 + [1.0] * 30
    mean, lo, hi = paired_bootstrap(a, b, n=2000, seed=1)
    assert mean == pytest.approx(0.5) and 0.34 < lo < 0.40 and 0.60 < hi < 0.66
    assert paired_bootstrap(a, b, n=2000, seed=1) == (mean, lo, hi)  # seeded
    assert paired_bootstrap(b, a, n=2000, seed=1) == pytest.approx((-mean, -hi, -lo))  # the mirror image
    with pytest.raises(ValueError, match="same items"):
        paired_bootstrap([1.0], [1.0, 0.0])
