"""Native sparse attention (model/nsa.py): each branch against full attention where it must equal it, the
gated sum against a per-query reference, cached ≡ uncached (alone and left-padded), the preset from the CLI."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.cli import main
from scratchlm.config.model import NSAConfig
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine
from scratchlm.infer.kv_cache import KVCache
from scratchlm.infer.sink_cache import SinkCache
from scratchlm.model import build_model
from scratchlm.model.layers import explicit_attention
from tests.helpers import greedy, tiny_model, uncached_greedy


def tiny(**kw) -> NSAConfig:
    base = dict(vocab_size=61, pad_vocab_to=1, block_size=48, n_layer=2, n_head=4, n_kv_head=2, n_embd=32,
                bias=False, nsa_cmp_block=4, nsa_cmp_stride=2, nsa_sel_block=4, nsa_n_selected=3, nsa_window=5)
    return NSAConfig(**{**base, **kw})


def layer_and_input(seed: int, T: int = 23, **kw):
    torch.manual_seed(seed)
    cfg = tiny(**kw)
    model = build_model(cfg).double().eval()
    att = model.layers[0].attention
    with torch.no_grad():  # gates away from 1/2, so a wrong mix shows
        att.gate.weight.normal_(0, 0.3)
        att.gate.bias.normal_(0, 1.0)
    return cfg, model, att, torch.randn(2, T, cfg.n_embd, dtype=torch.float64)


def only_branch(att, branch: int) -> None:
    """Gates pinned: sigmoid(±1e4) is exactly 1 or 0, so the layer outputs one branch alone."""
    with torch.no_grad():
        att.gate.weight.zero_()
        bias = torch.full((att.n_head, 3), -1e4, dtype=att.gate.bias.dtype)
        bias[:, branch] = 1e4
        att.gate.bias.copy_(bias.flatten())


def full_causal(att, model, x):
    """The layer's projections with plain causal attention (what Llama computes)."""
    B, T, _ = x.shape
    pos = torch.arange(T)[None]
    q = model.rope(att.wq(x).view(B, T, att.n_head, -1).transpose(1, 2), pos)
    k = model.rope(att.wk(x).view(B, T, att.n_kv_head, -1).transpose(1, 2), pos)
    v = att.wv(x).view(B, T, att.n_kv_head, -1).transpose(1, 2)
    y, _ = explicit_attention(q, k, v)
    return att.wo(y.transpose(1, 2).reshape(B, T, -1))


def test_selection_of_every_block_is_full_causal_attention():
    cfg, model, att, x = layer_and_input(0, nsa_n_selected=6)
    only_branch(att, 1)
    pos = torch.arange(x.size(1))[None]
    with torch.no_grad():
        assert (att(x, model.rope, pos, 0, None, None) - full_causal(att, model, x)).abs().max() < 1e-12
        att.n_selected = 3  # fewer blocks than the 6 of 23 tokens: no longer full attention
        assert (att(x, model.rope, pos, 0, None, None) - full_causal(att, model, x)).abs().max() > 1e-6


def test_window_covering_the_sequence_is_full_causal_attention():
    cfg, model, att, x = layer_and_input(1, nsa_window=23)
    only_branch(att, 2)
    pos = torch.arange(x.size(1))[None]
    with torch.no_grad():
        assert (att(x, model.rope, pos, 0, None, None) - full_causal(att, model, x)).abs().max() < 1e-12
        att.window = 8  # a window shorter than the sequence: no longer full attention
        assert (att(x, model.rope, pos, 0, None, None) - full_causal(att, model, x)).abs().max() > 1e-6


