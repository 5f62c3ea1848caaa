"""The sft stage end to end on a tiny model: full fine-tuning, LoRA, QLoRA, gold evaluation files,
loading the result for inference, and base + adapters through the verbs (sample, chat, convert, merge)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from scratchlm.checkpoint import find_checkpoint, load_config_and_tokenizer, load_model_for_inference, merge_adapters
from scratchlm.cli import main
from scratchlm.config import Config, get_preset
from scratchlm.errors import UserError
from scratchlm.sft import train as sft_train
from scratchlm.sft.train import sft
from scratchlm.tokenizer.chat import CHAT_SPECIALS
from tests.helpers import tiny_llama_base


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    # No chat specials and no vocabulary padding: sft adds the 4 chat tokens and grows the embedding
    # from 257 to 261 rows, which LoRA's adapters must then carry.
    return tiny_llama_base(tmp_path_factory.mktemp("sftbase"), 96, pad_vocab_to=1)


real_adapt_model = sft_train.adapt_model


def sft_cfg(base, out, **sft_kw) -> Config:
    cfg = get_preset("sft-tiny")
    cfg.out_dir, cfg.sft.base, cfg.sft.n_tasks = str(out), str(base), 60
    t = cfg.train
    t.max_steps, t.batch_size, t.eval_interval, t.eval_iters, t.tensorboard, t.warmup_steps = 6, 4, 6, 1, False, 2
    t.precision = "fp32"  # the tests compare numbers: "auto" may choose bf16 on some CPUs
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


@pytest.fixture(scope="module")
def lora_runs(base_run, tmp_path_factory):
    """LoRA (only the chat rows of the embedding train beside it) and QLoRA (the whole embedding),
    each with a snapshot of its full state right after the adapters were applied, before step 1."""
    runs = {}
    for name, kw in {"lora": dict(quant_bits=0, lora_embedding="chat"),
                     "qlora": dict(quant_bits=4, lora_embedding="all")}.items():
        out = tmp_path_factory.mktemp("sft") / name
        start: dict[str, torch.Tensor] = {}

        def spy(model, cfg, tok=None, start=start):
            wrapped = real_adapt_model(model, cfg, tok)
            if tok is not None:  # the training call (inference builds the structure without a tokenizer)
                start.update({k: v.clone() for k, v in model.state_dict().items()})
            return wrapped

        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(sft_train, "adapt_model", spy)
            sft(sft_cfg(base_run, out, lora_r=4, lora_targets=["wq", "wv", "w1", "w2", "w3"], **kw), progress=False)
        runs[name] = (out, start)
    return runs


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_lora_and_qlora_train_only_adapters(base_run, lora_runs, name):
    out, start = lora_runs[name]
    final = load_model_for_inference(out)[0].state_dict()  # tied tensors under both names, as in `start`
    base = load_model_for_inference(base_run)[0].state_dict()
    _, tok = load_config_and_tokenizer(find_checkpoint(out))
    chat = sorted(tok.special_tokens[t] for t in CHAT_SPECIALS)
    assert chat == [257, 258, 259, 260]  # appended: the base had 257 tokens
    adapters = [k for k in start if ".lora_" in k]
    assert len(adapters) == 2 * 5 * 2  # A and B of 5 targets in 2 layers
    for k in adapters:  # every adapter tensor moved (B from 0, A once B was non-zero)
        assert not torch.equal(final[k], start[k]), k
    emb = "tok_embeddings.weight"  # tied: output.weight is the same tensor
    assert set(final) == set(start) and torch.equal(final["output.weight"], final[emb])
    for k in set(start) - set(adapters) - {emb, "output.weight"}:  # every frozen tensor, bit for bit
        assert torch.equal(final[k], start[k]), k
    compared = 0
    for k, v in base.items():  # ... and they are the base's weights (QLoRA: those it did not quantize)
        key = k if k in start else k.replace(".weight", ".base.weight")
        if k not in (emb, "output.weight") and key in start:
            assert torch.equal(start[key], v), k
            compared += 1
    assert compared == (2 * (7 + 2) + 1 if name == "lora" else 2 * 2 + 1)  # linears, norms, final norm
    moved = (final[emb] != start[emb]).any(dim=1).nonzero().flatten().tolist()
    # Tied, every row gets a gradient through the output softmax, so every trained row moves.
    if name == "lora":  # only the chat markers' rows
        assert moved == chat
        assert torch.equal(start[emb][:257], base[emb])
    else:  # the whole embedding
        assert moved == list(range(261))
    if name == "qlora":  # the saved file holds every projection of the frozen base as int4 codes, two per byte
        saved = load_file(str(find_checkpoint(out) / "model.safetensors"))
        linears = [k[: -len(".qweight")] for k in saved if k.endswith(".qweight")]
        assert len(linears) == 2 * 7 and not any(k.endswith((".wq.base.weight", ".wo.weight")) for k in saved)
        for layer in linears:
            w = base[layer.replace(".base", "") + ".weight"]
            n_out, groups = w.size(0), -(-w.size(1) // 64)  # inputs padded up to whole groups of 64
            assert saved[layer + ".qweight"].dtype == torch.uint8
            assert saved[layer + ".qweight"].shape == (n_out, groups * 64 // 2)
            assert saved[layer + ".scales"].dtype == torch.float16 and saved[layer + ".scales"].shape == (n_out, groups)

    record = json.loads((out / "adapters.json").read_text())
    assert (out / "adapters.safetensors").is_file()
    assert record["r"] == 4 and record["quant_bits"] == (4 if name == "qlora" else 0)
    assert record["base_vocab_size"] == 257 and record["vocab_size"] == 261
    assert record["added_tokens"] == {"<|system|>": 257, "<|user|>": 258, "<|assistant|>": 259, "<|end|>": 260}
    assert record["token_ids"] == (chat if name == "lora" else list(range(261)))


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_base_plus_adapters_is_the_fine_tuned_model_and_merges(base_run, lora_runs, name, tmp_path):
    out, _ = lora_runs[name]
    tuned, tuned_tok, _ = load_model_for_inference(out)
    model, tok, cfg = load_model_for_inference(base_run, adapters=out / "adapters.safetensors")
    assert tok.to_dict() == tuned_tok.to_dict() and cfg.model.vocab_size == 261
    idx = torch.tensor([[258, 72, 105, 260, 259, 33, 7, 256]])
    with torch.no_grad():
        ref, got = tuned(idx)[0], model(idx)[0]
    torch.testing.assert_close(got, ref, rtol=0, atol=0)  # same structure, weights and operations: bit for bit

    merge_adapters(base_run, out / "adapters.json", tmp_path / "merged")
    merged, merged_tok, merged_cfg = load_model_for_inference(tmp_path / "merged")
    assert merged_cfg.sft.lora_r == 0 and merged_tok.to_dict() == tok.to_dict()
    assert not any(".lora_" in k or "qweight" in k for k in merged.state_dict())
    with torch.no_grad():  # fp32, logits of magnitude ~5: merging reorders a few sums of 32-128 terms
        torch.testing.assert_close(merged(idx)[0], ref, rtol=1e-5, atol=1e-4)


def test_adapter_verbs_and_a_mismatched_base(base_run, lora_runs, tmp_path, capsys):
    out, _ = lora_runs["lora"]
    adapters = str(out / "adapters.safetensors")
    greedy = ["--prompt", "ab", "--sample.max_new_tokens=6", "--sample.temperature=0", "--sample.stream=false"]
    assert main(["sample", "--ckpt", str(out), *greedy]) == 0
    tuned = capsys.readouterr().out
    assert main(["sample", "--ckpt", str(base_run), "--adapters", adapters, *greedy]) == 0
    assert capsys.readouterr().out == tuned
    assert main(["merge", "--base", str(base_run), "--adapters", adapters, "--out", str(tmp_path / "m")]) == 0
    assert main(["sample", "--ckpt", str(tmp_path / "m"), *greedy]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == tuned.splitlines()[-1]
    assert main(["merge", "--base", str(base_run), "--adapters", adapters, "--out", str(tmp_path / "m")]) == 2
    assert "exists" in capsys.readouterr().err  # never replaced without --overwrite
    # an HF export of base + adapters is the export of the merged checkpoint
    assert main(["convert", str(base_run), str(tmp_path / "hf1"), "--from", "scratchlm", "--to", "hf",
                 "--adapters", adapters]) == 0
    assert main(["convert", str(tmp_path / "m"), str(tmp_path / "hf2"), "--from", "scratchlm", "--to", "hf"]) == 0
    hf1, hf2 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hf1", "hf2"))
    assert hf1.keys() == hf2.keys() and all(torch.equal(hf1[k], hf2[k]) for k in hf1)

    other = tmp_path / "other"  # the base with one weight nudged: another base
    shutil.copytree(find_checkpoint(base_run), other)
    weights = load_file(str(other / "model.safetensors"))
    weights["norm.weight"] = weights["norm.weight"] + 1e-3
    save_file(weights, str(other / "model.safetensors"))
    capsys.readouterr()
    for verb in (["sample", "--ckpt", str(other)], ["chat", "--ckpt", str(other)],
                 ["convert", str(other), str(tmp_path / "hf3"), "--from", "scratchlm", "--to", "hf"]):
        assert main([*verb, "--adapters", adapters]) == 2, verb
        err = capsys.readouterr().err
        assert "another base model (fingerprint mismatch)" in err and "Traceback" not in err, verb
    assert main(["merge", "--base", str(other), "--adapters", adapters, "--out", str(tmp_path / "m2")]) == 2
    assert "fingerprint mismatch" in capsys.readouterr().err and not (tmp_path / "m2").exists()
    assert main(["sample", "--ckpt", str(out), "--adapters", adapters]) == 2  # a LoRA run is no base
    assert "already" in capsys.readouterr().err


def test_sft_errors(tmp_path, base_run):
    cfg = sft_cfg(base_run, tmp_path / "x")
    cfg.sft.base = ""
    with pytest.raises(UserError, match="sft.base is not set"):
        sft(cfg, progress=False)
    with pytest.raises(UserError, match="quant_bits needs LoRA"):
        sft(sft_cfg(base_run, tmp_path / "y", quant_bits=4), progress=False)
    with pytest.raises(UserError, match="matches nothing|match"):
        sft(sft_cfg(base_run, tmp_path / "z", lora_r=4, lora_targets=["nothing_here"]), progress=False)


def test_lora_defaults_learn_where_the_adapters_alone_did_not(base_run, tmp_path):
    """Issue 10 item 18: LoRA at the full fine-tuning learning rate with the embedding frozen (the
    old behaviour) barely moved the loss; the defaults (adapters at lr x5, the embedding trained at
    x2) learn. bench/sft.py measures the held-out exact match; here the validation loss after 6 steps."""
    old = sft(sft_cfg(base_run, tmp_path / "old", lora_r=4, lora_embedding="none", lora_lr_mult=1.0), progress=False)
    new = sft(sft_cfg(base_run, tmp_path / "new", lora_r=4), progress=False)
    # measured 5.17 vs 5.52 (fp32); the margin leaves room for other CPUs' rounding, not for no learning
    assert new.run.val_loss < old.run.val_loss - 0.15, (new.run.val_loss, old.run.val_loss)
