"""The `scratchlm` command end to end: each verb works, and user errors are one line, exit 2."""

from __future__ import annotations

import json

import pytest

from scratchlm.cli import main


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
def test_demo_quick(capsys, tmp_path):
    code, out, _ = run(capsys, "demo", "--quick", "--out", str(tmp_path / "demo"))
    assert code == 0, out
    report = (tmp_path / "demo" / "report.md").read_text()
    assert "## Tokenizers" in report and "## Pretraining data" in report
    assert (tmp_path / "demo" / "data" / "manifest.json").exists()
    assert (tmp_path / "demo" / "tokenizers.png").exists()
