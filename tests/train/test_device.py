"""scratchlm/train/device.py: the device, the thread count chosen from the free cores, the
precision chosen by measurement, and MFU against a peak that a faster run raises."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter

import pytest
import torch

from scratchlm.config import GPTConfig
from scratchlm.env import timing as env
from scratchlm.errors import UserError
from scratchlm.model.gpt import GPT
from scratchlm.train import device as dev
from scratchlm.train.pretrain import pretrain
from tests.helpers import tiny_run_cfg

CPU = torch.device("cpu")


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(env, "ROUND_S", 0.0)  # timing rounds of one call each: tests check choices, not clocks
    monkeypatch.setattr(env, "PAUSE_S", 0.0)


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def fake_cores(monkeypatch, busy: list[float]) -> None:
    """Two /proc/stat snapshots 100 jiffies apart in which core i was busy for busy[i] of them."""
    monkeypatch.setattr(dev, "_cores", lambda: list(range(len(busy))))
    monkeypatch.setattr(dev, "FREE_CORES_WINDOW_S", 0.0)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    snapshots = iter([{i: (0, 0) for i in range(len(busy))},
                      {i: (round(100 * (1 - b)), 100) for i, b in enumerate(busy)}])
    monkeypatch.setattr(dev, "_cpu_times", lambda: next(snapshots))


# ----------------------------------------------------------------------------------------------
# device


def test_pick_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert dev.pick_device("auto") == CPU and dev.pick_device("cpu") == CPU
    with pytest.raises(UserError, match=r"--train.device=cuda:1 but no CUDA GPU"):
        dev.pick_device("cuda:1")
    with pytest.raises(UserError, match=r"--device=mps but Apple MPS is not available"):
        dev.pick_device("mps", flag="--device")
    with pytest.raises(UserError, match="is not a device"):
        dev.pick_device("gpu0")


# ----------------------------------------------------------------------------------------------
# threads


def test_a_busy_core_is_left_out_of_the_thread_count(monkeypatch, two_threads):
    """Regression: with another process on one of two cores, two spinning threads made training 18x slower."""
    fake_cores(monkeypatch, busy=[1.0, 0.0])
    assert dev.pick_threads(0) == (1, "auto: 1 of 2 cores free")
    fake_cores(monkeypatch, busy=[0.1, 0.05])  # background noise does not cost a core
    assert dev.pick_threads(0) == (2, "auto: 2 of 2 cores free")
    fake_cores(monkeypatch, busy=[1.0, 1.0])
    assert dev.pick_threads(0) == (1, "auto: 0 of 2 cores free")


def test_thread_settings_win_over_auto(monkeypatch, two_threads):
    fake_cores(monkeypatch, busy=[1.0, 0.0])
    assert dev.pick_threads(3) == (3, "train.threads=3")
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert dev.pick_threads(0) == (2, "OMP_NUM_THREADS=2")  # torch took its count from it at start
    monkeypatch.delenv("OMP_NUM_THREADS")
    fake_cores(monkeypatch, busy=[0.0, 0.0, 0.0])  # a program's own choice is the ceiling
    assert dev.pick_threads(0) == (2, "auto: 3 of 3 cores free, torch set to 2")
    torch.set_num_threads(1)
    assert dev.pick_threads(0) == (1, "auto: torch is set to 1")


def test_the_run_uses_and_reports_the_free_cores(tmp_path, data_dir, cache, monkeypatch, two_threads,
                                                   capsys):
    fake_cores(monkeypatch, busy=[0.0, 1.0])
    seen = []

    def build(cfg):
        model = GPT(cfg)
        model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
        return model

    pretrain(tiny_run_cfg(tmp_path / "run", max_steps=2, precision="fp32"), data_dir, progress=False, build=build)
    assert "precision fp32 (set), 1 threads (auto: 1 of 2 cores free)" in capsys.readouterr().out
    assert seen and set(seen) == {1}
    assert torch.get_num_threads() == 2  # the count from before the run is back


def test_the_cli_makes_idle_openmp_threads_sleep_before_torch_loads():
    code = ("import os, sys\nfrom scratchlm import cli\nassert 'torch' not in sys.modules\n"
            "try:\n    cli.main(['--help'])\nexcept SystemExit:\n    pass\nprint(os.environ.get('OMP_WAIT_POLICY'))")
    environ = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
    assert out.stdout.splitlines()[-1] == "PASSIVE"
    environ["OMP_WAIT_POLICY"] = "ACTIVE"  # the user's own setting wins
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=environ, check=True)
    assert out.stdout.splitlines()[-1] == "ACTIVE"


# ----------------------------------------------------------------------------------------------
# precision


def test_explicit_precisions():
    assert dev.pick_precision("fp32", CPU) == ("fp32", "set")
    assert dev.pick_precision("bf16", CPU) == ("bf16", "set")
    with pytest.raises(UserError, match="fp16 needs a CUDA GPU"):
        dev.pick_precision("fp16", CPU)
    with pytest.raises(UserError, match="train.precision"):
        dev.pick_precision("int8", CPU)


def test_linear_shapes_are_the_models_own():
    model = GPT(GPTConfig(vocab_size=64, block_size=16, n_layer=2, n_head=2, n_embd=32))
    assert dev.linear_shapes(model, 4 * 16) == Counter({(64, 32, 96): 2, (64, 32, 32): 2, (64, 32, 128): 2,
                                                        (64, 128, 32): 2, (64, 32, 64): 1})
    assert {rows for rows, _, _ in dev.linear_shapes(model, 10**6)} == {dev.MAX_PROBE_ROWS}


def test_auto_precision_follows_the_measured_speed(monkeypatch):
    """Regression: auto chose fp32 on every CPU without AMX, although bf16 ran 2.7x faster on this AMD EPYC."""
    monkeypatch.setattr(env, "runs", lambda device, dtype: True)
    shapes = Counter({(64, 32, 128): 3, (64, 32, 64): 1})
    times = {128: (2.0, 1.0), 64: (1.0, 0.5)}  # fp32, bf16 seconds by output width
    monkeypatch.setattr(env, "linear_times", lambda device, shapes: {s: times[s[2]] for s in shapes})
    assert dev.pick_precision("auto", CPU, shapes) == (
        "bf16", "auto: bf16 2.0x faster than fp32 at this model's shapes (measured)")
    times = {128: (1.0, 1.5), 64: (1.0, 0.4)}  # weighted by use: 4.0 s fp32 against 4.9 s bf16
    precision, why = dev.pick_precision("auto", CPU, shapes)
    assert precision == "fp32" and why.startswith("auto: bf16 only 0.82x as fast as fp32")
    times = {128: (1.1, 1.0), 64: (1.1, 1.0)}  # faster, but by less than the casts elsewhere cost
    assert dev.pick_precision("auto", CPU, shapes)[0] == "fp32"
    monkeypatch.setattr(env, "runs", lambda device, dtype: False)
    assert dev.pick_precision("auto", CPU, shapes) == ("fp32", "auto: bf16 does not run on this CPU")


def test_auto_precision_measures_once_per_shape(cache, monkeypatch):
    shapes = Counter({(8, 16, 32): 2})
    precision, why = dev.pick_precision("auto", CPU, shapes)  # the real measurement, tiny shape
    assert precision in ("fp32", "bf16") and "at this model's shapes (measured" in why
    monkeypatch.setattr(env, "_probe_linears", lambda *a: pytest.fail("measured again despite the cache"))
    assert dev.pick_precision("auto", CPU, shapes) == (precision, why)


# ----------------------------------------------------------------------------------------------
# MFU


def test_mfu_never_passes_100_percent_and_a_faster_run_raises_the_peak(tmp_path, data_dir, cache,
                                                                       monkeypatch):
    """Regression: a peak measured on a busy machine was trusted forever and the bar showed MFU 174%."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the peak's cache key names the thread count, and the run uses train.threads=1
    key = env._cache_key("cpu", torch.float32)
    torch.set_num_threads(before)
    env._write_records({key: {"flops": 1e3, **env._measured(5)}})  # far below what any CPU does
    cfg = tiny_run_cfg(tmp_path / "run", max_steps=3, precision="fp32", threads=1)
    result = pretrain(cfg, data_dir, progress=False)
    mfus = [r["mfu"] for r in result.history if "mfu" in r]
    assert len(mfus) == 3 and all(0 < m <= 1 for m in mfus), mfus
    record = env._read_cache()[key]
    assert record["how"] == "observed" and record["flops"] > 1e3
    assert dev.observe_mfu(record["flops"] / 2, record["flops"], CPU, "fp32") == (0.5, record["flops"])
