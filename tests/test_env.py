"""`scratchlm env`, the cached matmul peak (measured robustly, raised by observation) and the
cached fp32 / bf16-autocast timings of a linear layer."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm.cli import main
from scratchlm.env import timing as env


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path))
    return tmp_path / env.CACHE_NAME


@pytest.fixture
def quick_rounds(monkeypatch):
    """Timing rounds of one call each, without pauses: the tests check what is kept, not the clock."""
    monkeypatch.setattr(env, "ROUND_S", 0.0)
    monkeypatch.setattr(env, "PAUSE_S", 0.0)


def fake_probe(flops: float, calls: list | None = None):
    def probe(device, dtype):
        if calls is not None:
            calls.append(dtype)
        return flops, 7
    return probe


def test_peak_is_measured_once_then_read_from_the_cache(cache, quick_rounds, monkeypatch):
    flops, source = env.peak_with_source("cpu", torch.float32)  # the real probe
    assert flops > 1e8  # any CPU of this century does 0.1 GFLOP/s
    assert source.startswith("measured ") and f"in {env.ROUNDS} rounds" in source
    record = next(iter(json.loads(cache.read_text()).values()))
    assert record["flops"] == flops and record["how"] == "measured" and record["calls"] >= env.ROUNDS

    def no_probe(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(env, "_probe_matmul", no_probe)
    assert env.peak_flops("cpu", torch.float32) == flops
    assert env.peak_with_source("cpu", torch.float32) == (flops, "cached; " + source)


def test_the_peak_is_the_fastest_call_of_several_rounds(quick_rounds, monkeypatch):
    """A busy machine slows most calls; one undisturbed call in a later round sets the peak."""
    times = iter([0.05, 0.05] + [0.05, 0.05, 0.05, 0.01, 0.05])  # warm-up, size check, then one per round
    monkeypatch.setattr(env, "_time_call", lambda fn, device: next(times))
    flops, calls = env._probe_matmul("cpu", torch.float32)
    assert calls == env.ROUNDS == 5
    assert flops == pytest.approx(2 * 512**3 / 0.01, rel=1e-12)


def test_a_faster_observation_raises_the_cached_peak(cache, monkeypatch, capsys):
    """Regression: a peak measured while the machine was busy was trusted forever (MFU 174%)."""
    monkeypatch.setattr(env, "_probe_matmul", fake_probe(1e9))
    assert env.peak_flops("cpu", torch.float32) == 1e9
    assert env.raise_peak("cpu", torch.float32, 5e8) == 1e9  # slower than the peak: nothing changes
    assert env.peak_with_source("cpu", torch.float32)[1].startswith("cached; measured")
    assert env.raise_peak("cpu", torch.float32, 3e9) == 3e9
    flops, source = env.peak_with_source("cpu", torch.float32)
    assert flops == 3e9 and source.startswith("cached; raised ") and "training run" in source
    assert json.loads(cache.read_text())[env._cache_key("cpu", torch.float32)]["how"] == "observed"
    assert main(["env"]) == 0
    assert "cpu fp32: 0.003 TFLOP/s (cached; raised " in capsys.readouterr().out


def test_remeasure_corrupt_and_old_format_cache(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(env, "_probe_matmul", fake_probe(42e9, calls))
    cache.write_text("{not json")
    assert env.peak_flops("cpu", torch.bfloat16) == 42e9  # a corrupt cache is measured over
    assert env.peak_flops("cpu", torch.bfloat16) == 42e9 and len(calls) == 1
    assert env.peak_flops("cpu", torch.bfloat16, remeasure=True) == 42e9 and len(calls) == 2
    key = env._cache_key("cpu", torch.bfloat16)
    assert "bf16" in key and torch.__version__ in key and json.loads(cache.read_text())[key]["flops"] == 42e9
    cache.write_text(json.dumps({key: 1e15}))  # the old format: a bare number, origin unknown
    assert env.peak_flops("cpu", torch.bfloat16) == 42e9 and len(calls) == 3


def test_linear_times_are_measured_once_per_shape(cache, quick_rounds, monkeypatch):
    times = env.linear_times("cpu", [(8, 16, 32), (8, 32, 16)])  # the real probe, tiny shapes
    assert set(times) == {(8, 16, 32), (8, 32, 16)} and all(t > 0 for pair in times.values() for t in pair)
    probed = []

    def probe(device, shapes):
        probed.append(shapes)
        return [(2.0, 1.0)] * len(shapes), 3

    monkeypatch.setattr(env, "_probe_linears", probe)
    assert env.linear_times("cpu", [(8, 32, 16)]) == {(8, 32, 16): times[(8, 32, 16)]} and probed == []
    assert env.linear_times("cpu", [(8, 16, 32), (8, 16, 64)]) == {(8, 16, 32): times[(8, 16, 32)],
                                                                  (8, 16, 64): (2.0, 1.0)}
    assert probed == [[(8, 16, 64)]]  # only the new shape was timed
    assert any("linear 8x16->64" in k for k in json.loads(cache.read_text()))
    monkeypatch.setattr(env, "_probe_matmul", fake_probe(1e9))
    assert main(["env", "--remeasure"]) == 0  # timings from a busy day are not kept forever either
    assert not any("linear" in k for k in json.loads(cache.read_text()))


def test_datasheet_table_is_ordered_specific_first():
    names = [n for n, _ in env.DATASHEET_PEAKS]
    for i, a in enumerate(names):
        assert not any(a in b for b in names[i + 1:]), f"{a!r} would shadow a later, more specific entry"


def test_env_cli_prints_the_facts(cache, monkeypatch, capsys):
    monkeypatch.setattr(env, "_probe_matmul", fake_probe(1.5e11))
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "fp32" in out and "training would use" in out
    assert "cpu fp32: 0.15 TFLOP/s (measured " in out and "best of 7 calls in 5 rounds" in out
    assert main(["env"]) == 0 and "(cached; measured " in capsys.readouterr().out
