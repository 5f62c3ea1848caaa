"""Checkpoint saving and loading: pruning never touches other runs' steps, NaN/inf weights are refused."""

from __future__ import annotations

import pytest
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scratchlm.checkpoint import folder as ckpt_io
from scratchlm.config import Config, GPTConfig
from scratchlm.errors import UserError
from scratchlm.model.gpt import GPT
from scratchlm.tokenizer import ByteTokenizer


def tiny() -> tuple[Config, GPT, torch.optim.Optimizer]:
    cfg = Config()
    cfg.model = GPTConfig(vocab_size=320, block_size=8, n_layer=1, n_head=2, n_embd=16)
    torch.manual_seed(0)
    model = GPT(cfg.model)
    return cfg, model, torch.optim.AdamW(model.parameters())


def save(run, step, keep_last=2):
    cfg, model, opt = tiny()
    return ckpt_io.save_checkpoint(run, step, model, opt, cfg, ByteTokenizer({"<|endoftext|>": 256}),
                                   {"best_val_loss": None}, keep_last=keep_last)


def steps(run) -> list[str]:
    return sorted(p.name for p in (run / "ckpt").glob("step_*"))


def test_pruning_keeps_the_new_checkpoint_and_later_steps(tmp_path):
    run = tmp_path / "run"
    for s in (100, 200):  # what an earlier run with more steps left behind
        save(run, s)
    save(run, 10)
    # The old code sorted every step_* and kept the newest two: it deleted step 10, just written.
    assert steps(run) == ["step_0000010", "step_0000100", "step_0000200"]
    assert ckpt_io.find_checkpoint(run).name == "step_0000010"
    for s in (20, 30):
        save(run, s)
    assert steps(run) == ["step_0000020", "step_0000030", "step_0000100", "step_0000200"]
    save(run, 40, keep_last=1)
    assert steps(run)[0] == "step_0000040" and "step_0000030" not in steps(run)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_weights_holding_nan_or_inf_are_refused_naming_the_tensor(tmp_path, bad):
    ckpt = save(tmp_path / "run", 1)
    tensors = load_file(str(ckpt / "model.safetensors"))
    name = "h.0.mlp.c_fc.weight"
    tensors[name][3, 5] = bad
    save_file(tensors, str(ckpt / "model.safetensors"))
    _, model, _ = tiny()
    with pytest.raises(UserError, match=rf"tensor {name} holds 1 NaN/inf value\(s\) of 1024.*earlier checkpoint"):
        ckpt_io.load_weights(model, ckpt)
    with pytest.raises(UserError, match=name):
        ckpt_io.load_model_for_inference(tmp_path / "run")


def test_a_failed_write_is_an_os_error_naming_the_checkpoint(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    monkeypatch.setattr(ckpt_io, "save_file", full_disk)
    with pytest.raises(OSError, match="No space left on device") as e:
        save(tmp_path / "run", 3)
    assert e.value.filename == str(tmp_path / "run" / "ckpt" / "step_0000003")
    assert list((tmp_path / "run" / "ckpt").iterdir()) == []  # no temporary left, no `latest`
