"""The lm-evaluation-harness adapter, checked three ways: `scratchlm eval`'s numbers (score_documents / overall,
score_choices), lm-eval through our adapter (ScratchLM), and lm-eval's own HF model (`--model hf`) on the
checkpoint's HF export, on one tiny random GPT with a tiny BPE tokenizer trained on KJV text.

Tolerances: the three compute the same fp32 log-softmax in different batch shapes (ours and the adapter share
`score_tails` but not their batches; HF runs its own GPT-2 code), so each token's log-probability may differ by
the fp32 logits tolerance of tests/helpers.py (LOGITS_ATOL 1e-4 at most; measured here, HF against ours: 4e-6
on an option's sum, 2e-5 on a 1,400-token document, 4e-9 in bits per byte). Bits per byte is
a per-byte average of those per-token differences, so an absolute 1e-4 bound holds whatever the corpus size;
each option's log-likelihood sums a few tokens, held to 1e-4 absolute as well. Accuracies compare exactly:
every argmax they take is asserted to win by a margin (1e-2) far above those differences.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys

import pytest
import torch
from torch.nn import functional as F

from scratchlm.checkpoint import save_checkpoint
from scratchlm.config import Config, GPTConfig, TokenizerConfig
from scratchlm.convert import export_hf
from scratchlm.data.prepare import prepare
from scratchlm.data.sources import kjv_chapters
from scratchlm.errors import UserError
from scratchlm.eval.choice import ChoiceItem, read_choice_items, score_choices
from scratchlm.eval.cloze import build_cloze, ngram_set
from scratchlm.eval.loglik import rolling_rows
from scratchlm.eval.perplexity import overall, score_documents
from scratchlm.eval.suite import heldout_texts, run_eval
from scratchlm.model import build_model, padded_vocab
from scratchlm.tokenizer import train_bpe
from tests.helpers import make_cfg, randomize, write_corpus

lm_eval = pytest.importorskip("lm_eval")  # a dev dependency: CI fails rather than skips without it

from lm_eval import simple_evaluate  # noqa: E402
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.api.registry import get_model  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window  # noqa: E402

from scratchlm.eval import lm_eval as adapter  # noqa: E402

L = 32  # the tiny model's context
ABS = 1e-4  # see the module docstring
MARGIN = 1e-2


def _cut_to_tokens(tok, text: str, n: int) -> str:
    """The shortest prefix of text that encodes to exactly n tokens."""
    for k in range(1, len(text) + 1):
        if len(tok.encode_ordinary(text[:k])) == n:
            return text[:k]
    raise AssertionError(f"no prefix of {n} tokens")


# Items whose options differ in length (acc_norm divides by characters), with the encodings' edge cases: a
# trailing space and a trailing newline in the context (lm-eval moves them into the continuation), an empty
# context (the end-of-text prefix), and a context longer than the model's 32 tokens (left-truncated).
ITEMS = [
    ChoiceItem("In the beginning God created the heaven and the", ["earth", "waters that were under the firmament",
                                                                   "light"], 0),
    ChoiceItem("And God said, Let there be ", ["light", "a firmament in the midst of the waters", "fish"], 0),
    ChoiceItem("The LORD is my shepherd;\n", ["I shall not want.", "Amen.", "and the evening and the morning"], 0),
    ChoiceItem("", ["Jesus wept.", "And the LORD spake unto Moses, saying,", "Selah."], 1),
    ChoiceItem(" ".join(["And the earth was without form, and void; and darkness was upon the face of the deep."] * 3),
               ["And the Spirit of God moved upon the face of the waters.", "Amen.", "And it was so."], 0),
    ChoiceItem("And God saw the light, that it was", ["good", "very evil in the sight of the LORD", "so"], 0),
    ChoiceItem("Blessed is the man that walketh not in the counsel of the", ["ungodly", "wicked, nor standeth", "sea"],
               0),
    ChoiceItem("For God so loved the world, that he gave his only begotten", ["Son", "people", "bread of heaven unto"],
               0),
]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny GPT saved as a run, its HF export, KJV documents and the items, and the lm-eval task folder."""
    root = tmp_path_factory.mktemp("lm_eval")
    chapters = kjv_chapters()
    tok = train_bpe(chapters[:3], 400, "gpt4", ["<|endoftext|>"], progress=False)
    cfg = Config(name="t", out_dir=str(root / "run"))
    cfg.tokenizer = TokenizerConfig(kind=tok.kind, vocab_size=tok.vocab_size, special_tokens=list(tok.special_tokens))
    cfg.model = GPTConfig(block_size=L, n_layer=2, n_head=2, n_embd=32)
    cfg.model.vocab_size = padded_vocab(cfg.model, tok.vocab_size)
    assert cfg.model.vocab_size > tok.vocab_size  # the padded vocabulary is part of what is checked
    torch.manual_seed(0)
    model = randomize(build_model(cfg.model), seed=0, std=0.1)
    save_checkpoint(root / "run", 0, model, torch.optim.AdamW(model.parameters()), cfg, tok, {"best_val_loss": None})
    hf = export_hf(root / "run", root / "hf")

    # documents: a verse shorter than the context, exactly L and 2L + 1 tokens, and chapters of 17-44 windows
    short = sorted(chapters[3:], key=len)
    docs = ["Jesus wept.", _cut_to_tokens(tok, chapters[1], L), _cut_to_tokens(tok, chapters[2], 2 * L + 1),
            short[60], short[200], short[400]]
    n_tokens = [len(tok.encode_ordinary(d)) for d in docs]
    assert n_tokens[:3] == [n_tokens[0], L, 2 * L + 1] and n_tokens[0] < L and min(n_tokens[3:]) > 5 * L
    choice_file = root / "items.jsonl"
    choice_file.write_text("".join(json.dumps({"context": it.context, "choices": it.choices, "label": it.label}) + "\n"
                                   for it in ITEMS))
    names = adapter.write_task_folder(root / "tasks", texts=[str(write_corpus(root / "docs", docs))],
                                      choice_files=[str(choice_file)])
    assert names == ["scratchlm_text_docs", "scratchlm_choice_items"]
    return {"root": root, "model": model.eval(), "tok": tok, "hf": hf, "docs": docs, "items": ITEMS,
            "tasks": TaskManager(include_path=str(root / "tasks"), include_defaults=False), "names": names}


