"""scratchlm -> HF: random GPT and Llama-family checkpoints exported, loaded by AutoModelForCausalLM
and AutoTokenizer with no custom code, and compared with our model; then imported back."""

from __future__ import annotations

import pytest
import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.config import RopeConfig
from scratchlm.convert import convert, export_hf, import_hf
from tests.helpers import TEXT, assert_logits_close, ids, our_checkpoint

transformers = pytest.importorskip("transformers")

# name -> (our ModelConfig fields, the HF class the export must pick)
CASES = {
    "gpt-tied": (dict(arch="gpt"), "GPT2LMHeadModel"),
    "gpt-untied": (dict(arch="gpt", tie_embeddings=False), "GPT2LMHeadModel"),
    "llama-gqa-theta500k-ntk": (dict(arch="llama", bias=False, n_kv_head=2, tie_embeddings=False,
                                     rope=RopeConfig(theta=5e5, scaling="ntk", factor=4.0)), "LlamaForCausalLM"),
    "llama-linear": (dict(arch="llama", bias=False, rope=RopeConfig(scaling="linear", factor=2.0)),
                     "LlamaForCausalLM"),
    "mistral-window5": (dict(arch="llama", bias=False, n_kv_head=1, sliding_window=5), "MistralForCausalLM"),
    "qwen2-qkv-bias-yarn": (dict(arch="llama", bias=True, n_kv_head=2,
                                 rope=RopeConfig(scaling="yarn", factor=4.0, original_context=4)), "Qwen2ForCausalLM"),
    "qwen2-window5": (dict(arch="llama", bias=True, sliding_window=5), "Qwen2ForCausalLM"),
    "qwen3-qk-norm": (dict(arch="llama", bias=False, qk_norm=True, ffn_hidden=40), "Qwen3ForCausalLM"),
    "qwen3-qk-norm-bias-window5": (dict(arch="llama", bias=True, qk_norm=True, sliding_window=5),
                                   "Qwen3ForCausalLM"),
}


def logits(model, x: torch.Tensor, hf: bool) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits if hf else model(x)[0]


@pytest.mark.parametrize("case", CASES)
def test_exported_model_loads_in_transformers_with_equal_logits(case, tmp_path):
    fields, hf_class = CASES[case]
    run, model, tok = our_checkpoint(tmp_path, seed=1, **fields)
    out = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf).__name__ == hf_class
    V = model.config.vocab_size
    assert hf.config.vocab_size == V > tok.vocab_size  # the padded size (287 tokens -> 320 rows)
    x = ids(vocab=V)
    ours = logits(model.eval(), x, hf=False)
    assert_logits_close(logits(hf, x, hf=True), ours)

    # and back: the HF folder imports to the same model
    back, _, cfg = load_model_for_inference(import_hf(out, tmp_path / "back"))
    assert cfg.model.arch == model.config.arch
    torch.testing.assert_close(logits(back, x, hf=False), ours, atol=1e-6, rtol=0)


def test_exported_tokenizer_encodes_like_ours(tmp_path):
    run, _, tok = our_checkpoint(tmp_path, arch="gpt")
    out = convert(run, tmp_path / "hf", src_format="scratchlm", dst_format="hf")
    auto = transformers.AutoTokenizer.from_pretrained(out)
    for text in ["The quick brown fox can't jump 32.5 feet, naïvely!", TEXT[:200], "  spaces\n\nand ünïcödé 🙂"]:
        assert auto.encode(text, add_special_tokens=False) == tok.encode(text)
        assert auto.decode(tok.encode(text)) == text
    assert auto.convert_tokens_to_ids("<|endoftext|>") == tok.eot_id


def test_hf_generate_on_the_export_matches_our_greedy_choice(tmp_path):
    run, model, _ = our_checkpoint(tmp_path, seed=2, arch="llama", bias=False, sliding_window=4)
    hf = transformers.AutoModelForCausalLM.from_pretrained(export_hf(run, tmp_path / "hf")).eval()
    seq = ids(5, vocab=model.config.vocab_size)[:1, :4]
    want = hf.generate(seq, max_new_tokens=8, do_sample=False, eos_token_id=None, pad_token_id=0)
    for _ in range(8):
        seq = torch.cat([seq, logits(model.eval(), seq, hf=False)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert seq.tolist() == want.tolist()
