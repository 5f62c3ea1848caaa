"""Attention heatmaps: the recorded weights are causal distributions, and the PNG is written."""

from __future__ import annotations

import pytest
import torch

from scratchlm.cli import main
from scratchlm.errors import UserError
from scratchlm.viz.attention import attention_weights, token_labels
from tests.helpers import char_tokenizer, make_checkpoint, tiny_model


@pytest.mark.parametrize("impl", ["sdpa", "explicit"])
def test_weights_are_causal_distributions(impl):
    model = tiny_model(attn_impl=impl)
    ids = list(range(20))  # longer than block_size=16: cropped from the left
    weights = attention_weights(model, ids)
    assert len(weights) == 2
    for w in weights:
        assert w.shape == (2, 16, 16)
        torch.testing.assert_close(w.sum(-1), torch.ones(2, 16), atol=1e-6, rtol=0)  # fp32, <= 16 terms
        assert torch.all(w.triu(1) == 0)  # nothing attends to the future
    assert all(not b.attn.record and b.attn.weights is None for b in model.h)  # switched back off
    # Recording changes nothing the model computes: logits with recording switched on (the explicit
    # softmax path that keeps the weights) equal the plain forward's, within fp32 rounding of 2 layers.
    idx = torch.tensor([ids[-16:]])
    plain = model(idx)[0]
    for b in model.h:
        b.attn.record = True
    try:
        recorded = model(idx)[0]
        assert all(b.attn.weights is not None for b in model.h)
    finally:
        for b in model.h:
            b.attn.record, b.attn.weights = False, None
    torch.testing.assert_close(recorded, plain, atol=1e-4, rtol=1e-5)


def test_weights_refuse_models_without_attention():
    with pytest.raises(UserError, match="no attention"):
        attention_weights(tiny_model(arch="bigram"), [1, 2])


def test_labels_show_whitespace():
    tok = char_tokenizer()
    assert token_labels(tok, tok.encode("a b\n")) == ["a", "\u2423", "b", "\\n"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("run") / "run")


def viz(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(["viz", "attention", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_writes_png(capsys, run_dir, tmp_path):
    png = tmp_path / "out" / "attn.png"
    code, out, err = viz(capsys, "--ckpt", str(run_dir), "--prompt", "abc defg hij", "--out", str(png))
    assert code == 0, err
    assert out.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5_000
    assert not list(png.parent.glob(".*tmp*"))  # written atomically: no temporary left behind
    code, out, err = viz(capsys, "--ckpt", str(run_dir), "--prompt", "ab", "--out", str(png), "--layer", "1")
    assert code == 2 and "--overwrite" in err  # an existing picture is replaced only when asked
    code, out, err = viz(capsys, "--ckpt", str(run_dir), "--prompt", "ab", "--out", str(png), "--layer", "1",
                         "--overwrite")
    assert code == 0 and png.stat().st_size > 0


@pytest.mark.parametrize("argv,needle", [(["--layer", "2"], "--layer 2"), (["--prompt", "xyz"], "'x'")])
def test_cli_user_errors(capsys, run_dir, tmp_path, argv, needle):
    args = ["--ckpt", str(run_dir), "--prompt", "ab", "--out", str(tmp_path / "a.png")]
    code, out, err = viz(capsys, *args, *argv)
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_cli_refuses_bigram(capsys, tmp_path):
    run = make_checkpoint(tmp_path / "bigram", arch="bigram")
    code, out, err = viz(capsys, "--ckpt", str(run), "--prompt", "ab", "--out", str(tmp_path / "a.png"))
    assert code == 2 and "no attention" in err