def _evaluate(lm, setup) -> dict:
    return simple_evaluate(model=lm, tasks=setup["names"], task_manager=setup["tasks"], log_samples=True,
                           bootstrap_iters=0, verbosity="ERROR")


@pytest.fixture(scope="module")
def three_ways(setup):
    """(ours, lm-eval + ScratchLM, lm-eval + HFLM on the export): per document log-likelihoods and bits per byte,
    per item option log-likelihoods, acc and acc_norm."""
    model, tok = setup["model"], setup["tok"]
    scores = score_documents(model, tok, [(str(i), d) for i, d in enumerate(setup["docs"])])
    choices = score_choices(model, tok, read_choice_items(setup["root"] / "items.jsonl"))
    ours = {"doc_ll": [-s.nll for s in scores], "bpb": overall(scores)["bits_per_byte"],
            "option_ll": [r["loglik"] for r in choices], "acc": [r["acc"] for r in choices],
            "acc_norm": [r["acc_norm"] for r in choices]}
    hf = HFLM(pretrained=str(setup["hf"]), dtype="float32", device="cpu", batch_size=8)
    # what lm-eval's HF model reads from the export: the context, the prefix id and the tokenizer
    assert (hf.max_length, hf.prefix_token_id, hf.eot_token_id) == (L, tok.eot_id, tok.eot_id)
    assert all(hf.tok_encode(d) == tok.encode_ordinary(d) for d in setup["docs"])
    out = {"ours": ours}
    for name, lm in [("adapter", adapter.ScratchLM(model=model, tokenizer=tok, device="cpu")), ("hf", hf)]:
        res = _evaluate(lm, setup)
        rolling, mc = (sorted(res["samples"][t], key=lambda s: s["doc_id"]) for t in setup["names"])
        out[name] = {"doc_ll": [s["filtered_resps"][0] for s in rolling],
                     "bpb": res["results"][setup["names"][0]]["bits_per_byte,none"],
                     "option_ll": [[ll for ll, _ in s["filtered_resps"]] for s in mc],
                     "acc": [s["acc"] for s in mc], "acc_norm": [s["acc_norm"] for s in mc],
                     "mean": (res["results"][setup["names"][1]]["acc,none"],
                              res["results"][setup["names"][1]]["acc_norm,none"])}
    return out


