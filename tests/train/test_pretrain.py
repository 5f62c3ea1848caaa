"""The pretraining loop: accumulation invariance, exact resume, checkpoints, failure handling."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from scratchlm import checkpoint as ckpt_io
from scratchlm.cli import main
from scratchlm.config import Config, GPTConfig
from scratchlm.data.prepare import prepare
from scratchlm.errors import UserError
from scratchlm.model.gpt import GPT
from scratchlm.tokenizer import ByteTokenizer
from scratchlm.train import loop as pretrain_mod
from scratchlm.train.loop import forward_backward
from scratchlm.train.pretrain import pretrain
from tests.helpers import make_docs, tiny_run_cfg, write_corpus


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("masked", [False, True], ids=["all-targets", "masked"])
@pytest.mark.parametrize("split", [[8], [3, 1, 4], [1] * 8], ids=["1x8", "3+1+4", "8x1"])
def test_grad_accumulation_1x8_equals_8x1(split, masked):
    """One micro-batch of 8 sequences and the same 8 split into micro-batches (uneven ones too) give
    the same step: loss, gradients and weights after AdamW. Compared in float64 (model.double()):
    only float64 rounding of differently ordered sums separates them, so the invariant is exact to
    ~1e-12. `masked` hides targets (-1) in different numbers per sequence, a whole sequence among
    them (a micro-batch without targets in 8x1): averaging each micro-batch's mean loss would be
    off by ~1e-2 there, the mean over the step's valid tokens is not."""
    torch.manual_seed(0)
    cfg = GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    a, b = GPT(cfg).double(), GPT(cfg).double()
    b.load_state_dict(a.state_dict())
    x, y = torch.randint(0, 64, (2, 8, 16))
    if masked:
        y[torch.rand(8, 16) < torch.linspace(0.1, 0.9, 8)[:, None]] = -1
        y[3] = -1
    amp = torch.autocast("cpu", enabled=False)
    la = forward_backward(a, [(x, y)], amp, None)
    bounds = [0, *torch.tensor(split).cumsum(0).tolist()]
    lb = forward_backward(b, [(x[i:j], y[i:j]) for i, j in zip(bounds, bounds[1:])], amp, None)
    reference = torch.nn.functional.cross_entropy(a(x)[0].flatten(0, 1), y.flatten(), ignore_index=-1)
    torch.testing.assert_close(la, reference.detach(), atol=1e-12, rtol=1e-12)  # the step's token mean
    torch.testing.assert_close(lb, la, atol=1e-12, rtol=1e-12)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, atol=1e-14, rtol=1e-10, msg=name)
    for m in (a, b):
        torch.optim.AdamW(m.parameters(), lr=1e-2).step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        # Adam divides by |grad| + 1e-8: a 1e-17 gradient difference moves a weight by at most ~1e-11
        torch.testing.assert_close(pb, pa, atol=1e-10, rtol=0)


def test_training_lowers_the_loss_and_writes_its_artifacts(tmp_path, data_dir):
    cfg = tiny_run_cfg(tmp_path / "run", max_steps=40, eval_interval=20, tensorboard=True, dropout=0.0)
    result = pretrain(cfg, data_dir, progress=False)
    first, last = losses(tmp_path / "run")[0][1], result.train_loss
    assert last < first - 1.0, (first, last)
    run = tmp_path / "run"
    assert (run / "loss.png").stat().st_size > 5000
    assert (run / "config.json").exists() and (run / "ckpt" / "best" / "model.safetensors").exists()
    assert any((run / "tb").iterdir())  # TensorBoard event file
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["vocab_size"] == 320  # 257 byte tokens padded up to a multiple of 64
    assert 0 < result.val_bpb < 8.5


def test_resume_continues_exactly(tmp_path, data_dir):
    whole = pretrain(tiny_run_cfg(tmp_path / "whole"), data_dir, progress=False)
    pretrain(tiny_run_cfg(tmp_path / "split"), data_dir, progress=False, stop_at_step=6)
    assert (tmp_path / "split" / "ckpt" / "step_0000006").exists()
    resumed = pretrain(tiny_run_cfg(tmp_path / "split"), data_dir, progress=False, resume=True)
    # Compared exactly: the resumed run repeats the uninterrupted one's operations in the same order
    # (same shapes, batches, threads, restored weights, optimizer and RNG state), so fp32 rounds alike.
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # dropout on: RNG state matters
    assert resumed.val_loss == whole.val_loss


def nan_on_call(monkeypatch, bad_call: int) -> dict[str, int]:
    """Make the loop's `bad_call`-th forward_backward return NaN; returns the call counter (reset it to rerun)."""
    real = pretrain_mod.forward_backward
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return torch.tensor(float("nan")) if calls["n"] == bad_call else loss

    monkeypatch.setattr(pretrain_mod, "forward_backward", flaky)
    return calls


