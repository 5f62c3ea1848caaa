"""Activation checkpointing and automatic micro-batch sizing (scratchlm/train/memory.py).

Checkpointing: the gradients are the plain model's (float64, dropout on); the bytes autograd keeps
for the backward fall, and the FLOPs rise, by exactly what the checkpointed blocks account for.
Micro-batch sizing: the pick follows the measured line and backs off on a failed or over-budget
trial; a run that runs out of memory mid-way halves its micro-batch and trains the same steps.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

import scratchlm.train.loop as loop_mod
from scratchlm.config import GPTConfig, LlamaConfig, MoEConfig, TrainConfig
from scratchlm.errors import UserError
from scratchlm.model import build_model
from scratchlm.model.moe import MoELayer
from scratchlm.train.memory import checkpoint_blocks, fit_micro_batch, rechunk, smaller_micro_batch, step_costs
from scratchlm.train.pretrain import pretrain
from tests.helpers import tiny_run_cfg

LAYERS = 4


def model_of(kind: str, dropout: float = 0.0) -> torch.nn.Module:
    cfg = (GPTConfig if kind == "gpt" else LlamaConfig)(block_size=16, vocab_size=64, n_layer=LAYERS, n_head=2,
                                                        n_embd=32, dropout=dropout)
    torch.manual_seed(0)
    return build_model(cfg).double()


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randint(64, (3, 16), generator=g), torch.randint(64, (3, 16), generator=g)


def grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    x, y = batch()
    torch.manual_seed(2)  # the dropout masks
    model(x, y)[1].backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kind", ["gpt", "llama"])
@pytest.mark.parametrize("every", [1, 2])
def test_checkpointed_gradients_are_the_plain_ones(kind, every):
    plain = grads(model_of(kind, dropout=0.1))
    model = model_of(kind, dropout=0.1)
    assert checkpoint_blocks(model, every) == list(range(0, LAYERS, every))
    ours = grads(model)
    assert ours.keys() == plain.keys()
    for name in plain:  # the same operations in the same order, the same dropout masks
        assert torch.equal(ours[name], plain[name]), name
    assert sorted(model.state_dict()) == sorted(model_of(kind).state_dict())  # the weights keep their names


@pytest.mark.parametrize("kind", ["gpt", "llama"])
def test_checkpointing_trades_saved_bytes_for_recompute_flops(kind):
    x, y = batch()
    plain_model = model_of(kind)
    kept, flops = {}, {}
    kept[0], flops[0] = step_costs(plain_model, x, y)
    # one block alone: what it keeps, and what its forward costs (the blocks are alike)
    hidden = plain_model.wte(x) if kind == "gpt" else plain_model.tok_embeddings(x)
    positions = torch.arange(16)[None]  # llama's blocks take the positions too
    block_args = (hidden.detach().requires_grad_(),) if kind == "gpt" else \
        (hidden.detach().requires_grad_(), plain_model.rope, positions, 0, None, None)
    block_kept, block_flops = step_costs(plain_model.blocks[0], *block_args)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        plain_model.blocks[0](*block_args)
    block_forward_flops = counter.get_total_flops()
    assert block_kept > 0 and block_flops > block_forward_flops > 0
    for every in (1, 2):
        model = model_of(kind)
        n = len(checkpoint_blocks(model, every))
        kept[every], flops[every] = step_costs(model, x, y)
        # each checkpointed block keeps its tensor inputs alone: x (B, T, C), and llama's positions (1, T)
        inputs = [hidden] + ([positions] if kind == "llama" else [])
        assert kept[0] - kept[every] == n * (block_kept - sum(t.numel() * t.element_size() for t in inputs))
        # and runs its forward once more, up to the last op whose output the backward needs: all but
        # the block's output projection (non-reentrant checkpointing stops early); in full without that
        last = [m for m in plain_model.blocks[0].modules() if isinstance(m, torch.nn.Linear)][-1]
        last_flops = 2 * x.numel() * last.in_features * last.out_features
        assert flops[every] - flops[0] == n * (block_forward_flops - last_flops)
        with set_checkpoint_early_stop(False):
            assert step_costs(model, x, y)[1] - flops[0] == n * block_forward_flops
    assert kept[1] < kept[2] < kept[0] and flops[0] < flops[2] < flops[1]


def test_fit_micro_batch_follows_the_line_and_backs_off():
    def linear(m: int) -> int:  # 100 bytes + 10 per row
        return 100 + 10 * m

    assert fit_micro_batch(linear, 16, budget=200)[0] == 8  # 100 + 10 m <= 0.9 x 200 -> m <= 8
    assert fit_micro_batch(linear, 16, budget=10**6)[0] == 16
    assert fit_micro_batch(linear, 16, budget=200, extra=40)[0] == 4  # the optimizer's moments count
    assert fit_micro_batch(linear, 12, budget=200)[0] == 6  # divisors of the rows only

    def oom_above_2(m: int) -> int:
        if m > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return linear(m)

    assert fit_micro_batch(oom_above_2, 16, budget=200)[0] == 2

    def steep_above_4(m: int) -> int:  # the line through 1 and 2 underestimates larger sizes
        return linear(m) if m <= 4 else 10**9

    m, why = fit_micro_batch(steep_above_4, 16, budget=200)
    assert m == 4 and "4 rows of 16" in why
    with pytest.raises(RuntimeError, match="device-side assert"):
        fit_micro_batch(lambda m: (_ for _ in ()).throw(RuntimeError("device-side assert")), 16, budget=200)
    assert smaller_micro_batch(8, 16) == 4 and smaller_micro_batch(6, 12) == 3 and smaller_micro_batch(1, 16) is None


def test_rechunk_keeps_the_rows_in_order():
    rows = torch.arange(24).view(12, 2)
    micro = [(rows[:4], rows[:4] + 100), (rows[4:8], rows[4:8] + 100), (rows[8:], rows[8:] + 100)]
    for m in (1, 2, 3, 6, 12):
        out = rechunk(micro, m)
        assert len(out) == 12 // m and all(mb[0].size(0) == m for mb in out)
        assert torch.equal(torch.cat([mb[0] for mb in out]), rows)
        assert torch.equal(torch.cat([mb[1] for mb in out]), rows + 100)
    assert rechunk(micro, 4) is micro


def no_dropout(cfg):
    cfg.model.dropout = 0.0
    return cfg


def losses(run) -> list[float]:
    return [r["loss"] for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]


def test_a_run_out_of_memory_halves_its_micro_batch_and_trains_the_same_steps(tmp_path, data_dir, monkeypatch,
                                                                              capsys):
    fixed = pretrain(no_dropout(tiny_run_cfg(tmp_path / "fixed", batch_size=2, grad_accum=4)), data_dir,
                     progress=False)
    real, sizes = loop_mod.forward_backward, []

    def oom_above_2_rows(model, micro, *args, **kwargs):
        sizes.append(micro[0][0].size(0))
        if micro[0][0].size(0) > 2:  # as a GPU would, past its memory
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(model, micro, *args, **kwargs)

    monkeypatch.setattr(loop_mod, "forward_backward", oom_above_2_rows)
    cfg = tiny_run_cfg(tmp_path / "auto", batch_size=2, grad_accum=4, micro_batch="auto", memory_budget_gb=64)
    auto = pretrain(no_dropout(cfg), data_dir, progress=False)  # masks drawn per micro-batch would differ
    out = capsys.readouterr().out
    assert "micro-batch auto: 8 rows of 8" in out  # the trials fit all 8 rows in the budget
    assert "a micro-batch of 8 rows ran out of memory; going on with 4" in out
    assert "a micro-batch of 4 rows ran out of memory; going on with 2" in out
    assert sizes[:3] == [8, 4, 2] and set(sizes[3:]) == {2}  # halved once, then kept
    assert auto.steps == fixed.steps
    assert losses(tmp_path / "auto") == pytest.approx(losses(tmp_path / "fixed"), abs=1e-6)


def test_a_cpu_step_over_the_budget_halves_the_next_ones(tmp_path, data_dir, monkeypatch, capsys):
    peaks = iter([10**15] + [0] * 100)  # the first step's peak passes the budget, the next ones fit
    monkeypatch.setattr(loop_mod, "read_peak", lambda device: next(peaks))
    monkeypatch.setattr(loop_mod, "fit_micro_batch", lambda trial, rows, budget, extra=0: (rows, "auto: test"))
    cfg = tiny_run_cfg(tmp_path / "rss", batch_size=2, grad_accum=4, micro_batch="auto", memory_budget_gb=1)
    pretrain(cfg, data_dir, progress=False)
    assert "step 1: a micro-batch of 8 rows passed the 1.00 GiB budget; going on with 4" in capsys.readouterr().out


def test_one_row_out_of_memory_names_the_settings(tmp_path, data_dir, monkeypatch):
    def always_oom(*args, **kwargs):
        raise RuntimeError("CUDA out of memory.")

    monkeypatch.setattr(loop_mod, "forward_backward", always_oom)
    cfg = tiny_run_cfg(tmp_path / "oom", batch_size=1, grad_accum=2, micro_batch="auto", memory_budget_gb=64)
    with pytest.raises(UserError, match="one sequence per micro-batch ran out of memory.*activation_checkpointing"):
        pretrain(cfg, data_dir, progress=False)


def test_a_checkpointed_run_trains_the_same_steps(tmp_path, data_dir, capsys):
    plain = pretrain(tiny_run_cfg(tmp_path / "plain"), data_dir, progress=False)
    ckpt = pretrain(tiny_run_cfg(tmp_path / "ckpt", activation_checkpointing=1), data_dir, progress=False)
    assert "activation checkpointing every 1 block(s)" in capsys.readouterr().out
    assert losses(tmp_path / "ckpt") == pytest.approx(losses(tmp_path / "plain"), abs=1e-6)
    assert ckpt.val_loss == pytest.approx(plain.val_loss, abs=1e-6)


class _OneBatch:
    """A loader of one batch (what `_auto_micro_batch` samples)."""

    def __init__(self, rows: int = 2) -> None:
        g = torch.Generator().manual_seed(2)
        self.batch = (torch.randint(64, (rows, 16), generator=g), torch.randint(64, (rows, 16), generator=g))

    def next_batch(self):
        return self.batch

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


def _auto(model, rows: int = 8) -> int:
    t = TrainConfig(batch_size=2, micro_batch="auto", memory_budget_gb=64)
    return loop_mod._auto_micro_batch(model, t, rows, _OneBatch(), torch.device("cpu"), contextlib.nullcontext())[0]


def _oom_above(model, rows: int):
    """The model's forward runs out of memory on more than `rows` rows, as a GPU would."""
    forward = model.forward

    def limited(x, *args, **kwargs):
        if x.size(0) > rows:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(x, *args, **kwargs)

    model.forward = limited
    return model


