"""`scratchlm pretrain --preset mla-tiny` / `mtp-tiny` trains (20 steps) and `scratchlm sample --ckpt` samples
from the checkpoint (the latent cache through the unchanged engine); mtp-tiny samples the same greedy
text with `--draft mtp`."""

from __future__ import annotations

import json

import pytest

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.cli import main
from scratchlm.model.mla import MLA

SMALL = ["--quiet", "--tokenizer.vocab_size=300", "--train.batch_size=4", "--train.eval_interval=20",
         "--train.eval_iters=1", "--train.log_interval=5", "--train.tensorboard=false", "--train.precision=fp32",
         "--data.workers=1"]


@pytest.mark.parametrize("preset", ["mla-tiny", "mtp-tiny"])
def test_pretrain_preset_then_sample(capsys, tmp_path, preset):
    corpus = tmp_path / "corpus.txt"
    words = ["the", "cat", "sat", "on", "mat", "dog", "log", "zebra", "quickly", "jumped", "over", "lazy", "fox"]
    corpus.write_text("\n".join(" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + f" {i}."
                                for i in range(300)))
    run = tmp_path / "run"
    assert main(["pretrain", str(corpus), "--out", str(run), "--preset", preset, "--train.max_steps=20", *SMALL]) == 0
    losses = [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert losses and losses[-1] < losses[0]
    model, _, _ = load_model_for_inference(run, "cpu")
    assert isinstance(model, MLA) and len(model.mtp) == (2 if preset == "mtp-tiny" else 0)
    capsys.readouterr()
    assert main(["sample", "--ckpt", str(run), "--prompt", "the", "--sample.max_new_tokens=8",
                 "--sample.temperature=0"]) == 0
    plain = capsys.readouterr().out.strip()
    assert plain
    if preset == "mtp-tiny":  # the model's own MTP modules draft; greedy text unchanged
        assert main(["sample", "--ckpt", str(run), "--prompt", "the", "--sample.max_new_tokens=8",
                     "--sample.temperature=0", "--draft", "mtp", "--draft-k", "2"]) == 0
        out, err = capsys.readouterr()
        assert out.strip() == plain and "mean accepted length" in out + err