def _max_abs(a: list, b: list) -> float:
    flat = lambda x: [v for row in x for v in (row if isinstance(row, list) else [row])]  # noqa: E731
    return max(abs(x - y) for x, y in zip(flat(a), flat(b), strict=True))


@pytest.mark.slow
def test_bits_per_byte_agrees_three_ways(three_ways, setup):
    ours, ad, hf = three_ways["ours"], three_ways["adapter"], three_ways["hf"]
    assert 4 < ours["bpb"] < 12  # a random model over 448 ids: a real number, not 0 or inf
    assert abs(ad["bpb"] - ours["bpb"]) < ABS and abs(hf["bpb"] - ours["bpb"]) < ABS
    # per document: each token scored once in both, so the sums agree to the per-token budget
    for other in (ad, hf):
        for i, (x, y) in enumerate(zip(other["doc_ll"], ours["doc_ll"], strict=True)):
            assert abs(x - y) < ABS * len(setup["tok"].encode_ordinary(setup["docs"][i])), (i, x, y)
    # lm-eval's aggregate is ours: sum NLL / (ln 2 * sum bytes)
    n_bytes = sum(len(d.encode("utf-8")) for d in setup["docs"])
    assert ad["bpb"] == pytest.approx(-sum(ad["doc_ll"]) / math.log(2) / n_bytes, rel=1e-12)


@pytest.mark.slow
def test_multiple_choice_agrees_three_ways(three_ways):
    ours, ad, hf = three_ways["ours"], three_ways["adapter"], three_ways["hf"]
    assert _max_abs(ad["option_ll"], ours["option_ll"]) < ABS
    assert _max_abs(hf["option_ll"], ours["option_ll"]) < ABS
    for lls, item in zip(ours["option_ll"], ITEMS, strict=True):  # every pick is clear, so the three must agree
        for scores in (lls, [ll / len(c) for ll, c in zip(lls, item.choices)]):
            top = sorted(scores, reverse=True)
            assert top[0] - top[1] > MARGIN, f"a near tie on {item.context[:30]!r}: change the item"
    assert ad["acc"] == hf["acc"] == ours["acc"]
    assert ad["acc_norm"] == hf["acc_norm"] == ours["acc_norm"]
    assert ours["acc"] != ours["acc_norm"]  # the items tell the two metrics apart
    n = len(ITEMS)
    assert ad["mean"] == hf["mean"] == (sum(ours["acc"]) / n, sum(ours["acc_norm"]) / n)


@pytest.mark.parametrize("n, max_len", [(1, 16), (5, 16), (16, 16), (17, 16), (32, 16), (33, 16), (49, 16), (50, 16),
                                        (4, 1), (7, 3)])
def test_our_rolling_rows_are_lm_evals_windows(n, max_len):
    tokens, prefix = list(range(100, 100 + n)), 7
    theirs = []
    for context, continuation in map(make_disjoint_window, get_rolling_token_windows(
            token_list=tokens, prefix_token=prefix, max_seq_len=max_len, context_len=1)):
        # what lm-eval's causal model runs: (context + continuation)[-(L+1):][:-1], scoring the continuation
        theirs.append(((context + continuation)[-(max_len + 1):][:-1], continuation))
    assert rolling_rows(tokens, prefix, max_len) == theirs


def _instance(kind: str, args: tuple) -> Instance:
    return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def _reference(model, seq: list[int], first: int, start: int) -> tuple[float, bool]:
    """(sum of log p(seq[j] | seq[start:j]) for j >= first, every seq[j] the argmax): one forward per token."""
    total, greedy = 0.0, True
    for j in range(first, len(seq)):
        logits, _ = model(torch.tensor([seq[start:j]]))
        logp = F.log_softmax(logits[0, -1], -1)
        total += logp[seq[j]].item()
        greedy &= int(logp.argmax()) == seq[j]
    return total, greedy


def _reference_pair(model, ctx: list[int], cont: list[int]) -> tuple[float, bool]:
    """lm-eval's loglikelihood: one window, the last L ids before the continuation's last token."""
    seq = ctx + cont
    return _reference(model, seq, len(ctx), max(0, len(seq) - 1 - L))