def test_nan_loss_stops_or_skips(tmp_path, data_dir, monkeypatch):
    calls = nan_on_call(monkeypatch, 3)
    with pytest.raises(UserError, match="loss became nan at step 2"):
        pretrain(tiny_run_cfg(tmp_path / "a"), data_dir, progress=False)
    calls["n"] = 0
    result = pretrain(tiny_run_cfg(tmp_path / "b", on_nan="skip"), data_dir, progress=False)
    assert result.steps == 12
    assert any(json.loads(line).get("skipped") for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())


def test_nan_skipped_on_the_last_step_still_evaluates_and_saves(tmp_path, data_dir, monkeypatch):
    """Regression: the skip jumped past the end-of-run evaluation and checkpoint."""
    nan_on_call(monkeypatch, 6)
    run = tmp_path / "run"
    result = pretrain(tiny_run_cfg(run, on_nan="skip", max_steps=6, eval_interval=100), data_dir, progress=False)
    assert result.steps == 6 and result.val_loss == result.val_loss  # validated at the end: not NaN
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert {"step": 5, "skipped": 1, "loss": "nan"} in rows
    assert [r["step"] for r in rows if "val_loss" in r] == [6]
    assert json.loads((ckpt_io.find_checkpoint(run) / "trainer.json").read_text())["step"] == 6


def test_no_validation_split_skips_validation(tmp_path, capsys):
    """Regression: with data.val_fraction=0 the loop evaluated on training data, called it the val
    loss and picked ckpt/best by it. Now it says so once and skips validation."""
    cfg = Config()
    cfg.data.workers, cfg.data.val_fraction = 1, 0.0
    data = tmp_path / "data"
    prepare([str(write_corpus(tmp_path / "c", make_docs(20, seed=3)))], ByteTokenizer({"<|endoftext|>": 256}), cfg,
            data, progress=False)
    run = tmp_path / "run"
    result = pretrain(tiny_run_cfg(run, max_steps=4, eval_interval=2, ckpt_interval=2), data, progress=False)
    out = capsys.readouterr().out
    assert "validation skipped" in out and "0 validation tokens" in out
    assert "done: 4 steps" in out and "validation skipped (no validation split)" in out
    assert result.val_loss != result.val_loss and result.val_bpb != result.val_bpb  # NaN: there was none
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert not any("val_loss" in r for r in rows)
    assert not (run / "ckpt" / "best").exists()
    assert json.loads((ckpt_io.find_checkpoint(run) / "trainer.json").read_text())["best_val_loss"] is None