def test_auto_micro_batch_ranks_agree_when_one_runs_out_of_memory(monkeypatch):
    """Under torchrun every rank reaches the all_max of each trial: here rank A runs out of memory
    above 2 rows and offers +inf, rank B fits but hears +inf; both pick 2 after the same collectives."""
    calls = {"A": [], "B": []}

    def all_max_of(rank: str, other):
        def all_max(value: float) -> float:
            calls[rank].append(value)
            return max(value, other(value))
        return all_max

    monkeypatch.setattr(loop_mod, "all_max", all_max_of("A", lambda v: 0.0))
    a = _auto(_oom_above(model_of("llama"), 2))
    monkeypatch.setattr(loop_mod, "all_max", all_max_of("B", lambda v: calls["A"][len(calls["B"]) - 1]))  # hears A
    b = _auto(model_of("llama"))
    assert a == b == 2
    assert len(calls["A"]) == len(calls["B"]) == 5  # 1, 2, then 8 and 4 out of memory, 2 again
    assert [math.isinf(v) for v in calls["A"]] == [False, False, True, True, False]


def test_auto_micro_batch_out_of_memory_at_one_row_names_the_settings():
    with pytest.raises(UserError, match="one sequence per micro-batch ran out of memory.*activation_checkpointing"):
        _auto(_oom_above(model_of("llama"), 0))
    with pytest.raises(UserError, match="one sequence per micro-batch ran out of memory"):
        fit_micro_batch(lambda m: (_ for _ in ()).throw(torch.OutOfMemoryError("CUDA out of memory")), 16, 200)


