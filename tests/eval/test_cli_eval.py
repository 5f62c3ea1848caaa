"""`scratchlm eval` end to end on tiny runs: what it writes, what it refuses (one line, exit 2)."""

from __future__ import annotations

import json

import pytest

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.cli import main
from scratchlm.data.prepare import prepare
from scratchlm.data.sources import kjv_chapters
from scratchlm.eval.perplexity import overall, score_documents
from scratchlm.eval.suite import heldout_texts
from scratchlm.rl.stage import sft_prompts
from tests.helpers import byte_tok, make_cfg, tiny_llama_base, tiny_sft_run, write_corpus


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    base = tiny_llama_base(root, 64)
    # held-out text with sentences for the cloze task: 12 chapters, 3 of them validation
    prepare([str(write_corpus(root / "kjv", kjv_chapters()[:12]))], byte_tok(), make_cfg(val_fraction=0.25),
            root / "kjv-data", progress=False)
    return root, base, tiny_sft_run(root, base, 2)


def _rows(folder):
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["format"] == "scratchlm.eval"
    return {(r["task"], r["metric"]): r for r in summary["rows"]}


def test_eval_base_writes_held_out_bits_per_byte_and_cloze(runs, tmp_path, capsys):
    root, base, _ = runs
    out = tmp_path / "ev"
    assert main(["eval", str(base), "--data", str(root / "kjv-data"), "--out", str(out), "--quiet",
                 "--cloze-items", "20"]) == 0
    rows = _rows(out)
    val, _ = heldout_texts(root / "kjv-data")
    model, tok, _ = load_model_for_inference(base)
    want = overall(score_documents(model, tok, [(str(i), t) for i, t in enumerate(val)]))["bits_per_byte"]
    assert rows[("heldout", "bits_per_byte")]["value"] == pytest.approx(want, rel=1e-6)
    assert rows[("heldout", "bits_per_byte")]["n"] == len(val)
    assert rows[("cloze", "acc")]["n"] == 20 and rows[("cloze", "acc_norm")]["chance"] == 0.25
    assert not any(task.startswith("tasks:") for task, _ in rows)  # a base model answers no chat tasks
    assert len((out / "documents.jsonl").read_text().splitlines()) == len(val)
    assert (out / "eval.png").stat().st_size > 0
    # a second run refuses to replace it, in one line
    assert main(["eval", str(base), "--data", str(root / "data"), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--overwrite" in err and "Traceback" not in err
    assert main(["eval", str(base), "--data", str(root / "data"), "--out", str(out), "--quiet", "--overwrite"]) == 0


def test_eval_sft_scores_unseen_task_prompts(runs, tmp_path):
    root, _, sft = runs
    out = tmp_path / "ev"
    assert main(["eval", str(sft), "--no-suite", "--out", str(out), "--quiet"]) == 2  # nothing to evaluate
    assert main(["eval", str(sft), "--out", str(out), "--quiet", "--task-prompts", "30"]) == 0
    rows = _rows(out)
    assert rows[("tasks:all", "checked")]["n"] == 30
    answers = [json.loads(line) for line in (out / "answers-tasks.jsonl").read_text().splitlines()]
    assert len(answers) == 30 and not {a["prompt"] for a in answers} & sft_prompts(sft)


def test_eval_user_files_and_bad_input(runs, tmp_path, capsys):
    root, base, sft = runs
    mc = tmp_path / "mc.jsonl"
    mc.write_text('{"context": "the lord said unto", "choices": ["moses", "stony places"], "label": 0}\n'
                  '{"context": "a sower went out to", "choices": ["sow", "earth"], "label": 0}\n')
    text = tmp_path / "t.txt"
    text.write_text("behold a sower went forth to sow " * 20)
    gen = tmp_path / "g.jsonl"
    gen.write_text('{"prompt": "Say yes.", "answer": "yes"}\n')
    out = tmp_path / "ev"
    assert main(["eval", str(sft), "--no-suite", "--choice", str(mc), "--text", str(text), "--gen", str(gen),
                 "--out", str(out), "--quiet"]) == 0
    rows = _rows(out)
    assert rows[("mc", "acc")]["n"] == 2 and rows[("t.txt", "bits_per_byte")]["n"] == 1
    assert rows[("g", "exact")]["n"] == 1
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"context": "x", "choices": ["a"], "label": 0}\n')
    for argv, message in [
        (["eval", str(base), "--no-suite", "--choice", str(bad)], "bad.jsonl:1: field 'choices'"),
        (["eval", str(base), "--no-suite", "--gen", str(gen)], "generation tasks need a chat model"),
        (["eval", str(base), "--no-suite", "--text", str(text), "--stride", "0"], "--stride 0"),
        (["eval", str(base), "--data", str(root / "kjv")], "not a prepared data folder"),
    ]:
        assert main(argv + ["--out", str(tmp_path / "o2"), "--quiet"]) == 2, argv
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
