"""Bad input to `scratchlm convert`: each case is one UserError line naming the file, tensor or
field, and nothing is written."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from scratchlm.convert import convert, export_hf, import_hf
from scratchlm.errors import UserError
from scratchlm.tokenizer import CharTokenizer
from tests.helpers import VOCAB, hf_folder, our_checkpoint, randomize, tiny_bpe

transformers = pytest.importorskip("transformers")

GPT2 = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": VOCAB, "n_positions": 16,
        "n_embd": 32, "n_layer": 2, "n_head": 4}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": VOCAB, "hidden_size": 32,
         "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "max_position_embeddings": 16}


def refused(fn, *args, **kw) -> str:
    with pytest.raises(UserError) as e:
        fn(*args, **kw)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def config_only(tmp_path, fields: dict):
    src = tmp_path / "hf"
    src.mkdir()
    (src / "config.json").write_text(json.dumps(fields))
    tiny_bpe().save_hf(src)
    return src


# config fields our models cannot compute: (config.json, the words the message must contain)
INEXPRESSIBLE = {
    "gpt2-eps": ({**GPT2, "layer_norm_epsilon": 1e-6}, "layer_norm_epsilon=1e-06"),
    "gpt2-activation": ({**GPT2, "activation_function": "relu"}, "activation_function='relu'"),
    "gpt2-mlp-width": ({**GPT2, "n_inner": 100}, "n_inner=100"),
    "llama-activation": ({**LLAMA, "hidden_act": "gelu"}, "hidden_act='gelu'"),
    "llama-mlp-bias": ({**LLAMA, "mlp_bias": True}, "mlp_bias=True"),
    "qwen3-default-head-dim": ({**LLAMA, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"},
                               "head_dim=128"),  # Qwen3Config's default, absent from the file
    "llama3-rope": ({**LLAMA, "rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}},
                    "rope_parameters.rope_type='llama3'"),
    "dynamic-ntk-old-spelling": ({**LLAMA, "rope_scaling": {"type": "dynamic", "factor": 2.0}},
                                 "rope_scaling.type='dynamic'"),
    "yarn-attention-factor": ({**LLAMA, "rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                            "attention_factor": 2.0}}, "attention_factor=2.0"),
    "yarn-beta": ({**LLAMA, "rope_parameters": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 16}},
                  "beta_fast=16"),
    "partial-rotary": ({**LLAMA, "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5"),
    "qwen2-window-on-some-layers": ({**LLAMA, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
                                     "use_sliding_window": True, "sliding_window": 4, "max_window_layers": 1},
                                    "max_window_layers=1"),
}


@pytest.mark.parametrize("case", INEXPRESSIBLE)
def test_inexpressible_config_names_the_field(case, tmp_path):
    fields, words = INEXPRESSIBLE[case]
    msg = refused(import_hf, config_only(tmp_path, fields), tmp_path / "out")
    assert words in msg and "config.json" in msg
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture_lists_the_supported(tmp_path):
    src = config_only(tmp_path, {"architectures": ["BertForMaskedLM"], "model_type": "bert"})
    msg = refused(import_hf, src, tmp_path / "out")
    assert "'BertForMaskedLM' is not supported" in msg
    for arch in ("GPT2LMHeadModel", "LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM"):
        assert arch in msg


def test_missing_folder_config_weights_and_tokenizer(tmp_path):
    assert "no such folder" in refused(import_hf, tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    assert "no config.json" in refused(import_hf, tmp_path / "empty", tmp_path / "out")
    src = config_only(tmp_path, GPT2)
    assert "no weights" in refused(import_hf, src, tmp_path / "out")
    (src / "tokenizer.json").unlink()
    msg = refused(import_hf, src, tmp_path / "out")
    assert "no tokenizer.json or vocab.json + merges.txt" in msg and "--tokenizer" in msg
    (src / "config.json").write_text("{not json")
    assert "not valid JSON" in refused(import_hf, src, tmp_path / "out")


@pytest.fixture
def gpt2_folder(tmp_path):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(**{k: v for k, v in GPT2.items() if k not in ("architectures", "model_type")})
    return hf_folder(tmp_path, randomize(transformers.GPT2LMHeadModel(cfg), seed=0))


def edit_weights(src, fn) -> None:
    sd = load_file(str(src / "model.safetensors"))
    fn(sd)
    save_file(sd, str(src / "model.safetensors"), metadata={"format": "pt"})


def test_missing_tensor_is_named(gpt2_folder, tmp_path):
    edit_weights(gpt2_folder, lambda sd: sd.pop("transformer.h.1.mlp.c_fc.weight"))
    msg = refused(import_hf, gpt2_folder, tmp_path / "out")
    assert "missing tensors transformer.h.1.mlp.c_fc.weight" in msg and "model.safetensors" in msg


def test_unexpected_tensor_is_named(gpt2_folder, tmp_path):
    edit_weights(gpt2_folder, lambda sd: sd.update({"transformer.h.2.ln_1.weight": torch.ones(32)}))
    assert "unexpected tensors transformer.h.2.ln_1.weight" in refused(import_hf, gpt2_folder, tmp_path / "out")


def test_shape_mismatch_names_the_tensor_and_both_shapes(gpt2_folder, tmp_path):
    fields = json.loads((gpt2_folder / "config.json").read_text())
    (gpt2_folder / "config.json").write_text(json.dumps({**fields, "n_positions": 20}))
    msg = refused(import_hf, gpt2_folder, tmp_path / "out")
    assert "transformer.wpe.weight has shape (16, 32), config.json implies (20, 32)" in msg


def test_truncated_weights(gpt2_folder, tmp_path):
    data = (gpt2_folder / "model.safetensors").read_bytes()
    (gpt2_folder / "model.safetensors").write_bytes(data[: len(data) // 2])
    assert "unreadable weights" in refused(import_hf, gpt2_folder, tmp_path / "out")


def test_tokenizer_larger_than_the_vocab(tmp_path):
    src = config_only(tmp_path, {**GPT2, "vocab_size": 100})
    assert "the tokenizer has 280 tokens but config.json vocab_size=100" in refused(import_hf, src, tmp_path / "o")


def test_nonzero_o_proj_bias_is_refused(tmp_path):
    cfg = transformers.Qwen3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=8, attention_bias=True)
    src = hf_folder(tmp_path, randomize(transformers.Qwen3ForCausalLM(cfg), seed=0))
    msg = refused(import_hf, src, tmp_path / "out")
    assert "model.layers.0.self_attn.o_proj.bias is not zero" in msg


def test_cli_level_mistakes(gpt2_folder, tmp_path):
    assert "nothing to convert" in refused(convert, gpt2_folder, tmp_path / "o", src_format="hf", dst_format="hf")
    assert "--tokenizer applies to --from hf only" in refused(
        convert, gpt2_folder, tmp_path / "o", src_format="scratchlm", dst_format="hf", tokenizer="t.json")
    assert "inside it" in refused(import_hf, gpt2_folder, gpt2_folder / "sub")


@pytest.mark.parametrize("fields,words", [
    (dict(arch="bigram"), "model.arch='bigram' has no HF transformers counterpart"),
    (dict(arch="gpt", bias=False), "model.bias=false"),
    (dict(arch="gpt", pos_emb="sinusoidal"), "model.pos_emb='sinusoidal'"),
    (dict(arch="gpt", sliding_window=4), "model.sliding_window=4"),
])
def test_export_refusals(fields, words, tmp_path):
    run, _, _ = our_checkpoint(tmp_path, **fields)
    assert words in refused(export_hf, run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_non_bpe_tokenizer_exports_the_model_only(tmp_path, capsys, monkeypatch):
    import tests.helpers as helpers

    chars = sorted(set(helpers.TEXT))
    monkeypatch.setattr(helpers, "tiny_bpe", lambda: CharTokenizer(chars, {"<|endoftext|>": len(chars)}))
    run, _, _ = our_checkpoint(tmp_path, arch="gpt")
    out = export_hf(run, tmp_path / "hf")
    assert "no tokenizer: the char tokenizer has no HF export" in capsys.readouterr().out
    assert not (out / "tokenizer.json").exists()
    assert transformers.AutoModelForCausalLM.from_pretrained(out).config.vocab_size == 64
