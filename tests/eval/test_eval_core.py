"""The evaluation stage's own arithmetic: windows that score every token once, log-likelihoods equal to a
token-by-token reference (float64, where the only difference is the order of operations), lm-eval's
acc / acc_norm and pair encoding, and the cloze task's 13-gram separation from the training split."""

from __future__ import annotations

import math
import random
import re

import pytest
import torch
from torch.nn import functional as F

from scratchlm.data.prepare import prepare
from scratchlm.data.sources import kjv_chapters
from scratchlm.errors import UserError
from scratchlm.eval.choice import ChoiceItem, encode_pair, read_choice_items, score_choices
from scratchlm.eval.cloze import build_cloze, ngram_set
from scratchlm.eval.loglik import pair_rows, rolling_rows, rolling_windows, score_tails
from scratchlm.eval.perplexity import overall, score_documents
from scratchlm.eval.suite import heldout_texts
from scratchlm.model import build_model
from tests.helpers import byte_tok, make_cfg, moe_cfg, tiny_model, write_corpus


class ByteTok:
    """Bytes 0..63 folded into the tiny model's 64 ids (id 63 doubles as end-of-text): enough to score text."""
    kind, eot_id, special_tokens = "test", 63, {}

    def encode_ordinary(self, text: str) -> list[int]:
        return [b % 63 for b in text.encode("utf-8")]


@pytest.fixture(scope="module")
def model64():
    return tiny_model(seed=3, std=0.3).double()  # float64: sums that differ only in order agree to ~1e-12


def reference_nll(model, seq: list[int], first: int, context: int) -> float:
    """-log p of seq[j] for j >= first, each from at most `context` tokens before it, one forward per token."""
    total = 0.0
    for j in range(first, len(seq)):
        window = torch.tensor([seq[max(0, j - context) : j]])
        logits, _ = model(window)
        total -= F.log_softmax(logits[0, -1], -1)[seq[j]].item()
    return total


@pytest.mark.parametrize("n, L, stride", [(1, 16, 16), (16, 16, 16), (17, 16, 16), (49, 16, 16), (40, 16, 5),
                                          (40, 16, 1), (7, 16, 3)])
def test_windows_score_each_token_once_with_enough_context(n, L, stride):
    windows = rolling_windows(n, L, stride)
    scored = [j for _, end, first in windows for j in range(first, end)]
    assert scored == list(range(n))
    for start, end, first in windows:
        assert end - start <= L
        # every scored token sees all before it (up to the window), and at least L - stride tokens after the first
        assert start == max(0, end - L)
        if first:
            assert first - start >= L - stride


@pytest.mark.parametrize("stride", [None, 5, 1])
def test_rolling_nll_equals_token_by_token_reference(model64, stride):
    rng = random.Random(0)
    tokens = [rng.randrange(63) for _ in range(41)]  # 41 > 2 x the context of 16: three or more windows
    L = model64.config.block_size
    got = -sum(lp for lp, _ in score_tails(model64, rolling_rows(tokens, 63, L, stride)))
    # window ends at L, L+s, ...: token j's context is the tokens since its window's start
    want, seq = 0.0, [63] + tokens
    for start, end, first in rolling_windows(len(tokens), L, stride):
        for j in range(first, end):
            logits, _ = model64(torch.tensor([seq[start : j + 1]]))
            want -= F.log_softmax(logits[0, -1], -1)[tokens[j]].item()
    assert got == pytest.approx(want, rel=1e-12)
    if stride == 1:  # a sliding window of full context: the plain reference
        assert got == pytest.approx(reference_nll(model64, seq, 1, L), rel=1e-12)


def test_batching_does_not_change_scores(model64):
    rng = random.Random(1)
    rows = []
    for _ in range(9):
        inp = [rng.randrange(63) for _ in range(rng.randint(2, 16))]
        rows.append((inp, [rng.randrange(63) for _ in range(rng.randint(1, len(inp)))]))
    one_by_one = score_tails(model64, rows, batch_tokens=1)
    together = score_tails(model64, rows, batch_tokens=10_000)
    assert [g for _, g in one_by_one] == [g for _, g in together]
    for (a, _), (b, _) in zip(one_by_one, together):
        assert a == pytest.approx(b, rel=1e-12, abs=1e-12)


def test_pair_rows_truncate_from_the_left():
    rows = pair_rows([(list(range(20)), [30, 31, 32])], max_len=16)
    assert rows == [(list(range(20))[-14:] + [30, 31], [30, 31, 32])]  # 16 inputs: the context
    with pytest.raises(ValueError):
        pair_rows([([], [1])], 16)


def test_documents_bits_per_byte(model64):
    tok = ByteTok()
    docs = [("a", "In the beginning God created the heaven and the earth."), ("b", ""), ("c", "Amen.")]
    scores = score_documents(model64, tok, docs, stride=1)  # stride 1: each token sees the full context before it
    assert [s.name for s in scores] == ["a", "c"]  # an empty document has nothing to score
    for s, (_, text) in zip(scores, [docs[0], docs[2]]):
        seq = [63] + tok.encode_ordinary(text)
        assert s.nll == pytest.approx(reference_nll(model64, seq, 1, 16), rel=1e-12)
        assert s.bytes == len(text.encode()) and s.tokens == len(text.encode())
    o = overall(scores)
    assert o["bits_per_byte"] == pytest.approx((scores[0].nll + scores[1].nll) / math.log(2) / o["bytes"])
    assert o["perplexity"] == pytest.approx(math.exp((scores[0].nll + scores[1].nll) / o["tokens"]))
    with pytest.raises(UserError, match="stride"):
        score_documents(model64, tok, docs, stride=17)


