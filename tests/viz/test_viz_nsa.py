"""Native sparse attention pictures: the recorded blocks and gates are the ones the layer used (its output
rebuilt from them in float64), the grid marks them, the PNG from the CLI, and what is refused."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config.model import NSAConfig
from scratchlm.errors import UserError
from scratchlm.model import build_model
from scratchlm.model.layers import repeat_kv
from scratchlm.viz.nsa import CHOSEN, FORCED, NOT_CHOSEN, choice_grid, nsa_choices
from tests.helpers import make_checkpoint, tiny_model

GEOMETRY = dict(block_size=48, n_head=4, n_kv_head=2, nsa_cmp_block=4, nsa_cmp_stride=2, nsa_sel_block=4,
                nsa_n_selected=3, nsa_window=5)


def nsa_model(seed: int = 0):
    torch.manual_seed(seed)
    model = build_model(NSAConfig(vocab_size=61, pad_vocab_to=1, n_layer=2, n_embd=32, bias=False, **GEOMETRY))
    with torch.no_grad():  # gates away from 1/2, so a wrong mix shows
        for layer in model.layers:
            layer.attention.gate.weight.normal_(0, 0.3)
            layer.attention.gate.bias.normal_(0, 1.0)
    return model.double().eval()


def softmax_over(q, k, v, allowed):
    """Plain masked softmax attention, written out: q (B, H, T, D), k, v (B, H, P, D), allowed (B, H, T, P)."""
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    return torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0) @ v


def rebuilt(att, rope, x, selected, gates):
    """The layer's output from the recorded blocks and gates; the compressed branch is the layer's own."""
    B, T, _ = x.shape
    H, Hkv, D = att.n_head, att.n_kv_head, att.head_dim
    pos = torch.arange(T)
    q = rope(att.wq(x).view(B, T, H, D).transpose(1, 2), pos[None])
    k = rope(att.wk(x).view(B, T, Hkv, D).transpose(1, 2), pos[None])
    v = att.wv(x).view(B, T, Hkv, D).transpose(1, 2)
    o_cmp, _, _ = att.compressed(q, k, v, pos.expand(B, T))
    causal = pos[None, :] <= pos[:, None]  # (T, P)
    by_token = selected[..., pos // att.sel_block] & causal  # (B, H_kv, T, P)
    o_slc = softmax_over(q, repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv), repeat_kv(by_token, H // Hkv))
    window = causal & (pos[:, None] - pos[None, :] < att.window)
    o_win = softmax_over(q, repeat_kv(k, H // Hkv), repeat_kv(v, H // Hkv), window.expand(B, H, T, T))
    y = gates[..., 0:1] * o_cmp + gates[..., 1:2] * o_slc + gates[..., 2:3] * o_win  # (B, H, T, D)
    return att.wo(y.transpose(1, 2).reshape(B, T, H * D))


def test_the_recorded_blocks_and_gates_rebuild_the_layers_output():
    model = nsa_model()
    att = model.layers[0].attention
    x = torch.randn(2, 23, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    att.record = True
    with torch.no_grad():
        out = att(x, model.rope, torch.arange(23)[None], 0, None, None)
        selected, gates = att.selected.clone(), att.gates.clone()
        assert selected.shape == (2, 2, 23, 6) and gates.shape == (2, 4, 23, 3)
        assert (rebuilt(att, model.rope, x, selected, gates) - out).abs().max() < 1e-12
        # one block more or less for one query, or other gates, and the output no longer matches
        t = 22
        other = selected.clone()
        b = int((~other[0, 0, t]).nonzero()[0])  # a block the last query did not read
        other[0, 0, t, b] = True
        assert (rebuilt(att, model.rope, x, other, gates) - out).abs().max() > 1e-6
        assert (rebuilt(att, model.rope, x, selected, gates.flip(-1)) - out).abs().max() > 1e-6


def test_choices_per_layer_and_the_grid():
    model = nsa_model()
    ids = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4]
    choices = nsa_choices(model, ids)
    assert len(choices) == 2
    T = len(ids)
    for ch in choices:
        assert ch.selected.shape == (2, T, 5) and ch.gates.shape == (4, T, 3)
        assert ((ch.gates > 0) & (ch.gates < 1)).all()
        own = torch.arange(T) // 4
        assert ch.selected[:, :, 0].all() and ch.selected[:, torch.arange(T), own].all()  # forced blocks
        begun = own + 1  # blocks begun by each query
        assert (ch.selected.sum(-1) == begun.clamp(max=3)).all()  # the top 3, or every block begun
        grid = choice_grid(ch, 1)
        past = torch.ones(T, T, dtype=torch.bool).tril()
        assert (grid[~past] == 0).all() and (grid[past] > 0).all()  # the future blank, the past coloured
        assert (grid[:, :4][past[:, :4]] == FORCED).all()  # the first block
        for t in range(T):
            for p in range(t + 1):
                expected = FORCED if p // 4 in (0, t // 4) else CHOSEN if ch.selected[1, t, p // 4] else NOT_CHOSEN
                assert grid[t, p] == expected
    assert all(not layer.attention.record and layer.attention.selected is None and layer.attention.gates is None
               for layer in model.layers)


def test_other_archs_are_refused():
    with pytest.raises(UserError, match="no sparse attention"):
        nsa_choices(tiny_model(arch="llama"), [1, 2])


def test_cli_writes_png_and_refuses_bad_input(tmp_path, capsys):
    run = make_checkpoint(tmp_path / "run", arch="nsa", **GEOMETRY)
    png = tmp_path / "out" / "nsa.png"
    prompt = "abcdefgh ijklmnop."
    assert main(["viz", "nsa", "--ckpt", str(run), "--prompt", prompt, "--out", str(png), "--head", "3"]) == 0
    assert capsys.readouterr().out.strip() == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    for flag, value, message in (("--layer", "2", "--layer 2 is out of range"),
                                 ("--head", "4", "--head 4 is out of range")):
        assert main(["viz", "nsa", "--ckpt", str(run), "--prompt", "ab", "--out", str(tmp_path / "x.png"),
                     flag, value]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and message in err[0]
    llama = make_checkpoint(tmp_path / "llama", arch="llama")
    assert main(["viz", "nsa", "--ckpt", str(llama), "--prompt", "ab", "--out", str(tmp_path / "y.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "llama model has no sparse attention" in err[0]
