"""Differential attention pictures: the recorded maps are causal distributions whose difference the layer
uses, the PNG from the CLI, and what is refused."""

from __future__ import annotations

import pytest
import torch

from scratchlm.cli import main
from scratchlm.errors import UserError
from scratchlm.viz.diff_attn import differential_maps
from tests.helpers import make_checkpoint, tiny_model


def test_maps_are_causal_distributions_and_lambda_is_the_layers():
    model = tiny_model(arch="diff", n_head=4, n_embd=32)
    maps = differential_maps(model, [3, 1, 4, 1, 5, 9, 2, 6])
    assert len(maps) == 2
    for (m1, m2, lam), layer in zip(maps, model.layers):
        assert m1.shape == m2.shape == (2, 8, 8)  # 4 heads = 2 pairs
        for m in (m1, m2):
            torch.testing.assert_close(m.sum(-1), torch.ones(2, 8))
            assert m.triu(1).abs().max() == 0
        assert not torch.allclose(m1, m2)  # two different maps
        assert lam == pytest.approx(layer.attention.lam().detach().item())
    assert all(layer.attention.weights is None and not layer.attention.record for layer in model.layers)


def test_other_archs_are_refused():
    with pytest.raises(UserError, match="no differential attention"):
        differential_maps(tiny_model(arch="llama"), [1, 2])


def test_cli_writes_png_and_refuses_a_bad_pair(tmp_path, capsys):
    run = make_checkpoint(tmp_path / "run", arch="diff", n_head=4)
    png = tmp_path / "out" / "diff.png"
    assert main(["viz", "diff", "--ckpt", str(run), "--prompt", "abcab", "--out", str(png), "--pair", "1"]) == 0
    assert capsys.readouterr().out.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert main(["viz", "diff", "--ckpt", str(run), "--prompt", "ab", "--out", str(tmp_path / "x.png"),
                 "--pair", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--pair 2 is out of range" in err[0]
    gpt = make_checkpoint(tmp_path / "gpt")
    assert main(["viz", "diff", "--ckpt", str(gpt), "--prompt", "ab", "--out", str(tmp_path / "y.png")]) == 2
    assert "gpt model has no differential attention" in capsys.readouterr().err