def test_encode_pair_follows_lm_eval():
    tok = byte_tok()
    assert encode_pair(tok, "Q: hi ", "x") == (tok.encode_ordinary("Q: hi"), tok.encode_ordinary(" x"))
    assert encode_pair(tok, "", " yes") == ([256], tok.encode_ordinary(" yes"))


def test_acc_and_acc_norm(model64):
    tok = ByteTok()
    # short enough (context + option <= 17 bytes) that no truncation differs from one forward per option
    items = [ChoiceItem("Go to", ["sow", "reap it", "x"], 0), ChoiceItem("Let be", ["be", "l", "go forth"], 2)]
    out = score_choices(model64, tok, items)
    for item, row in zip(items, out):
        lls = []
        for choice in item.choices:  # one forward over context + " " + choice
            ctx, cont = tok.encode_ordinary(item.context), tok.encode_ordinary(" " + choice)
            lls.append(-reference_nll(model64, ctx + cont, len(ctx), 16))
        assert row["loglik"] == pytest.approx(lls, rel=1e-12)
        best = max(range(len(lls)), key=lambda i: lls[i])
        best_norm = max(range(len(lls)), key=lambda i: lls[i] / len(item.choices[i]))  # characters, no delimiter
        assert (row["pred"], row["pred_norm"]) == (best, best_norm)
        assert row["acc"] == float(best == item.label) and row["acc_norm"] == float(best_norm == item.label)


def test_acc_norm_divides_by_characters_and_ties_go_first(monkeypatch):
    fixed = iter([(-2.0, False), (-4.0, True), (-1.0, False), (-1.0, False)])
    monkeypatch.setattr("scratchlm.eval.choice.score_tails", lambda model, rows, **kw: [next(fixed) for _ in rows])
    model = type("M", (), {"config": type("C", (), {"block_size": 64})})()
    items = [ChoiceItem("Q", ["a", "bbbb"], 1), ChoiceItem("Q", ["c", "d"], 1)]
    first, tie = score_choices(model, byte_tok(), items)
    assert (first["pred"], first["pred_norm"], first["acc"], first["acc_norm"]) == (0, 1, 0.0, 1.0)  # -4/4 > -2/1
    assert (tie["pred"], tie["pred_norm"]) == (0, 0)  # numpy's argmax: the first of equal scores
    assert first["greedy"] == [False, True]


def test_choice_file_errors_name_line_and_field(tmp_path):
    f = tmp_path / "mc.jsonl"
    f.write_text('{"context": "a", "choices": ["x", "y"], "label": 1}\n'
                 '{"context": "b", "choices": ["x"], "label": 0}\n')
    with pytest.raises(UserError, match=r"mc.jsonl:2: field 'choices'"):
        read_choice_items(f)
    f.write_text('{"context": "a", "choices": ["x", "y"], "label": 2}\n')
    with pytest.raises(UserError, match=r"mc.jsonl:1: field 'label'"):
        read_choice_items(f)
    f.write_text('{"context": "a", "choices": ["x", "y"]}\n')
    with pytest.raises(UserError, match=r"mc.jsonl:1: no field 'label'"):
        read_choice_items(f)
    f.write_text('{"context": "a", "choices": ["x", "y"], "label": 1}\n')
    assert read_choice_items(f) == [ChoiceItem("a", ["x", "y"], 1, f"{f}:1")]


@pytest.fixture(scope="module")
def kjv_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("kjv")
    prepare([str(write_corpus(root / "c", kjv_chapters()[:80]))], byte_tok(), make_cfg(val_fraction=0.2),
            root / "data", progress=False)
    return root / "data"


def test_cloze_items_share_no_13_gram_with_training(kjv_data):
    val, train = heldout_texts(kjv_data)
    assert len(val) == 16 and len(train) == 64 and not set(val) & set(train)
    items = build_cloze(val, ngram_set(train), 60, seed=0)
    assert len(items) == 60

    def grams(text):  # an independent count: exact word tuples, no hashing
        w = re.findall(r"[\w']+", text.lower())
        return {tuple(w[i : i + 13]) for i in range(len(w) - 12)}

    train_grams = set().union(*(grams(t) for t in train))
    for it in items:
        assert not any(grams(f"{it.context} {c}") & train_grams for c in it.choices)
        assert len(set(it.choices)) == 4 and 0 <= it.label < 4
        right = f"{it.context} {it.choices[it.label]}"
        assert any(right in v for v in val)  # the right option is the sentence's true ending
    # without the filter, some candidate items do overlap the training text (the check has work to do)
    unfiltered = build_cloze(val, set(), 400, seed=0)
    assert any(any(grams(f"{it.context} {c}") & train_grams for c in it.choices) for it in unfiltered)


def test_capacity_limited_moe_scores_do_not_depend_on_batch_mates():
    torch.manual_seed(0)
    model = build_model(moe_cfg(dropless=False, capacity_factor=1.0, block_size=16, vocab_size=64)).double().eval()
    rng = random.Random(2)
    rows = [([rng.randrange(63) for _ in range(n)], [rng.randrange(63)]) for n in (16, 9, 12, 5, 16, 3)]
    alone = [score_tails(model, [row])[0][0] for row in rows]
    together = [lp for lp, _ in score_tails(model, rows, batch_tokens=10_000)]
    assert together == pytest.approx(alone, rel=1e-12)
