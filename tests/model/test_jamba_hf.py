"""Jamba against HF transformers' `JambaForCausalLM` (its PyTorch path: no mamba-ssm kernels here):
tiny random models imported by `scratchlm convert` (hf_jamba.py) give logits within 1e-4 (fp32; the
measured difference is printed), in several layouts (attention and expert periods, GQA, tied
embeddings, top-1, biased projections); our Jamba exported loads in HF with equal logits and imports
back; cached decoding of the import equals HF's full forward; what cannot be converted is named."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.convert import export_hf, import_hf
from scratchlm.errors import UserError
from scratchlm.infer.kv_cache import KVCache
from tests.helpers import VOCAB, assert_logits_close, hf_folder, ids, our_checkpoint, randomize

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.filterwarnings("ignore")  # HF's notes on the missing mamba-ssm / causal-conv1d kernels

SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=24, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, num_experts=4, num_experts_per_tok=2,
             attn_layer_period=4, attn_layer_offset=2, expert_layer_period=2, expert_layer_offset=1,
             mamba_d_state=8, mamba_d_conv=4, mamba_expand=2, rms_norm_eps=1e-6)

CASES = {
    "jamba-layout": dict(),
    "attn-every-2-experts-every-3-top1-tied": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=3,
                                                    expert_layer_offset=0, num_experts_per_tok=1,
                                                    tie_word_embeddings=True, num_hidden_layers=5),
    "proj-bias-no-conv-bias-dt-rank-3-mqa": dict(mamba_proj_bias=True, mamba_conv_bias=False, mamba_dt_rank=3,
                                                 num_key_value_heads=1, mamba_d_conv=2),
}


def random_jamba(**kw):
    torch.manual_seed(0)
    cfg = transformers.JambaConfig(**{**SIZES, **kw})
    return randomize(transformers.JambaForCausalLM(cfg), seed=1).eval()


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def our_logits(model, x):
    with torch.no_grad():
        return model(x)[0]


@pytest.mark.parametrize("case", CASES)
def test_imported_logits_equal_hf(case, tmp_path):
    hf = random_jamba(**CASES[case])
    model, _, cfg = load_model_for_inference(import_hf(hf_folder(tmp_path, hf), tmp_path / "ours"))
    c, h = cfg.model, hf.config
    assert (c.arch, c.attn_layer_period, c.attn_layer_offset, c.moe_every, c.moe_first_dense) == \
        ("jamba", h.attn_layer_period, h.attn_layer_offset, h.expert_layer_period, h.expert_layer_offset)
    kinds = ["attention" if i in model.attention_slot else "mamba" for i in range(c.n_layer)]
    assert kinds == h.layers_block_type
    x = ids()
    ref = hf_logits(hf, x)
    ours = our_logits(model, x)
    print(f"{case}: max |logits - HF| = {(ours - ref).abs().max().item():.2e} (logits up to {ref.abs().max():.1f})")
    assert_logits_close(ours, ref)


def test_cached_decoding_of_the_import_equals_hf(tmp_path):
    hf = random_jamba()
    model, _, _ = load_model_for_inference(import_hf(hf_folder(tmp_path, hf), tmp_path / "ours"))
    x = ids()
    ref = hf_logits(hf, x)
    cache = KVCache.for_model(model, x.size(0), x.size(1))
    with torch.no_grad():
        steps = [model(x[:, :5], cache=cache)[0]] + [model(x[:, t : t + 1], cache=cache)[0]
                                                      for t in range(5, x.size(1))]
    assert_logits_close(torch.cat(steps, 1), ref)


def test_export_loads_in_transformers_with_equal_logits_and_imports_back(tmp_path):
    run, model, _ = our_checkpoint(tmp_path, seed=1, arch="jamba", bias=False, n_layer=4, n_kv_head=2,
                                   n_experts=4, expert_hidden=40, ffn_hidden=40, mamba_d_state=8, mamba_proj_bias=True)
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "JambaForCausalLM"
    x = ids(vocab=model.config.vocab_size)
    ours = our_logits(model.eval(), x)
    assert_logits_close(hf_logits(hf, x), ours)
    back, _, cfg = load_model_for_inference(import_hf(out, tmp_path / "back"))
    for field in ("n_experts", "n_active_experts", "moe_every", "moe_first_dense", "attn_layer_period",
                  "attn_layer_offset", "mamba_d_state", "mamba_proj_bias", "router_norm_topk"):
        assert getattr(cfg.model, field) == getattr(model.config, field), field
    torch.testing.assert_close(our_logits(back, x), ours, atol=1e-6, rtol=0)


def refused(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


@pytest.mark.parametrize("fields,words", [
    (dict(num_experts=1), "num_experts=1"),
    (dict(expert_layer_offset=7, expert_layer_period=8), "expert_layer_offset=7"),
    (dict(hidden_act="gelu"), "hidden_act='gelu'"),
])
def test_inexpressible_config_names_the_field(fields, words, tmp_path):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"architectures": ["JambaForCausalLM"], **SIZES, **fields}))
    msg = refused(import_hf, src, tmp_path / "out")
    assert words in msg and "config.json" in msg


def test_export_refuses_what_hf_jamba_cannot_hold(tmp_path):
    run, _, _ = our_checkpoint(tmp_path, seed=1, arch="jamba", bias=False, n_experts=4)  # experts half the FFN
    assert "model.expert_hidden" in refused(export_hf, run, tmp_path / "hf")