def _scaler_after_some_steps() -> torch.amp.GradScaler:
    """A CPU gradient scaler moved off its defaults: 4 steps, one with an inf gradient (backoff)."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=5)
    p = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([p], lr=0.1)
    for i in range(4):
        scaler.scale(p.sum()).backward()
        if i == 1:
            p.grad[0] = float("inf")
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
    return scaler


def test_gradient_scaler_state_is_saved_and_restored(tmp_path):
    """Regression: fp16 checkpoints dropped the GradScaler (loss scale, good-step count), so an fp16
    resume restarted at scale 65536. Round trip through trainer.json with a CPU scaler."""
    scaler = _scaler_after_some_steps()
    assert scaler.state_dict()["scale"] == 512.0 and scaler.state_dict()["_growth_tracker"] == 2
    model = GPT(GPTConfig(vocab_size=64, block_size=8, n_layer=1, n_head=2, n_embd=16))
    opt = torch.optim.AdamW(model.parameters())
    tok = ByteTokenizer({"<|endoftext|>": 256})
    path = ckpt_io.save_checkpoint(tmp_path, 3, model, opt, Config(), tok, {"best_val_loss": None}, scaler=scaler)
    assert json.loads((path / "trainer.json").read_text())["scaler"] == scaler.state_dict()
    fresh = torch.amp.GradScaler("cpu")
    ckpt_io.load_trainer_state(path, opt, fresh)
    assert fresh.state_dict() == scaler.state_dict()
    # a checkpoint without a scaler (fp32/bf16 run) leaves a new scaler at its defaults
    plain = ckpt_io.save_checkpoint(tmp_path, 4, model, opt, Config(), tok, {"best_val_loss": None})
    assert json.loads((plain / "trainer.json").read_text())["scaler"] is None
    default = torch.amp.GradScaler("cpu")
    ckpt_io.load_trainer_state(plain, opt, default)
    assert default.state_dict() == torch.amp.GradScaler("cpu").state_dict()


@pytest.mark.gpu
def test_fp16_resume_continues_exactly_on_cuda(tmp_path, data_dir):
    if not torch.cuda.is_available():
        pytest.skip("fp16 training needs a CUDA GPU")
    cfg = lambda run: tiny_run_cfg(run, precision="fp16", device="cuda", dropout=0.0)  # noqa: E731
    pretrain(cfg(tmp_path / "whole"), data_dir, progress=False)
    pretrain(cfg(tmp_path / "split"), data_dir, progress=False, stop_at_step=6)
    pretrain(cfg(tmp_path / "split"), data_dir, progress=False, resume=True)
    states = [json.loads((ckpt_io.find_checkpoint(tmp_path / r) / "trainer.json").read_text())["scaler"]
              for r in ("whole", "split")]
    assert states[1] == states[0]  # loss scale and good-step count carried over the interruption
    whole, split = losses(tmp_path / "whole"), losses(tmp_path / "split")
    assert [s for s, _ in split] == [s for s, _ in whole]
    # losses ~5 nats under fp16 autocast: GPU kernels may reorder sums between runs, 1e-3 bounds that
    torch.testing.assert_close(torch.tensor([v for _, v in split]), torch.tensor([v for _, v in whole]),
                               atol=1e-3, rtol=1e-3)


def test_bad_checkpoints_are_refused(tmp_path, data_dir):
    run = tmp_path / "run"
    pretrain(tiny_run_cfg(run, max_steps=2), data_dir, progress=False)
    ckpt = ckpt_io.find_checkpoint(run)
    model, tok, cfg = ckpt_io.load_model_for_inference(run)
    assert tok.vocab_size == 257 and cfg.model.n_layer == 2
    other = GPT(GPTConfig(vocab_size=320, block_size=16, n_layer=2, n_head=2, n_embd=48))
    with pytest.raises(UserError, match="does not fit this model"):
        ckpt_io.load_weights(other, ckpt)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated"):
        ckpt_io.load_model_for_inference(run)
    (ckpt / "trainer.json").unlink()
    with pytest.raises(UserError, match="missing trainer.json"):
        ckpt_io.find_checkpoint(run)
    with pytest.raises(UserError, match="no such checkpoint"):
        ckpt_io.find_checkpoint(tmp_path / "nowhere")


def test_resume_with_other_data_is_refused(tmp_path, data_dir):
    run = tmp_path / "run"
    pretrain(tiny_run_cfg(run, max_steps=2), data_dir, progress=False)
    other = tmp_path / "other"
    cfg = Config()
    cfg.data.workers = 1
    prepare([str(write_corpus(tmp_path / "c2", make_docs(20, seed=5)))], ByteTokenizer({"<|x|>": 256}), cfg, other,
            progress=False)
    with pytest.raises(UserError, match="tokenizer"):
        pretrain(tiny_run_cfg(run, max_steps=4), other, progress=False, resume=True)


def test_bf16_autocast_trains_on_cpu(tmp_path, data_dir):
    result = pretrain(tiny_run_cfg(tmp_path / "bf16", precision="bf16", max_steps=4), data_dir, progress=False)
    assert torch.isfinite(torch.tensor(result.train_loss))


def test_profile_writes_a_trace(tmp_path, data_dir, capsys):
    pretrain(tiny_run_cfg(tmp_path / "p", profile_steps=2, max_steps=5), data_dir, progress=False)
    assert (tmp_path / "p" / "profile" / "trace.json").stat().st_size > 1000
    assert "aten::" in capsys.readouterr().out  # the top-operators table


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint(tmp_path, data_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "scratchlm", "pretrain", "--data", str(data_dir), "--out", str(run), "--quiet",
           "--model.block_size=16", "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32",
           "--train.batch_size=4", "--train.max_steps=100000", "--train.eval_interval=1000000",
           "--train.ckpt_interval=0", "--train.tensorboard=false", "--train.precision=fp32"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").stat().st_size == 0:
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out  # 128 + SIGTERM: a scheduler must not read the stop as success
    last = out.strip().splitlines()[-1]
    assert last.startswith("scratchlm: SIGTERM: saved a checkpoint at step") and "--resume" in last
    step = json.loads((ckpt_io.find_checkpoint(run) / "trainer.json").read_text())["step"]
    assert step > 0 and f"at step {step};" in last
    assert main(["pretrain", "--data", str(data_dir), "--out", str(run), "--resume", "--quiet",
                 f"--train.max_steps={step + 2}"]) == 0
    assert ckpt_io.find_checkpoint(run).name == f"step_{step + 2:07d}"


def test_out_of_memory_names_the_setting(tmp_path, data_dir, monkeypatch):
    def oom(*args, **kwargs):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(pretrain_mod, "forward_backward", oom)
    with pytest.raises(UserError, match=r"micro-batch of 4x16 tokens does not fit.*--train.batch_size"):
        pretrain(tiny_run_cfg(tmp_path / "oom"), data_dir, progress=False)
