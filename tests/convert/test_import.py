"""HF -> scratchlm: tiny random HF models of every supported family, saved locally, imported,
and compared logit by logit (and by greedy generation) with the HF model itself."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.cli import main
from scratchlm.config import RopeConfig
from scratchlm.convert import import_hf
from tests.helpers import VOCAB, assert_logits_close, hf_folder, ids, randomize, tiny_bpe

transformers = pytest.importorskip("transformers")

SIZES = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-5)


def gpt2(**kw):
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_positions=16, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, **kw)
    return transformers.GPT2LMHeadModel(cfg)


def llama(**kw):
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**SIZES, **kw}))


def mistral(**kw):
    return transformers.MistralForCausalLM(transformers.MistralConfig(**{**SIZES, **kw}))


def qwen2(**kw):
    return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**{**SIZES, **kw}))


def qwen3(**kw):
    return transformers.Qwen3ForCausalLM(transformers.Qwen3Config(**{**SIZES, "head_dim": 8, **kw}))


def qwen3_with_zero_o_bias():
    model = randomize(qwen3(attention_bias=True), seed=1)
    for layer in model.model.layers:
        torch.nn.init.zeros_(layer.self_attn.o_proj.bias)
    return model


# name -> (HF model factory, the ModelConfig fields the import must produce)
CASES = {
    "gpt2": (gpt2, dict(arch="gpt", tie_embeddings=True, bias=True)),
    "gpt2-untied": (lambda: gpt2(tie_word_embeddings=False), dict(tie_embeddings=False)),
    "llama-gqa-theta500k-linear": (
        lambda: llama(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500000.0}),
        dict(arch="llama", n_kv_head=2, tie_embeddings=False,
             rope=RopeConfig(theta=500000.0, scaling="linear", factor=2.0))),
    "llama-tied-yarn": (
        lambda: llama(tie_word_embeddings=True, max_position_embeddings=32,
                      rope_parameters={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8}),
        dict(tie_embeddings=True, rope=RopeConfig(scaling="yarn", factor=4.0, original_context=8))),
    "mistral-window4": (lambda: mistral(sliding_window=4), dict(sliding_window=4, bias=False)),
    "qwen2-qkv-bias-window5": (lambda: qwen2(use_sliding_window=True, sliding_window=5, max_window_layers=0),
                               dict(bias=True, sliding_window=5)),
    "qwen2-no-window": (qwen2, dict(bias=True, sliding_window=0)),
    "qwen3-qk-norm": (qwen3, dict(qk_norm=True, bias=False)),
    "qwen3-attention-bias": (qwen3_with_zero_o_bias, dict(qk_norm=True, bias=True)),
}


def hf_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x).logits


def our_logits(model, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)[0]


@pytest.mark.parametrize("case", CASES)
def test_imported_logits_equal_hf(case, tmp_path):
    make, expect = CASES[case]
    torch.manual_seed(0)
    hf = randomize(make(), seed=1) if case != "qwen3-attention-bias" else make()
    dst = import_hf(hf_folder(tmp_path, hf), tmp_path / "ours")
    model, tok, cfg = load_model_for_inference(dst)
    for field, value in expect.items():
        assert getattr(cfg.model, field) == value, field
    assert cfg.model.vocab_size == VOCAB  # HF's size exactly, no padding
    x = ids()
    assert_logits_close(our_logits(model, x), hf_logits(hf, x))


@pytest.mark.parametrize("case", ["gpt2", "mistral-window4"])
def test_greedy_generation_equals_hf_generate(case, tmp_path):
    """HF's generate (with its KV cache and, for Mistral, the window over the cache) against
    our model run on the whole sequence at every step."""
    torch.manual_seed(0)
    hf = randomize(CASES[case][0](), seed=2)
    model, _, _ = load_model_for_inference(import_hf(hf_folder(tmp_path, hf), tmp_path / "ours"))
    prompt = ids(3)[:1, :5]
    want = hf.generate(prompt, max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0)
    seq = prompt
    for _ in range(10):
        seq = torch.cat([seq, our_logits(model, seq)[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert seq.tolist() == want.tolist()


def test_transformers4_style_sparse_config(tmp_path):
    """A config.json in the 4.x spelling (rope_theta + rope_scaling {"type": ...}) that leaves
    default-valued fields out (here rms_norm_eps, 1e-6 by LlamaConfig's default)."""
    torch.manual_seed(0)
    hf = randomize(llama(rms_norm_eps=1e-6, num_key_value_heads=4,
                         rope_parameters={"rope_type": "linear", "factor": 3.0, "rope_theta": 20000.0}), seed=4)
    src = hf_folder(tmp_path, hf)
    fields = json.loads((src / "config.json").read_text())
    for key in ("rope_parameters", "rms_norm_eps", "num_key_value_heads", "head_dim", "tie_word_embeddings"):
        fields.pop(key)
    fields.update(rope_theta=20000.0, rope_scaling={"type": "linear", "factor": 3.0})
    (src / "config.json").write_text(json.dumps(fields))
    model, _, cfg = load_model_for_inference(import_hf(src, tmp_path / "ours"))
    assert (cfg.model.norm_eps, cfg.model.rope.theta, cfg.model.rope.factor) == (1e-6, 20000.0, 3.0)
    x = ids()
    assert_logits_close(our_logits(model, x), hf_logits(hf, x))


@pytest.mark.parametrize("layout", ["sharded-safetensors", "pytorch_model.bin", "bin-without-prefix"])
def test_other_weight_layouts(layout, tmp_path):
    torch.manual_seed(0)
    hf = randomize(gpt2(), seed=5)
    if layout == "sharded-safetensors":
        src = hf_folder(tmp_path, hf, max_shard_size="20KB")
        assert (src / "model.safetensors.index.json").is_file()
    else:
        src = hf_folder(tmp_path, hf)
        (src / "model.safetensors").unlink()
        sd = hf.state_dict()
        if layout == "bin-without-prefix":  # as in OpenAI's GPT-2 upload: no "transformer.", mask buffers
            sd = {k.removeprefix("transformer."): v for k, v in sd.items() if k != "lm_head.weight"}
            for i in range(2):
                sd[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 16, 16))
                sd[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
        torch.save(sd, src / "pytorch_model.bin")
    model, _, _ = load_model_for_inference(import_hf(src, tmp_path / "ours"))
    x = ids()
    assert_logits_close(our_logits(model, x), hf_logits(hf, x))


@pytest.mark.parametrize("which", ["scratchlm-file", "hf-tokenizer-json"])
def test_tokenizer_flag(which, tmp_path):
    """--tokenizer: a scratchlm tokenizer file, or an HF tokenizer.json kept elsewhere."""
    torch.manual_seed(0)
    src = hf_folder(tmp_path, randomize(gpt2(), seed=7))
    flag = tmp_path / "tok" / "tokenizer.json"
    flag.parent.mkdir()
    if which == "scratchlm-file":
        tiny_bpe().save(flag)
    else:
        shutil.copy(src / "tokenizer.json", flag)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (src / name).unlink()
    _, tok, _ = load_model_for_inference(import_hf(src, tmp_path / "ours", tokenizer=flag))
    assert tok.encode("The quick brown fox") == tiny_bpe().encode("The quick brown fox")


def test_cli_convert_then_sample(tmp_path, capsys):
    torch.manual_seed(0)
    src = hf_folder(tmp_path, randomize(llama(), seed=6))
    dst = tmp_path / "ours"
    assert main(["convert", str(src), str(dst), "--from", "hf", "--to", "scratchlm"]) == 0
    assert f"wrote {dst}" in capsys.readouterr().out
    # converting again replaces our own earlier output when asked ...
    assert main(["convert", str(src), str(dst), "--from", "hf", "--to", "scratchlm"]) == 2
    assert main(["convert", str(src), str(dst), "--from", "hf", "--to", "scratchlm", "--overwrite"]) == 0
    assert main(["sample", "--ckpt", str(dst), "--prompt", "The quick", "--sample.max_new_tokens=4",
                 "--sample.stream=false", "--device", "cpu"]) == 0
    # ... but never a folder it did not write
    shutil.rmtree(dst)
    dst.mkdir()
    (dst / "notes.txt").write_text("mine")
    assert main(["convert", str(src), str(dst), "--from", "hf", "--to", "scratchlm", "--overwrite"]) == 2
    assert "not written by `scratchlm convert`" in capsys.readouterr().err
    assert (dst / "notes.txt").read_text() == "mine"