def _reference_rolling(model, prefix: int, ids: list[int]) -> float:
    """lm-eval's loglikelihood_rolling, from its docstring: windows end at L, 2L, ... and the document's end; each
    sees the L positions before its end (the prefix first) and scores the tokens no earlier window scored."""
    seq, total, done = [prefix] + ids, 0.0, 0
    for end in [*range(L, len(ids), L), len(ids)]:
        # tokens done..end-1 sit at seq[done + 1 .. end]; each is predicted from seq[end - L : its position]
        total += _reference(model, seq[: end + 1], done + 1, max(0, end - L))[0]
        done = end
    return total


def test_adapter_loglikelihood_equals_a_token_by_token_reference(setup):
    model64, tok = setup["model"].double(), setup["tok"]  # float64: only the order of operations differs
    try:
        lm = adapter.ScratchLM(model=model64, tokenizer=tok, device="cpu")
        enc, eot = tok.encode_ordinary, tok.eot_id
        long_context = " ".join(["And the earth was without form, and void."] * 8)  # > L tokens: left-truncated
        cases = [  # (context, continuation) -> (context ids, continuation ids), by lm-eval's rules
            (("In the beginning", " God created"), enc("In the beginning"), enc(" God created")),
            # trailing whitespace of the context moves to the continuation
            (("The LORD is my shepherd ", "I shall"), enc("The LORD is my shepherd"), enc(" I shall")),
            (("", "Jesus wept."), [eot], enc("Jesus wept.")),  # an empty context is end-of-text
            ((long_context, " Amen."), enc(long_context), enc(" Amen.")),
        ]
        for (context, continuation), ctx, cont in cases:  # each split falls between pre-tokens, so it is these ids
            assert enc(context + continuation) == (ctx if context else []) + cont
        got = lm.loglikelihood([_instance("loglikelihood", a) for a, _, _ in cases], disable_tqdm=True)
        for (args, ctx, cont), (ll, greedy) in zip(cases, got, strict=True):
            want_ll, want_greedy = _reference_pair(model64, ctx, cont)
            assert ll == pytest.approx(want_ll, abs=1e-9), args
            assert greedy == want_greedy
        # the model's own greedy continuation (argmax over its whole output, as lm-eval's is_greedy) is flagged
        seq = enc("And God said")
        for _ in range(3):
            logits, _ = model64(torch.tensor([seq]))
            seq.append(int(logits[0, -1].argmax()))
        [(ll, greedy)] = lm._loglikelihood_tokens([(None, seq[:-3], seq[-3:])])
        assert greedy and ll == pytest.approx(_reference_pair(model64, seq[:-3], seq[-3:])[0], abs=1e-9)
        # rolling: every token once, the first after end-of-text, windows of L (a document of 2L + 1 tokens)
        text = setup["docs"][2]
        [total] = lm.loglikelihood_rolling([_instance("loglikelihood_rolling", (text,))], disable_tqdm=True)
        assert total == pytest.approx(_reference_rolling(model64, eot, enc(text)), abs=1e-8)
    finally:
        setup["model"].float()


