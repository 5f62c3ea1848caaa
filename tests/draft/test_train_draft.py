"""The draft stage end to end: `scratchlm train-draft` trains an EAGLE head on a target's features (the
loss falls; the head is saved with its record), and `scratchlm sample --draft` prints the same greedy
text as without a draft, plus the mean accepted length; bad input is one line, exit 2."""

from __future__ import annotations

import io
import json

import pytest
import torch

from scratchlm.cli import main
from scratchlm.draft.train import DraftTrainSettings, train_draft
from tests.helpers import CHARS, make_checkpoint


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def corpus(tmp_path):
    path = tmp_path / "text.txt"
    letters = "".join(c for c in CHARS if c not in "\n")
    g = torch.Generator().manual_seed(0)
    path.write_text("".join(letters[i] for i in torch.randint(0, len(letters), (4000,), generator=g).tolist()))
    return path


def test_training_lowers_the_loss_and_records_the_target(tmp_path):
    target = make_checkpoint(tmp_path / "target", block_size=32)
    lines = []
    s = DraftTrainSettings(steps=100, batch_size=4, lr=3e-3, warmup=5)
    record = train_draft(target, [str(corpus(tmp_path))], tmp_path / "head", s, log=lines.append)
    first, last = (float(line.split("loss ")[1].split()[0]) for line in (lines[0], lines[-2]))
    assert last < 0.7 * first, lines
    assert record["val_top1_agreement"] > 0.15  # an untrained head agrees on ~2% of held-out tokens here
    saved = json.loads((tmp_path / "head" / "draft.json").read_text())
    assert saved["kind"] == "eagle" and saved["target_fingerprint"] == record["target_fingerprint"]
    assert (tmp_path / "head" / "draft.safetensors").exists()


def test_a_head_drafts_from_the_most_frequent_ids_of_its_training_text(tmp_path):
    from scratchlm.checkpoint import load_model_for_inference
    from scratchlm.infer.eagle import load_draft

    target_dir = make_checkpoint(tmp_path / "target", block_size=32)
    text = tmp_path / "skewed.txt"
    text.write_text("aaaa bbb cc d efgh " * 150)
    s = DraftTrainSettings(steps=2, batch_size=2, warmup=1, draft_vocab=3)
    record = train_draft(target_dir, [str(text)], tmp_path / "head", s, log=lambda line: None)
    assert json.loads((tmp_path / "head" / "draft.json").read_text())["head"]["draft_vocab"] == 3
    assert record["draft_vocab_coverage"] == pytest.approx(12 / 19, abs=0.01)  # space 5, a 4, b 3 of 19
    target, tok, _ = load_model_for_inference(target_dir)
    head = load_draft(tmp_path / "head", target, tok).head
    assert head.vocab.tolist() == sorted(set(tok.encode_ordinary("a b")))


def test_sample_with_a_draft_prints_the_same_greedy_text(capsys, tmp_path):
    target = make_checkpoint(tmp_path / "target", block_size=32)
    draft_model = make_checkpoint(tmp_path / "small", block_size=32, n_layer=1)
    code, _, err = run(capsys, "train-draft", "--target", str(target), "--data", str(corpus(tmp_path)),
                       "--out", str(tmp_path / "head"), "--steps", "5", "--batch-size", "2", "--quiet")
    assert code == 0, err
    settings = ["--prompt", "abc", "--sample.temperature=0", "--sample.max_new_tokens=40"]
    code, plain, _ = run(capsys, "sample", "--ckpt", str(target), *settings)
    assert code == 0 and len(plain) > 10
    for draft in (tmp_path / "head", draft_model):
        code, out, err = run(capsys, "sample", "--ckpt", str(target), "--draft", str(draft), "--draft-k", "3",
                             *settings)
        assert code == 0, err
        assert out == plain and "mean accepted length" in err


def test_bad_input_is_one_line_exit_2(capsys, tmp_path):
    target = make_checkpoint(tmp_path / "target", block_size=32)
    code, _, err = run(capsys, "sample", "--ckpt", str(target), "--draft", str(target), "--draft-k", "0")
    assert code == 2 and "--draft-k 0" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "sample", "--ckpt", str(target), "--draft", str(target), "--sample.cache=sink")
    assert code == 2 and "sample.cache=sink" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "train-draft", "--target", str(target), "--out", str(tmp_path / "h"),
                       "--data", str(tmp_path / "nope.txt"))
    assert code == 2 and "nope.txt" in err and len(err.strip().splitlines()) == 1
    code, _, err = run(capsys, "train-draft", "--target", str(target), "--out", str(tmp_path / "h"),
                       "--draft-vocab", "-1")
    assert code == 2 and "--draft-vocab -1" in err and len(err.strip().splitlines()) == 1


def test_chat_with_a_draft_gives_the_same_greedy_replies(capsys, tmp_path, monkeypatch):
    from tests.serve.server import chat_checkpoint

    target = chat_checkpoint(tmp_path / "chat")
    settings = ["--sample.temperature=0", "--sample.max_new_tokens=20"]
    replies = []
    # the target as its own draft, run in bfloat16: nearly every drafted token accepted (all but near-ties)
    for extra in ([], ["--draft", str(target), "--draft-k", "3"]):
        monkeypatch.setattr("sys.stdin", io.StringIO("hello\nhi. ok\n"))
        code, out, err = run(capsys, "chat", "--ckpt", str(target), *settings, *extra)
        assert code == 0, err
        replies.append(out)
        assert ("mean accepted length" in err) == bool(extra), err
        if extra:
            assert float(err.split("mean accepted length ")[1].split()[0]) >= 3.0, err
    assert replies[0] == replies[1] and len(replies[0]) > 20
