"""The `scratchlm` command end to end: each verb works, and user errors are one line, exit 2."""

from __future__ import annotations

import errno
import json
import os
import signal

import pytest

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.cli import main
from scratchlm.rundir import RUN_ARTEFACTS, claim_run_dir
from scratchlm.tokenizer.base import Tokenizer
from scratchlm.train import loop as pretrain_mod


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    words = ["the", "cat", "sat", "on", "mat", "dog", "log", "zebra", "quickly", "jumped", "over", "lazy", "fox"]
    lines = [" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + f" {i}." for i in range(400)]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_tokenizer_train_encode_decode_export(capsys, tmp_path, corpus):
    tok = tmp_path / "tok.json"
    code, out, _ = run(capsys, "tokenizer", "train", str(corpus), "--out", str(tok), "--quiet",
                       "--tokenizer.vocab_size=300")
    assert code == 0 and "vocab 300" in out and tok.exists()
    saved = json.loads((tmp_path / "tok.config.json").read_text())
    assert saved["tokenizer"]["vocab_size"] == 300  # the resolved config sits beside the artifact
    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", str(tok), "the cat sat")
    ids = out.split()
    assert code == 0 and len(ids) < len("the cat sat")
    code, out, _ = run(capsys, "tokenizer", "decode", "--tokenizer", str(tok), *ids)
    assert code == 0 and out == "the cat sat\n"
    code, out, _ = run(capsys, "tokenizer", "export", "--tokenizer", str(tok), "--out", str(tmp_path / "hf"))
    assert code == 0 and (tmp_path / "hf" / "tokenizer.json").exists()
    code, out, _ = run(capsys, "tokenizer", "export", "--tokenizer", str(tok), "--format", "tiktoken",
                       "--out", str(tmp_path / "t.tiktoken"))
    assert code == 0 and len((tmp_path / "t.tiktoken").read_text().splitlines()) == 300 - 6


def _one_line_error(code: int, err: str, *needles: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratchlm: error:"), err
    for n in needles:
        assert n in lines[0], lines[0]


def test_user_errors_are_one_line(capsys, tmp_path, corpus):
    code, _, err = run(capsys, "tokenizer", "train", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "t"))
    _one_line_error(code, err, "missing.txt", "no such file")
    code, _, err = run(capsys, "tokenizer", "train", str(corpus), "--tokenizer.vocab_size=10", "--quiet",
                       "--out", str(tmp_path / "t"))
    _one_line_error(code, err, "vocab_size=10", "--tokenizer.vocab_size=262")
    code, _, err = run(capsys, "tokenizer", "train", str(corpus), "--tokenizer.vocab_sise=300")
    _one_line_error(code, err, "did you mean vocab_size")
    bad = tmp_path / "bad.json"
    bad.write_text('{"format": "scratchlm.tokenizer", "version": 1, "kind": "bpe", "tokens": []}')
    code, _, err = run(capsys, "tokenizer", "encode", "--tokenizer", str(bad), "x")
    _one_line_error(code, err, "bad.json", "corrupt bpe tokenizer file")
    tok = tmp_path / "tok.json"
    run(capsys, "tokenizer", "train", str(corpus), "--out", str(tok), "--quiet", "--tokenizer.vocab_size=300")
    code, _, err = run(capsys, "tokenizer", "encode", "--tokenizer", str(tok), "a <|endoftext|>")
    _one_line_error(code, err, "--specials allow")
    code, out, _ = run(capsys, "tokenizer", "encode", "--tokenizer", str(tok), "--specials", "allow", "<|endoftext|>")
    assert code == 0 and out.split() == ["294"]  # 300 - 6 specials
    code, _, err = run(capsys, "tokenizer", "decode", "--tokenizer", str(tok), "99999")
    _one_line_error(code, err, "outside this tokenizer's vocabulary")


def test_compare_prints_every_kind(capsys, tmp_path, corpus):
    code, out, _ = run(capsys, "tokenizer", "compare", str(corpus), "--kinds", "byte,char,bpe", "--quiet",
                       "--tokenizer.vocab_size=300", "--plot", str(tmp_path / "c.png"))
    assert code == 0 and (tmp_path / "c.png").stat().st_size > 1000
    rows = {line.split()[0]: line.split() for line in out.splitlines()[2:5]}
    assert set(rows) == {"byte", "char", "bpe"}
    assert float(rows["bpe"][2]) > float(rows["byte"][2]) == 1.0  # BPE packs more bytes per token


@pytest.mark.slow
def test_demo_quick(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a user runs it: not from the repository (stage 14's torchrun must find the module)
    code, out, _ = run(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"))
    assert code == 0, out
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## Tokenizers" in report and "## Pretraining data" in report
    assert "## Reward model" in report and "## Direct preference optimisation" in report
    assert (tmp_path / "demo" / "rm" / "rm_checks.png").exists() and (tmp_path / "demo" / "dpo" / "dpo.png").exists()
    assert (tmp_path / "demo" / "data" / "manifest.json").exists()
    assert (tmp_path / "demo" / "tokenizers.png").exists()
    assert "## Online RL: GRPO" in report and "## Online RL: PPO" in report
    assert (tmp_path / "demo" / "grpo" / "rl.png").exists() and (tmp_path / "demo" / "ppo" / "rl.png").exists()
    table = report.split("## Every stage on the same held-out prompts", 1)[1]
    assert all(f"| {stage} |" in table for stage in ("SFT", "DPO", "GRPO", "PPO")) and "KL to SFT" in table
    evaluation = report.split("## Evaluation", 1)[1]
    assert "| heldout | bits_per_byte |" in evaluation and "| cloze | acc_norm |" in evaluation
    assert "| tasks:all | checked | - |" in evaluation  # the base model answers no chat tasks; the SFT model does
    for name in ("pretrain", "sft"):
        assert (tmp_path / "demo" / "evaluation" / name / "summary.json").exists()
    faster = report.split("## Faster inference", 1)[1]
    assert "| int8 |" in faster and "| gptq |" in faster and "identical text" in faster
    assert "8 concurrent streaming chat requests" in report.split("## Serving", 1)[1]
    card = (tmp_path / "demo" / "report.html").read_text()
    assert "evaluation/pretrain" in card and "evaluation/sft" in card and "bits_per_byte" in card


# ----------------------------------------------------------------------------------------------
# pretraining from the command line: every tokenizer kind, and never losing an earlier run

TINY_RUN = ["--quiet", "--preset", "tiny", "--tokenizer.vocab_size=300", "--model.n_layer=1", "--model.n_head=2",
            "--model.n_embd=32", "--model.block_size=16", "--train.batch_size=4", "--train.max_steps=2",
            "--train.warmup_steps=1", "--train.eval_interval=2", "--train.eval_iters=1", "--train.log_interval=1",
            "--train.tensorboard=false", "--train.precision=fp32", "--data.workers=1"]


def records(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def ckpt_steps(run) -> list[str]:
    return sorted(p.name for p in (run / "ckpt").glob("step_*"))


@pytest.fixture
def other_corpus(tmp_path):
    path = tmp_path / "other.txt"
    path.write_text("\n".join(f"a different text, line {i}: zebras graze on the plain" for i in range(300)) + "\n")
    return path


@pytest.mark.parametrize("kind", ["byte", "char", "bpe", "wordpiece", "unigram"])
def test_every_tokenizer_kind_pretrains(capsys, tmp_path, corpus, kind):
    run_dir = tmp_path / kind
    code, _, err = run(capsys, "pretrain", str(corpus), "--out", str(run_dir), *TINY_RUN, f"--tokenizer.kind={kind}")
    assert code == 0, err  # WordPiece died here: its specials come first, so vocab[i] was not token i
    val = [r for r in records(run_dir) if "val_bpb" in r]
    assert len(val) == 1 and 0.5 < val[0]["val_bpb"] < 20  # bytes per token were counted for every id
    assert {p.name for p in run_dir.iterdir()} <= set(RUN_ARTEFACTS)  # all of it is what --overwrite clears


def test_a_fresh_run_never_replaces_an_earlier_one(capsys, tmp_path, corpus, other_corpus):
    run_dir = tmp_path / "a"
    code, _, err = run(capsys, "pretrain", str(corpus), "--out", str(run_dir), *TINY_RUN, "--train.max_steps=4",
                       "--train.ckpt_interval=2")
    assert code == 0, err
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()}
    # The old code reused runs/a/data (ignoring other.txt), then pruned the old run's step 4 or its own step 2.
    code, _, err = run(capsys, "pretrain", str(other_corpus), "--out", str(run_dir), *TINY_RUN)
    _one_line_error(code, err, str(run_dir), "already holds a run", "--resume", "--overwrite")
    assert {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*") if p.is_file()} == before

    code, _, err = run(capsys, "pretrain", str(other_corpus), "--out", str(run_dir), *TINY_RUN, "--overwrite")
    assert code == 0, err
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert manifest["inputs"] == [str(other_corpus)]  # the new corpus, not the old run's data
    assert ckpt_steps(run_dir) == ["step_0000002"] and (run_dir / "ckpt" / "latest").read_text() == "step_0000002\n"
    assert [r["step"] for r in records(run_dir) if "loss" in r] == [1, 2]  # no metrics of the old run
    load_model_for_inference(run_dir)  # `latest` and `best` are this run's


def test_resume_keeps_its_data_and_refuses_other_inputs_or_settings(capsys, tmp_path, corpus, other_corpus):
    run_dir = tmp_path / "a"
    assert run(capsys, "pretrain", str(corpus), "--out", str(run_dir), *TINY_RUN)[0] == 0
    code, _, err = run(capsys, "pretrain", str(other_corpus), "--out", str(run_dir), "--resume", "--quiet",
                       "--train.max_steps=4")
    _one_line_error(code, err, "prepared from other inputs", str(corpus), str(other_corpus))
    code, _, err = run(capsys, "pretrain", "--out", str(run_dir), "--resume", "--quiet", "--train.max_steps=4",
                       "--tokenizer.vocab_size=400")
    _one_line_error(code, err, "prepared with tokenizer.vocab_size=300", "400")
    with (run_dir / "metrics.jsonl").open("a") as f:  # what a run killed after its checkpoint logged
        f.write('{"step": 3, "loss": 99.0}\n{"step": 4, "lo')
    code, _, err = run(capsys, "pretrain", str(corpus), "--out", str(run_dir), "--resume", "--quiet",
                       "--train.max_steps=4")
    assert code == 0, err
    assert ckpt_steps(run_dir)[-1] == "step_0000004"
    losses = [(r["step"], r["loss"]) for r in records(run_dir) if "loss" in r]
    assert [s for s, _ in losses] == [1, 2, 3, 4] and 99.0 not in dict(losses).values()  # resume appends


def test_outputs_that_would_destroy_inputs_or_other_files_are_refused(capsys, tmp_path, corpus):
    text = corpus.read_bytes()
    for extra in ([], ["--overwrite"]):  # the user's corpus is never replaced by a tokenizer
        code, _, err = run(capsys, "tokenizer", "train", str(corpus), "--out", str(corpus), *extra)
        _one_line_error(code, err, str(corpus), "is the input")
        assert corpus.read_bytes() == text
    docs = tmp_path / "docs"
    docs.mkdir()
    code, _, err = run(capsys, "tokenizer", "train", str(corpus), "--out", str(docs))
    _one_line_error(code, err, str(docs), "is a folder")
    tok = tmp_path / "tok.json"
    args = ["tokenizer", "train", str(corpus), "--out", str(tok), "--quiet", "--tokenizer.vocab_size=300"]
    assert run(capsys, *args)[0] == 0
    code, _, err = run(capsys, *args)
    _one_line_error(code, err, str(tok), "already exists", "--overwrite")
    assert run(capsys, *args, "--overwrite")[0] == 0

    readme = tmp_path / "README.md"
    readme.write_text("mine")
    code, _, err = run(capsys, "pretrain", str(corpus), "--out", str(readme), *TINY_RUN)
    _one_line_error(code, err, str(readme), "exists and is not a folder")
    code, _, err = run(capsys, "pretrain", str(corpus), "--out", str(readme / "run"), *TINY_RUN)
    _one_line_error(code, err, str(readme), "is a file")
    assert readme.read_text() == "mine"

    base = tmp_path / "base"
    assert run(capsys, "pretrain", str(corpus), "--out", str(base), *TINY_RUN)[0] == 0
    before = ckpt_steps(base)
    for extra in ([], ["--overwrite"]):  # fine-tuning into the base's own folder would replace the base
        code, _, err = run(capsys, "sft", "--base", str(base), "--out", str(base), "--quiet", *extra)
        _one_line_error(code, err, str(base), "is the input")
    assert ckpt_steps(base) == before


def test_a_locked_run_folder_is_refused(capsys, tmp_path, corpus):
    run_dir = tmp_path / "a"
    with claim_run_dir(run_dir):  # another run holds the folder
        code, _, err = run(capsys, "pretrain", str(corpus), "--out", str(run_dir), *TINY_RUN)
    _one_line_error(code, err, str(run_dir), "another scratchlm process", "PID")
    assert list(run_dir.iterdir()) == []


def test_filesystem_errors_are_one_line(capsys, tmp_path, corpus, monkeypatch):
    def full_disk(self, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(Tokenizer, "save", full_disk)
    out = tmp_path / "tok.json"
    code, _, err = run(capsys, "tokenizer", "train", str(corpus), "--out", str(out), "--quiet",
                       "--tokenizer.vocab_size=300")
    _one_line_error(code, err, str(out), "No space left on device")
    monkeypatch.undo()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder (root passes chmod)
    code, _, err = run(capsys, "pretrain", str(corpus), "--out", str(tmp_path / "ro" / "run"), *TINY_RUN)
    _one_line_error(code, err, str(tmp_path), "not writable")


def test_an_interrupted_sft_stops_after_its_checkpoint(capsys, tmp_path, corpus, monkeypatch):
    base = tmp_path / "base"
    assert run(capsys, "pretrain", str(corpus), "--out", str(base), *TINY_RUN, "--tokenizer.kind=byte",
               "--model.block_size=64", "--train.max_steps=1")[0] == 0
    real, calls = pretrain_mod.forward_backward, []

    def ctrl_c_on_step_2(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGINT)  # caught by the loop, which finishes the step and saves
        return real(*args, **kwargs)

    monkeypatch.setattr(pretrain_mod, "forward_backward", ctrl_c_on_step_2)
    out = tmp_path / "sft"
    code, _, err = run(capsys, "sft", "--base", str(base), "--out", str(out), "--quiet", "--sft.n_tasks=60",
                       "--sft.eval_max_new_tokens=2", "--train.max_steps=50", "--train.batch_size=2",
                       "--train.eval_interval=50", "--train.eval_iters=1", "--train.tensorboard=false",
                       "--train.precision=fp32")
    assert code == 130  # 128 + SIGINT
    assert err.strip().splitlines()[-1] == "scratchlm: SIGINT: saved a checkpoint at step 2; continue with --resume"
    assert (out / "ckpt" / "latest").read_text() == "step_0000002\n"
    # The old code went on to generate and score every held-out answer before exiting with status 0.
    assert not (out / "eval" / "answers_sft.jsonl").exists() and not (out / "eval" / "summary.md").exists()
