"""Differential attention (model/diff_attn.py): HF DiffLlama parity, the two maps by hand, the packing,
cached ≡ uncached."""

from __future__ import annotations

import json
import math

import pytest
import torch

from scratchlm.cli import main
from scratchlm.config.model import DiffConfig
from scratchlm.convert.hf_llama import LAYER_NAMES, TOP_NAMES
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine
from scratchlm.infer.kv_cache import KVCache
from scratchlm.model import build_model
from scratchlm.model.diff_attn import lambda_init, pack, unpack
from scratchlm.model.layers import DocumentMask, RoPE, causal_mask, repeat_kv
from tests.helpers import greedy, tiny_model, uncached_greedy

transformers = pytest.importorskip("transformers")


def tiny(**kw) -> DiffConfig:
    base = dict(vocab_size=61, pad_vocab_to=1, block_size=32, n_layer=3, n_head=4, n_kv_head=2, n_embd=32,
                ffn_hidden=48, bias=False, tie_embeddings=False)
    return DiffConfig(**{**base, **kw})


def hf_twin(model, cfg: DiffConfig):
    """HF's DiffLlamaForCausalLM of the same shape, holding our model's weights (float64)."""
    hc = transformers.DiffLlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.n_embd, intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        max_position_embeddings=cfg.block_size, rms_norm_eps=cfg.norm_eps, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope.theta}, attention_bias=False)
    hc._attn_implementation = "eager"
    hf = transformers.DiffLlamaForCausalLM(hc).double().eval()
    names = {**LAYER_NAMES, **{f"attention.lambda_{x}": f"self_attn.lambda_{x}" for x in ("q1", "k1", "q2", "k2")}}
    sd = {}
    for ours, t in model.state_dict().items():
        if ours in TOP_NAMES:
            sd[TOP_NAMES[ours]] = t
            continue
        _, i, rest = ours.split(".", 2)
        module, leaf = rest.rsplit(".", 1) if not rest.startswith("attention.lambda_") else (rest, None)
        sd[f"model.layers.{i}.{names[module]}" + (f".{leaf}" if leaf else "")] = t
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return hf