def test_generate_until_stops_at_the_until_string(setup):
    model, tok = setup["model"], setup["tok"]
    lm = adapter.ScratchLM(model=model, tokenizer=tok, device="cpu")
    prompt = "And God said"
    seq = tok.encode_ordinary(prompt)
    for _ in range(12):  # the reference: plain greedy over the tokenizer's ids (the engine never picks padding)
        logits, _ = model(torch.tensor([seq[-L:]]))
        top = logits[0, -1, : tok.vocab_size].topk(2).values
        assert top[0] - top[1] > MARGIN, "a near tie: change the prompt"
        seq.append(int(logits[0, -1, : tok.vocab_size].argmax()))
    new = seq[len(tok.encode_ordinary(prompt)):]
    assert tok.eot_id not in new
    full = tok.decode(new)
    stop = full[len(full) // 2 : len(full) // 2 + 2]  # two characters from the middle, which may straddle tokens
    assert stop.strip() and full.find(stop) > 0
    reqs = [_instance("generate_until", (prompt, {"until": [stop], "max_gen_toks": 12})),
            _instance("generate_until", (prompt, {"until": ["\u2603"], "max_gen_toks": 12})),  # never met
            _instance("generate_until", (prompt, {"max_gen_toks": 5, "do_sample": False}))]
    cut, whole, five = lm.generate_until(reqs, disable_tqdm=True)
    assert cut == full[: full.find(stop)]
    assert whole == full
    assert five == tok.decode(new[:5])
    with pytest.raises(UserError, match="greedily"):  # lm-eval's scores assume greedy answers
        lm.generate_until([_instance("generate_until", (prompt, {"do_sample": True, "temperature": 0.7}))])


def test_registered_for_lm_eval_beside_its_own_models():
    assert get_model("scratchlm") is adapter.ScratchLM
    # registering before lm-eval's own models were listed would hide them (lm-eval lists them into an empty registry)
    assert get_model("hf").__name__ == "HFLM"


def test_missing_lm_eval_is_one_line_with_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval...` now raises ImportError
    monkeypatch.delitem(sys.modules, "scratchlm.eval.lm_eval")
    with pytest.raises(UserError) as e:
        importlib.import_module("scratchlm.eval.lm_eval")
    message = str(e.value)
    assert 'pip install "lm-eval[hf]==0.4.13"' in message and "\n" not in message
    # the rest of the eval stage imports without it, and `python -m scratchlm.eval.lm_eval` says the same in one line,
    # exit status 2
    code = ("import runpy, sys; sys.modules['lm_eval'] = None; import scratchlm.eval.suite, scratchlm.cli.eval; "
            "runpy.run_module('scratchlm.eval.lm_eval', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "pip install" in proc.stderr, proc.stderr


@pytest.mark.slow
def test_entry_point_writes_tasks_and_runs_lm_eval_like_scratchlm_eval(setup, tmp_path, monkeypatch, capsys):
    """`python -m scratchlm.eval.lm_eval tasks --data` and then `--model scratchlm` (lm-eval's own command line)
    give `scratchlm eval`'s held-out bits per byte and cloze accuracies."""
    root, tok = setup["root"], setup["tok"]
    data = tmp_path / "data"
    prepare([str(write_corpus(tmp_path / "kjv", kjv_chapters()[:8]))], tok, make_cfg(val_fraction=0.25), data,
            progress=False)
    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.delenv(var, raising=False)  # main sets them; monkeypatch puts the old values back
    monkeypatch.setattr(sys, "argv", sys.argv[:])
    tasks = tmp_path / "tasks"
    assert adapter.main(["tasks", "--data", str(data), "--out", str(tasks), "--cloze-items", "12"]) == 0
    assert os.environ["HF_DATASETS_OFFLINE"] == os.environ["HF_HUB_OFFLINE"] == "1"
    val, train = heldout_texts(data)
    assert [json.loads(line)["text"] for line in (tasks / "scratchlm_heldout.jsonl").read_text().splitlines()] == val
    cloze = [json.loads(line) for line in (tasks / "scratchlm_cloze.jsonl").read_text().splitlines()]
    assert cloze == [{"context": it.context, "choices": it.choices, "label": it.label}
                     for it in build_cloze(val, ngram_set(train), 12, seed=0)]
    assert adapter.main(["tasks", "--data", str(data), "--out", str(tasks)]) == 2  # exists: one line, no traceback
    err = capsys.readouterr().err
    assert "already exists" in err and err.count("\n") == 1

    results = tmp_path / "results"
    assert adapter.main(["--model", "scratchlm", "--model_args", f"ckpt={root / 'run'}", "--tasks", adapter.TAG,
                         "--include_path", str(tasks), "--output_path", str(results), "--device", "cpu"]) == 0
    [path] = results.rglob("results_*.json")
    got = json.loads(path.read_text())["results"]
    ours = {(r["task"], r["metric"]): r["value"] for r in run_eval(root / "run", tmp_path / "ev", data=data,
                                                                   cloze_items=12, progress=False,
                                                                   log=lambda *_: None).rows}
    assert abs(got["scratchlm_heldout"]["bits_per_byte,none"] - ours[("heldout", "bits_per_byte")]) < ABS
    assert got["scratchlm_cloze"]["acc,none"] == ours[("cloze", "acc")]
    assert got["scratchlm_cloze"]["acc_norm,none"] == ours[("cloze", "acc_norm")]
    with pytest.raises(UserError, match="no such checkpoint"):  # main prints it in one line, as above
        adapter.ScratchLM(ckpt=str(tmp_path / "nowhere"))
