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

from scratchlm.config import Config, ModelConfig
from scratchlm.data.prepare import prepare
from scratchlm.errors import UserError
from scratchlm.model.gpt import GPT
from scratchlm.tokenizer import ByteTokenizer
from scratchlm.train import checkpoint as ckpt_io
from scratchlm.train import pretrain as pretrain_mod
from scratchlm.train.pretrain import forward_backward, pick_precision, pretrain
from tests.data.conftest import make_docs, write_corpus


def tiny_cfg(run_dir: Path, **train) -> Config:
    cfg = Config(name="test", out_dir=str(run_dir))
    cfg.model = ModelConfig(block_size=16, n_layer=2, n_head=2, n_embd=32, dropout=0.1)
    t = cfg.train
    t.batch_size, t.max_steps, t.warmup_steps, t.lr = 4, 12, 2, 3e-3
    t.eval_interval, t.eval_iters, t.log_interval, t.ckpt_interval = 4, 2, 1, 0
    t.tensorboard = False
    for k, v in train.items():
        setattr(t, k, v)
    cfg.data.workers = 1
    return cfg


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    corpus = write_corpus(root / "corpus", make_docs(60, seed=1))
    cfg = Config()
    cfg.data.workers = 1
    prepare([str(corpus)], ByteTokenizer({"<|endoftext|>": 256}), cfg, root / "data", progress=False)
    return root / "data"


def losses(run_dir: Path) -> list[tuple[int, float]]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in rows if "loss" in r]


def test_grad_accumulation_1x8_equals_8x1():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32)
    a, b = GPT(cfg), GPT(cfg)
    b.load_state_dict(a.state_dict())
    x, y = torch.randint(0, 64, (2, 8, 16))
    la = forward_backward(a, [(x, y)], torch.autocast("cpu", enabled=False), None)
    lb = forward_backward(b, [(x[i : i + 1], y[i : i + 1]) for i in range(8)], torch.autocast("cpu", enabled=False),
                          None)
    torch.testing.assert_close(la, lb)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, atol=1e-6, rtol=1e-5, msg=name)
    for m in (a, b):
        torch.optim.AdamW(m.parameters(), lr=1e-2).step()
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, atol=1e-6, rtol=1e-5)


def test_training_lowers_the_loss_and_writes_its_artifacts(tmp_path, data_dir):
    cfg = tiny_cfg(tmp_path / "run", max_steps=40, eval_interval=20, tensorboard=True, dropout=0.0)
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
    whole = pretrain(tiny_cfg(tmp_path / "whole"), data_dir, progress=False)
    pretrain(tiny_cfg(tmp_path / "split"), data_dir, progress=False, stop_at_step=6)
    assert (tmp_path / "split" / "ckpt" / "step_0000006").exists()
    resumed = pretrain(tiny_cfg(tmp_path / "split"), data_dir, progress=False, resume=True)
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")  # dropout on: RNG state matters
    assert resumed.val_loss == whole.val_loss


def test_nan_loss_stops_or_skips(tmp_path, data_dir, monkeypatch):
    real = pretrain_mod.forward_backward
    calls = {"n": 0}

    def flaky(*args):
        calls["n"] += 1
        loss = real(*args)
        return torch.tensor(float("nan")) if calls["n"] == 3 else loss

    monkeypatch.setattr(pretrain_mod, "forward_backward", flaky)
    with pytest.raises(UserError, match="loss became nan at step 2"):
        pretrain(tiny_cfg(tmp_path / "a"), data_dir, progress=False)
    calls["n"] = 0
    result = pretrain(tiny_cfg(tmp_path / "b", on_nan="skip"), data_dir, progress=False)
    assert result.steps == 12
    assert any(json.loads(line).get("skipped") for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines())


def test_bad_checkpoints_are_refused(tmp_path, data_dir):
    run = tmp_path / "run"
    pretrain(tiny_cfg(run, max_steps=2), data_dir, progress=False)
    ckpt = ckpt_io.find_checkpoint(run)
    model, tok, cfg = ckpt_io.load_model_for_inference(run)
    assert tok.vocab_size == 257 and cfg.model.n_layer == 2
    other = GPT(ModelConfig(vocab_size=320, block_size=16, n_layer=2, n_head=2, n_embd=48))
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
    pretrain(tiny_cfg(run, max_steps=2), data_dir, progress=False)
    other = tmp_path / "other"
    cfg = Config()
    cfg.data.workers = 1
    prepare([str(write_corpus(tmp_path / "c2", make_docs(20, seed=5)))], ByteTokenizer({"<|x|>": 256}), cfg, other,
            progress=False)
    with pytest.raises(UserError, match="tokenizer"):
        pretrain(tiny_cfg(run, max_steps=4), other, progress=False, resume=True)


def test_precision_choice():
    cpu = torch.device("cpu")
    assert pick_precision("fp32", cpu, 10**9) == ("fp32", "set")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        pick_precision("fp16", cpu, 1)
    assert pick_precision("auto", cpu, 800_000)[0] == "fp32"  # tiny models: casts cost more than they save
    with pytest.raises(UserError, match="train.precision"):
        pick_precision("int8", cpu, 1)


def test_bf16_autocast_trains_on_cpu(tmp_path, data_dir):
    result = pretrain(tiny_cfg(tmp_path / "bf16", precision="bf16", max_steps=4), data_dir, progress=False)
    assert torch.isfinite(torch.tensor(result.train_loss))


def test_profile_writes_a_trace(tmp_path, data_dir, capsys):
    pretrain(tiny_cfg(tmp_path / "p", profile_steps=2, max_steps=5), data_dir, progress=False)
    assert (tmp_path / "p" / "profile" / "trace.json").stat().st_size > 1000
    assert "aten::" in capsys.readouterr().out  # the top-operators table


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint(tmp_path, data_dir):
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "scratchlm", "pretrain", "--data", str(data_dir), "--out", str(run), "--quiet",
           "--model.block_size=16", "--model.n_layer=2", "--model.n_head=2", "--model.n_embd=32",
           "--train.batch_size=4", "--train.max_steps=100000", "--train.eval_interval=1000000",
           "--train.ckpt_interval=0", "--train.tensorboard=false"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 60
    while not (run / "metrics.jsonl").exists() or (run / "metrics.jsonl").stat().st_size == 0:
        assert time.time() < deadline and proc.poll() is None, proc.stdout.read() if proc.poll() is not None else ""
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "SIGTERM: saved a checkpoint" in out
    ckpt = ckpt_io.find_checkpoint(run)
    assert json.loads((ckpt / "trainer.json").read_text())["step"] > 0


def test_out_of_memory_names_the_setting(tmp_path, data_dir, monkeypatch):
    def oom(*args):
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory")

    monkeypatch.setattr(pretrain_mod, "forward_backward", oom)
    with pytest.raises(UserError, match=r"micro-batch of 4x16 tokens does not fit.*--train.batch_size"):
        pretrain(tiny_cfg(tmp_path / "oom"), data_dir, progress=False)