def test_auto_micro_batch_trials_leave_the_routers_loads():
    torch.manual_seed(0)
    moe = build_model(MoEConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=32, n_experts=4,
                                n_active_experts=2, expert_hidden=16)).train()
    loads = [m.step_load for m in moe.modules() if isinstance(m, MoELayer)]
    for load in loads:
        load.fill_(3.0)
    _auto(moe)
    assert loads and all(torch.equal(load, torch.full_like(load, 3.0)) for load in loads)


def test_a_step_redone_after_running_out_of_memory_counts_its_routing_once(tmp_path, data_dir, monkeypatch):
    """The balancing-bias update sees each step's rows once: not the trials', not a failed attempt's."""
    real, update, seen = loop_mod.forward_backward, MoELayer.update_bias, []

    def oom_after_one_micro_batch(model, micro, amp, scaler, counts, **kwargs):
        if micro[0][0].size(0) > 2:  # runs one micro-batch (its routing counts), then out of memory
            real(model, micro[:1], amp, scaler, counts[:1], **kwargs)
            raise RuntimeError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real(model, micro, amp, scaler, counts, **kwargs)

    def recorded(layer):
        seen.append(layer.step_load.sum().item())
        update(layer)

    monkeypatch.setattr(loop_mod, "forward_backward", oom_after_one_micro_batch)
    monkeypatch.setattr(MoELayer, "update_bias", recorded)
    cfg = tiny_run_cfg(tmp_path / "moe", batch_size=2, grad_accum=4, micro_batch="auto", memory_budget_gb=64,
                       max_steps=2, eval_interval=2)
    cfg.model = MoEConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, n_experts=4, n_active_experts=2,
                          expert_hidden=16)
    pretrain(cfg, data_dir, progress=False)
    assert seen == [2 * 4 * 16 * 2] * 4  # 2 steps x 2 MoE layers: 8 rows of 16 tokens, 2 experts each