@pytest.mark.parametrize("kv", [2, 4])
def test_logits_equal_hf_diffllama(kv):
    torch.manual_seed(0)
    cfg = tiny(n_kv_head=kv)
    model = build_model(cfg).double().eval()
    with torch.no_grad():  # λ away from its init, so both exp terms and λ_init all count
        for layer in model.layers:
            for p in (layer.attention.lambda_q1, layer.attention.lambda_k1, layer.attention.lambda_q2,
                      layer.attention.lambda_k2):
                p.normal_(0, 0.5)
    hf = hf_twin(model, cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(idx).logits
    # not float64-exact: HF sums λ's dot products in fp32, and both sides take RoPE's cos/sin in fp32
    assert (ours - theirs).abs().max().item() < 1e-6
    model32, hf32 = model.float(), hf.float()
    with torch.no_grad():
        assert (model32(idx)[0] - hf32(idx).logits).abs().max().item() < 1e-4


def test_lambda_init_follows_depth_from_layer_0():
    model = build_model(tiny(n_layer=4))
    got = [layer.attention.lambda_init for layer in model.layers]
    assert got == pytest.approx([0.8 - 0.6 * math.exp(-0.3 * i) for i in range(4)])
    assert lambda_init(0) == pytest.approx(0.2)
    lam = [p for n, p in model.named_parameters() if ".lambda_" in n]
    assert len(lam) == 16 and 0.05 < torch.cat(lam).std().item() < 0.2  # N(0, 0.1), not Llama's ones


def test_attention_is_the_difference_of_two_softmax_maps():
    """One layer's output by the paper's formula, written out with the un-packed heads."""
    torch.manual_seed(1)
    cfg = tiny(n_layer=1)
    model = build_model(cfg).double().eval()
    att = model.layers[0].attention
    x = torch.randn(2, 9, cfg.n_embd, dtype=torch.float64)
    B, T, H, Hkv, D = 2, 9, cfg.n_head, cfg.n_kv_head, cfg.n_embd // cfg.n_head
    rope = RoPE(D, cfg.rope.theta).double()
    pos = torch.arange(T)[None]
    q = rope(att.wq(x).view(B, T, H, D).transpose(1, 2), pos)
    k = repeat_kv(rope(att.wk(x).view(B, T, Hkv, D).transpose(1, 2), pos), H // Hkv)
    v = att.wv(x).view(B, T, Hkv, D).transpose(1, 2)
    maps = ((q @ k.transpose(-1, -2)) / math.sqrt(D)).masked_fill(~causal_mask(T), float("-inf")).softmax(-1)
    v_pair = repeat_kv(torch.cat([v[:, : Hkv // 2], v[:, Hkv // 2 :]], dim=-1), H // Hkv)  # (B, H/2, T, 2D)
    lam = (att.lambda_q1 @ att.lambda_k1).exp() - (att.lambda_q2 @ att.lambda_k2).exp() + att.lambda_init
    y = (maps[:, : H // 2] - lam * maps[:, H // 2 :]) @ v_pair
    att.sub_norm = False  # the ablation (model.sub_norm=false): the difference, unnormalised
    got = att(x, model.rope, pos, 0, None, None)
    assert (got - att.wo(y.transpose(1, 2).reshape(B, T, -1))).abs().max().item() < 1e-6
    att.sub_norm = True
    y = (1 - att.lambda_init) * y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + cfg.norm_eps)
    want = att.wo(y.transpose(1, 2).reshape(B, T, -1))
    got = att(x, model.rope, pos, 0, None, None)
    assert (got - want).abs().max().item() < 1e-6  # RoPE rotates in fp32 (layers.py), the packed q pre-scaled
    att.record = True
    att(x, model.rope, pos, 0, None, None)
    assert torch.allclose(att.weights, maps.view(B, 2, H // 2, T, T), atol=1e-6)  # the two maps, recorded


def test_pack_unpack_and_pair_rope_rotate_each_head_alone():
    torch.manual_seed(2)
    a, b = torch.randn(2, 3, 5, 8, dtype=torch.float64), torch.randn(2, 3, 5, 8, dtype=torch.float64)
    assert all(torch.equal(x, y) for x, y in zip(unpack(pack(a, b)), (a, b)))
    model = build_model(tiny()).double()
    rope, pos = RoPE(8).double(), torch.arange(5)[None] + 3
    ra, rb = unpack(model.rope(pack(a, b), pos))
    assert torch.equal(ra, rope(a, pos)) and torch.equal(rb, rope(b, pos))


def test_cached_decode_equals_the_uncached_forward():
    torch.manual_seed(3)
    cfg = tiny()
    model = build_model(cfg).double().eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 14))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache.for_model(model, 2)
        assert cache.bytes_per_token() == 2 * cfg.n_layer * cfg.n_kv_head * (cfg.n_embd // cfg.n_head) * 8
        steps = [model(idx[:, :9], cache=cache)[0]]
        steps += [model(idx[:, t : t + 1], cache=cache)[0] for t in range(9, 14)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-12


def test_sliding_window_and_documents_match_the_uncached_path():
    torch.manual_seed(4)
    cfg = tiny(sliding_window=5)
    model = build_model(cfg).double().eval()
    idx = torch.randint(0, cfg.vocab_size, (1, 12))
    with torch.no_grad():
        full = model(idx)[0]
        cache = KVCache.for_model(model, 1)
        steps = [model(idx[:, :4], cache=cache)[0]] + [model(idx[:, t : t + 1], cache=cache)[0] for t in range(4, 12)]
    assert (torch.cat(steps, dim=1) - full).abs().max().item() < 1e-12
    explicit = build_model(tiny(sliding_window=5, attn_impl="explicit")).double().eval()
    explicit.load_state_dict(model.state_dict())
    with torch.no_grad():
        assert (explicit(idx)[0] - full).abs().max().item() < 1e-12
        other = torch.randint(0, cfg.vocab_size, (1, 7))  # two documents packed = each alone
        doc_ids = torch.tensor([[0] * 12 + [1] * 7])
        packed = model(torch.cat([idx, other], dim=1), doc_mask=DocumentMask(doc_ids))[0]
        alone = torch.cat([full, model(other)[0]], dim=1)
    assert (packed - alone).abs().max().item() < 1e-12


def test_odd_heads_are_refused():
    with pytest.raises(UserError, match="n_kv_head=3 must be even"):
        DiffConfig(n_head=6, n_kv_head=3, n_embd=48).validate()
    with pytest.raises(UserError, match="n_head=3 must be even"):
        DiffConfig(n_head=3, n_embd=48).validate()
    DiffConfig(n_head=4, n_kv_head=2, n_embd=64).validate()


def test_training_step_moves_lambda():
    torch.manual_seed(5)
    cfg = tiny()
    model = build_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    _, loss = model(idx, idx)
    loss.backward()
    g = model.layers[1].attention.lambda_q1.grad
    assert g is not None and g.abs().sum() > 0
    assert loss.isfinite()


def test_preset_pretrains_and_samples_from_the_cli(capsys, tmp_path):
    corpus = tmp_path / "corpus.txt"
    lines = (f"the cat {i} sat on the mat, and the dog {i * 7 % 13} lay by the log." for i in range(300))
    corpus.write_text("\n".join(lines) + "\n")
    run = tmp_path / "run"
    code = main(["pretrain", str(corpus), "--out", str(run), "--quiet", "--preset", "diff-tiny",
                 "--train.max_steps=20", "--tokenizer.vocab_size=300", "--train.eval_interval=20",
                 "--train.eval_iters=1", "--train.tensorboard=false", "--data.workers=1"])
    assert code == 0, capsys.readouterr().err
    assert json.loads((run / "config.json").read_text())["model"]["arch"] == "diff"
    capsys.readouterr()
    code = main(["sample", "--ckpt", str(run), "--prompt", "the cat", "--sample.max_new_tokens=8",
                 "--sample.stream=false", "--device", "cpu"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert out.startswith("the cat") and len(out) > len("the cat")



def test_engine_batch_of_uneven_prompts_equals_uncached_greedy():
    """Left-padded rows through the engine's KV cache give each prompt's plain uncached greedy tokens."""
    model = tiny_model(arch="diff", n_head=4)  # block_size 16
    prompts = [[1, 2, 3], [5, 4, 3, 2, 1, 7, 9], [8]]
    out = Engine(model).generate(prompts, greedy(8))
    for prompt, tokens in zip(prompts, out):
        assert tokens == uncached_greedy(model, prompt, 8)[0]
