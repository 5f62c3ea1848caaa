"""HF DiffLlama <-> arch=diff through `scratchlm convert` (convert/hf_diffllama.py): a random tiny
DiffLlamaForCausalLM imported with equal logits, our model exported to a folder transformers loads with
equal logits, and the settings HF's DiffLlama cannot hold refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.convert import export_hf, import_hf
from scratchlm.errors import UserError
from tests.helpers import VOCAB, assert_logits_close, hf_folder, ids, our_checkpoint, randomize

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-5)


def logits(model, x, hf: bool):
    with torch.no_grad():
        return model(x).logits if hf else model(x)[0]


@pytest.mark.parametrize("kw", [{}, dict(tie_word_embeddings=True, num_key_value_heads=4, lambda_std_dev=0.3)])
def test_imported_logits_equal_hf(kw, tmp_path):
    torch.manual_seed(0)
    hf = randomize(transformers.DiffLlamaForCausalLM(transformers.DiffLlamaConfig(**{**SIZES, **kw})), seed=1)
    model, _, cfg = load_model_for_inference(import_hf(hf_folder(tmp_path, hf), tmp_path / "ours"))
    n_kv = kw.get("num_key_value_heads", SIZES["num_key_value_heads"])
    assert (cfg.model.arch, cfg.model.n_kv_head, cfg.model.vocab_size) == ("diff", n_kv, VOCAB)
    assert cfg.model.lambda_std == kw.get("lambda_std_dev", 0.1)
    lam = hf.model.layers[2].self_attn.lambda_q2
    assert torch.equal(model.layers[2].attention.lambda_q2, lam.detach())  # λ's vectors came across
    x = ids()
    assert_logits_close(logits(model, x, False), logits(hf, x, True))


@pytest.mark.parametrize("fields", [dict(bias=False), dict(bias=True, tie_embeddings=True)])
def test_export_loads_in_transformers_with_equal_logits(fields, tmp_path):
    run, model, _ = our_checkpoint(tmp_path, seed=1, arch="diff", n_kv_head=2, **fields)
    out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["architectures"] == ["DiffLlamaForCausalLM"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "DiffLlamaForCausalLM"
    x = ids(vocab=model.config.vocab_size)
    assert_logits_close(logits(hf, x, True), logits(model.eval(), x, False))
    back, _, _ = load_model_for_inference(import_hf(out, tmp_path / "back"))
    assert_logits_close(logits(back, x, False), logits(model, x, False))


def test_what_hf_diffllama_cannot_hold_is_refused(tmp_path):
    run, _, _ = our_checkpoint(tmp_path, arch="diff", qk_norm=True)
    with pytest.raises(UserError, match="qk_norm=true has no place in HF's DiffLlama"):
        export_hf(run, tmp_path / "hf")
    run, _, _ = our_checkpoint(tmp_path / "ablation", arch="diff", sub_norm=False)
    with pytest.raises(UserError, match="sub_norm=false .* has no place in HF's DiffLlama"):
        export_hf(run, tmp_path / "hf")
    hf = transformers.DiffLlamaForCausalLM(transformers.DiffLlamaConfig(**{**SIZES, "hidden_act": "gelu"}))
    with pytest.raises(UserError, match="hidden_act='gelu' cannot be converted"):
        import_hf(hf_folder(tmp_path / "a", hf), tmp_path / "ours")
