"""The sft stage end to end on a tiny model: full fine-tuning, LoRA, QLoRA, gold evaluation files,
and loading the result for inference."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.config import Config, ModelConfig, get_preset
from scratchlm.data.prepare import prepare
from scratchlm.errors import UserError
from scratchlm.sft.train import sft
from scratchlm.tokenizer import ByteTokenizer
from scratchlm.train.checkpoint import load_model_for_inference
from scratchlm.train.pretrain import pretrain
from tests.data.conftest import make_docs, write_corpus


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("sftbase")
    cfg = Config()
    cfg.data.workers = 1
    specials = {"<|endoftext|>": 256, "<|system|>": 257, "<|user|>": 258, "<|assistant|>": 259, "<|end|>": 260}
    prepare([str(write_corpus(root / "c", make_docs(30, seed=2)))], ByteTokenizer(specials), cfg, root / "data",
            progress=False)
    cfg.out_dir = str(root / "base")
    cfg.model = ModelConfig(arch="llama", block_size=96, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, bias=False)
    t = cfg.train
    t.max_steps, t.batch_size, t.eval_interval, t.eval_iters, t.tensorboard, t.log_interval = 4, 4, 4, 1, False, 2
    pretrain(cfg, root / "data", progress=False)
    return root / "base"


def sft_cfg(base, out, **sft_kw) -> Config:
    cfg = get_preset("sft-tiny")
    cfg.out_dir, cfg.sft.base, cfg.sft.n_tasks = str(out), str(base), 60
    t = cfg.train
    t.max_steps, t.batch_size, t.eval_interval, t.eval_iters, t.tensorboard, t.warmup_steps = 6, 4, 6, 1, False, 2
    cfg.sft.eval_max_new_tokens = 4
    for k, v in sft_kw.items():
        setattr(cfg.sft, k, v)
    return cfg


def test_full_sft_writes_answers_and_scores(base_run, tmp_path):
    result = sft(sft_cfg(base_run, tmp_path / "full"), progress=False)
    assert set(result.scores) == {"base", "sft"} and "all" in result.scores["sft"]
    rows = [json.loads(x) for x in (tmp_path / "full" / "eval" / "answers_sft.jsonl").read_text().splitlines()]
    assert len(rows) == 6 and {"gold", "generated", "exact", "f1", "rouge_l", "checked", "family"} <= set(rows[0])
    model, tok, cfg = load_model_for_inference(tmp_path / "full")
    assert "<|assistant|>" in tok.special_tokens and cfg.model.arch == "llama"


@pytest.mark.parametrize("quant_bits", [0, 4])
def test_lora_and_qlora_train_only_adapters(base_run, tmp_path, quant_bits):
    out = tmp_path / f"lora{quant_bits}"
    sft(sft_cfg(base_run, out, lora_r=4, quant_bits=quant_bits, lora_targets=["wq", "wv", "w1", "w2", "w3"]),
        progress=False)
    assert (out / "adapters.safetensors").exists()
    model, _, _ = load_model_for_inference(out)  # rebuilds the LoRA (and quantized) structure from config.json
    base, _, _ = load_model_for_inference(base_run)
    lora_names = [n for n, _ in model.named_parameters() if "lora_" in n]
    assert lora_names
    # The untouched tensors equal the base model's: the embedding, and the norms.
    torch.testing.assert_close(model.tok_embeddings.weight, base.tok_embeddings.weight)
    torch.testing.assert_close(model.norm.weight, base.norm.weight)


def test_sft_errors(tmp_path, base_run):
    cfg = sft_cfg(base_run, tmp_path / "x")
    cfg.sft.base = ""
    with pytest.raises(UserError, match="sft.base is not set"):
        sft(cfg, progress=False)
    with pytest.raises(UserError, match="quant_bits needs LoRA"):
        sft(sft_cfg(base_run, tmp_path / "y", quant_bits=4), progress=False)
    with pytest.raises(UserError, match="matches nothing|match"):
        sft(sft_cfg(base_run, tmp_path / "z", lora_r=4, lora_targets=["nothing_here"]), progress=False)
