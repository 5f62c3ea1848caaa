"""Learning-rate schedules (pure functions) and AdamW parameter groups."""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.config import GPTConfig, TrainConfig
from scratchlm.errors import UserError
from scratchlm.model.gpt import GPT
from scratchlm.train.optim import make_optimizer, param_groups
from scratchlm.train.schedule import lr_at


def test_cosine_schedule_points():
    t = TrainConfig(lr=1.0, min_lr=0.1, warmup_steps=10, max_steps=110, schedule="cosine")
    assert lr_at(0, t) == pytest.approx(0.1)  # (0 + 1) / 10
    assert lr_at(9, t) == pytest.approx(1.0)
    assert lr_at(10, t) == pytest.approx(1.0)
    assert lr_at(60, t) == pytest.approx(0.55)  # halfway down the cosine: min + (max - min) / 2
    assert lr_at(110, t) == pytest.approx(0.1)
    assert lr_at(500, t) == pytest.approx(0.1)  # stays at min_lr past the end
    values = [lr_at(s, t) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:]))  # monotone decay


def test_wsd_and_constant_schedules():
    t = TrainConfig(lr=1.0, min_lr=0.0, warmup_steps=10, max_steps=100, schedule="wsd", decay_frac=0.2)
    assert lr_at(5, t) == pytest.approx(0.6)
    assert lr_at(50, t) == 1.0 and lr_at(79, t) == 1.0  # stable phase
    assert lr_at(90, t) == pytest.approx(0.5)  # halfway through the linear decay
    assert lr_at(100, t) == pytest.approx(0.0)
    c = TrainConfig(lr=0.3, warmup_steps=0, schedule="constant")
    assert {lr_at(s, c) for s in (0, 10, 10_000)} == {0.3}
    with pytest.raises(UserError, match="train.schedule"):
        lr_at(0, TrainConfig(schedule="linear"))


def test_weight_decay_only_on_matrices():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=2, n_head=2, n_embd=16))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    kept = {names[id(p)] for p in no_decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(("c_attn.weight", "c_proj.weight", "c_fc.weight")) for n in decayed)
    assert {"wte.weight", "wpe.weight", "ln_f.weight", "h.0.ln_1.bias", "h.1.attn.c_attn.bias"} <= kept
    # every parameter exactly once, the tied LM head included (it *is* wte.weight)
    assert len(decayed) + len(kept) == len(list(model.parameters()))


def test_optimizer_is_fused_adamw():
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = make_optimizer(model, TrainConfig(lr=3e-4, beta2=0.95))
    assert isinstance(opt, torch.optim.AdamW) and opt.defaults["fused"]
    assert opt.defaults["betas"] == (0.9, 0.95) and math.isclose(opt.defaults["lr"], 3e-4)