def reference(att, model, x):
    """The layer by the paper's description, one query at a time, in plain loops (float64)."""
    B, T, C = x.shape
    H, Hkv, D = att.n_head, att.n_kv_head, att.head_dim
    rep = H // Hkv
    l, d, ls, n, w = att.cmp_block, att.cmp_stride, att.sel_block, att.n_selected, att.window
    pos = torch.arange(T)[None]
    q = model.rope(att.wq(x).view(B, T, H, D).transpose(1, 2), pos)
    k = model.rope(att.wk(x).view(B, T, Hkv, D).transpose(1, 2), pos)
    v = att.wv(x).view(B, T, Hkv, D).transpose(1, 2)

    def phi(mlp, block):  # (l, D) -> (D,)
        return mlp.fc2.weight @ F.silu(mlp.fc1.weight @ (block + mlp.pos).flatten() + mlp.fc1.bias) + mlp.fc2.bias

    def attend(qv, keys, values):  # (D,), (S, D), (S, D)
        if len(keys) == 0:
            return torch.zeros(D, dtype=x.dtype), torch.zeros(0, dtype=x.dtype)
        p = torch.softmax(keys @ qv / math.sqrt(D), dim=0)
        return p @ values, p

    out = torch.zeros(B, T, H, D, dtype=x.dtype)
    for b in range(B):
        for t in range(T):
            gates = torch.sigmoid(att.gate.weight @ x[b, t] + att.gate.bias).view(H, 3)
            starts = [s for s in range(0, t + 1, d) if s + l - 1 <= t]  # compressed blocks wholly in the past
            probs = {}
            o_cmp = {}
            for h in range(H):
                g = h // rep
                kc = torch.stack([phi(att.compress_k, k[b, g, s : s + l]) for s in starts]) if starts else k[b, g, :0]
                vc = torch.stack([phi(att.compress_v, v[b, g, s : s + l]) for s in starts]) if starts else v[b, g, :0]
                o_cmp[h], probs[h] = attend(q[b, h, t], kc, vc)
            for g in range(Hkv):
                own = t // ls
                score = {}
                for j in range(own + 1):
                    if j in (0, own):
                        score[j] = float("inf")
                        continue
                    score[j] = sum(float(probs[h][i]) for h in range(g * rep, (g + 1) * rep)
                                   for i, s in enumerate(starts) if s < (j + 1) * ls and s + l > j * ls)
                chosen = sorted(score, key=lambda j: (-score[j], j))[:n]
                keep = [p for p in range(t + 1) if p // ls in chosen]
                window = list(range(max(0, t - w + 1), t + 1))
                for h in range(g * rep, (g + 1) * rep):
                    o_slc, _ = attend(q[b, h, t], k[b, g, keep], v[b, g, keep])
                    o_win, _ = attend(q[b, h, t], k[b, g, window], v[b, g, window])
                    out[b, t, h] = gates[h, 0] * o_cmp[h] + gates[h, 1] * o_slc + gates[h, 2] * o_win
    return att.wo(out.reshape(B, T, H * D))


@pytest.mark.parametrize("kw", [{}, dict(nsa_cmp_block=4, nsa_cmp_stride=4, nsa_sel_block=8, nsa_n_selected=2),
                                dict(n_kv_head=1, nsa_cmp_block=6, nsa_cmp_stride=3, nsa_sel_block=3)])
def test_gated_sum_equals_a_per_query_reference(kw):
    cfg, model, att, x = layer_and_input(2, **kw)
    with torch.no_grad():
        got = att(x, model.rope, torch.arange(x.size(1))[None], 0, None, None)
        want = reference(att, model, x)
    assert (got - want).abs().max().item() < 1e-12


def test_cached_decode_equals_the_uncached_forward_alone_and_left_padded():
    torch.manual_seed(3)
    cfg = tiny()
    model = build_model(cfg).double().eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 30))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache.for_model(model, 2)
        steps = [model(idx[:, :11], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(11, 30)]
        assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-12
        # row 1 left-padded by 5 slots: its blocks count positions, not slots
        short = idx[1:, 5:]
        cache = KVCache.for_model(model, 2, pad=torch.tensor([0, 5]))
        first = model(idx[:, :16], cache=cache)[0]
        rest = [model(idx[:, t : t + 1], cache=cache)[0] for t in range(16, 30)]
        padded = torch.cat([first, *rest], dim=1)
        assert (padded[0] - full[0]).abs().max().item() < 1e-12
        assert (padded[1, 5:] - model(short)[0][0]).abs().max().item() < 1e-12


def test_bad_settings_are_refused():
    with pytest.raises(UserError, match="nsa_cmp_block=6 must be a multiple of model.nsa_cmp_stride=4"):
        tiny(nsa_cmp_block=6, nsa_cmp_stride=4).validate()
    with pytest.raises(UserError, match="sliding_window=8 is not read by arch=nsa"):
        tiny(sliding_window=8).validate()
    tiny().validate()
    with pytest.raises(UserError, match="needs rotary positions"):  # the sink cache moves keys; NSA's blocks cannot
        SinkCache.for_model(build_model(tiny()), 1)


def test_preset_pretrains_and_samples_from_the_cli(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    lines = (f"the cat {i} sat on the mat, and the dog {i * 7 % 13} lay by the log." for i in range(300))
    corpus.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    code = main(["pretrain", str(corpus), "--out", str(run), "--quiet", "--preset", "nsa-tiny",
                 "--train.max_steps=20", "--tokenizer.vocab_size=300", "--train.eval_interval=20",
                 "--train.eval_iters=1", "--train.tensorboard=false", "--data.workers=1"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["model"]["arch"] == "nsa"
    capsys.readouterr()
    code = main(["sample", "--ckpt", str(run), "--prompt", "the cat", "--sample.max_new_tokens=8",
                 "--sample.stream=false", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("the cat") and len(out) > len("the cat")



def test_engine_batch_of_uneven_prompts_equals_uncached_greedy():
    """Left-padded rows through the engine's KV cache give each prompt's plain uncached greedy tokens."""
    model = tiny_model(arch="nsa", n_head=4, nsa_cmp_block=4, nsa_cmp_stride=2, nsa_sel_block=4, nsa_n_selected=2,
                       nsa_window=3)  # block_size 16
    prompts = [[1, 2, 3], [5, 4, 3, 2, 1, 7, 9], [8]]
    out = Engine(model).generate(prompts, greedy(8))
    for prompt, tokens in zip(prompts, out):
        assert tokens == uncached_greedy(model, prompt, 8)[0]
