"""HF's DeepseekV3ForCausalLM <-> our arch=mla (convert/hf_deepseek.py), on tiny random configs: imported
models give HF's logits (fp32, 1e-4; measured ~1e-6), with query compression or not, interleaved RoPE
or not, group-limited routing, shared experts, dense first layers, non-zero selection biases and attention
biases; our models export to folders transformers loads with no custom code and equal logits, and
import back unchanged; an MTP model and norm_topk_prob=false are refused by name."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.checkpoint import load_model_for_inference, save_checkpoint
from scratchlm.config import Config, TokenizerConfig, model_config
from scratchlm.convert import export_hf, import_hf
from scratchlm.errors import UserError
from scratchlm.model import build_model, padded_vocab
from tests.helpers import VOCAB, hf_folder, ids, randomize, tiny_bpe

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=40, moe_intermediate_size=16, num_hidden_layers=3,
             num_attention_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=12, q_lora_rank=10,
             qk_rope_head_dim=4, v_head_dim=6, qk_nope_head_dim=8, n_group=4, topk_group=2, num_experts_per_tok=2,
             first_k_dense_replace=1, max_position_embeddings=16, routed_scaling_factor=2.5)
IMPORTS = {
    "q-lora-interleaved-groups": dict(),
    "no-q-lora-rotate-half-bias-tied": dict(q_lora_rank=None, rope_interleave=False, attention_bias=True,
                                            tie_word_embeddings=True, n_shared_experts=2),
    "no-groups-top3-all-moe": dict(n_group=1, topk_group=1, num_experts_per_tok=3, first_k_dense_replace=0,
                                   routed_scaling_factor=1.0, rms_norm_eps=1e-5),
}


def random_hf(**kw):
    torch.manual_seed(0)
    model = randomize(transformers.DeepseekV3ForCausalLM(transformers.DeepseekV3Config(**{**SIZES, **kw})), seed=1)
    with torch.no_grad():  # selection biases that change the picks (HF's init leaves them zero)
        for layer in model.model.layers:
            if hasattr(layer.mlp, "gate"):
                layer.mlp.gate.e_score_correction_bias.normal_(0, 0.2)
    return model.eval()


def logits_of(model, x, ours: bool):
    with torch.no_grad():
        return model(x)[0] if ours else model(x).logits


@pytest.mark.parametrize("case", IMPORTS)
def test_imported_logits_equal_hf(case, tmp_path):
    hf = random_hf(**IMPORTS[case])
    model, _, cfg = load_model_for_inference(import_hf(hf_folder(tmp_path, hf), tmp_path / "ours"))
    m = cfg.model
    assert (m.arch, m.router, m.moe_every) == ("mla", "sigmoid", 1)
    c = hf.config
    topk_groups = c.topk_group if c.topk_group < c.n_group else 0  # 0: every group
    assert (m.expert_groups, m.topk_groups, m.routed_scale) == (c.n_group, topk_groups, c.routed_scaling_factor)
    x = ids()
    ours, theirs = logits_of(model, x, True), logits_of(hf, x, False)
    assert theirs.abs().max() > 1.0
    diff = (ours - theirs).abs().max().item()
    print(f"{case}: max |logits diff| {diff:.2e}")
    assert diff < 1e-4
    bias = model.layers[1].feed_forward.select_bias
    assert torch.equal(bias, hf.model.layers[1].mlp.gate.e_score_correction_bias)  # imported, not zeroed


EXPORTS = {
    "groups-q-lora": dict(q_lora_rank=10, expert_groups=4, topk_groups=2, routed_scale=2.5),
    "plain-bias": dict(bias=True, n_layer=2, moe_first_dense=0),
}
MLA = dict(arch="mla", n_layer=3, n_head=4, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6,
           n_experts=8, n_active_experts=2, n_shared_experts=1, expert_hidden=16, ffn_hidden=40, moe_first_dense=1,
           router="sigmoid", bias=False)


def mla_checkpoint(tmp_path, **fields):
    """A random arch=mla run folder (the tiny BPE), with non-zero selection biases (buffers)."""
    tok = tiny_bpe()
    cfg = Config(name="t", out_dir=str(tmp_path / "run"))
    cfg.tokenizer = TokenizerConfig(kind=tok.kind, vocab_size=tok.vocab_size, special_tokens=list(tok.special_tokens))
    cfg.model = model_config(**{**MLA, "block_size": 16, "n_embd": 32, **fields})
    cfg.model.vocab_size = padded_vocab(cfg.model, tok.vocab_size)
    torch.manual_seed(1)
    model = randomize(build_model(cfg.model), 1)
    with torch.no_grad():
        for _, layer in model.moe_layers():
            layer.select_bias.normal_(0, 0.2)
    save_checkpoint(tmp_path / "run", 0, model, torch.optim.AdamW(model.parameters()), cfg, tok,
                    {"best_val_loss": None})
    return tmp_path / "run", model.eval()


@pytest.mark.parametrize("case", EXPORTS)
def test_exported_model_loads_in_transformers_with_equal_logits(case, tmp_path):
    run, model = mla_checkpoint(tmp_path, **EXPORTS[case])
    out = export_hf(run, tmp_path / "hf")
    assert json.loads((out / "config.json").read_text())["rope_interleave"] is True
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == "DeepseekV3ForCausalLM"
    x = ids(vocab=model.config.vocab_size)
    ours = logits_of(model, x, True)
    assert ours.abs().max() > 1.0
    diff = (logits_of(hf, x, False) - ours).abs().max().item()
    print(f"export {case}: max |logits diff| {diff:.2e}")
    assert diff < 1e-4
    back, _, cfg = load_model_for_inference(import_hf(out, tmp_path / "back"))
    for field in ("kv_lora_rank", "q_lora_rank", "expert_groups", "topk_groups", "routed_scale", "moe_first_dense",
                  "n_shared_experts", "bias"):
        assert getattr(cfg.model, field) == getattr(model.config, field), field
    torch.testing.assert_close(logits_of(back, x, True), ours, atol=1e-6, rtol=0)


def test_refusals(tmp_path):
    hf = random_hf(norm_topk_prob=False)
    with pytest.raises(UserError, match="norm_topk_prob=False cannot be converted"):
        import_hf(hf_folder(tmp_path, hf), tmp_path / "ours")
    run, _ = mla_checkpoint(tmp_path / "mtp", mtp_depth=1)
    with pytest.raises(UserError, match="model.mtp_depth=1: HF's DeepseekV3ForCausalLM runs no MTP modules"):
        export_hf(run, tmp_path / "hf2")
