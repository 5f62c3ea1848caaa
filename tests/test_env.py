"""`scratchlm env` and the cached matmul peak."""

from __future__ import annotations

import json

import pytest
import torch

from scratchlm import env
from scratchlm.cli import main


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SCRATCHLM_CACHE", str(tmp_path))
    return tmp_path / env.CACHE_NAME


def test_peak_is_measured_once_then_read_from_the_cache(cache, monkeypatch):
    flops = env.peak_flops("cpu", torch.float32)  # the real probe, ~0.5 s
    assert flops > 1e8  # any CPU of this century does 0.1 GFLOP/s
    assert cache.exists() and list(json.loads(cache.read_text()).values()) == [flops]

    def no_probe(*args, **kwargs):
        raise AssertionError("measured again despite the cache")

    monkeypatch.setattr(env, "_probe_matmul", no_probe)
    assert env.peak_flops("cpu", torch.float32) == flops
    assert env.peak_with_source("cpu", torch.float32) == (flops, "cached")


def test_remeasure_and_corrupt_cache(cache, monkeypatch):
    calls = []
    monkeypatch.setattr(env, "_probe_matmul", lambda device, dtype: calls.append(dtype) or 42e9)
    cache.write_text("{not json")
    assert env.peak_flops("cpu", torch.bfloat16) == 42e9  # a corrupt cache is measured over
    assert env.peak_flops("cpu", torch.bfloat16) == 42e9 and len(calls) == 1
    assert env.peak_flops("cpu", torch.bfloat16, remeasure=True) == 42e9 and len(calls) == 2
    key = env._cache_key("cpu", torch.bfloat16)
    assert "bf16" in key and torch.__version__ in key and json.loads(cache.read_text())[key] == 42e9


def test_datasheet_table_is_ordered_specific_first():
    names = [n for n, _ in env.DATASHEET_PEAKS]
    for i, a in enumerate(names):
        assert not any(a in b for b in names[i + 1:]), f"{a!r} would shadow a later, more specific entry"


def test_env_cli_prints_the_facts(cache, monkeypatch, capsys):
    monkeypatch.setattr(env, "_probe_matmul", lambda device, dtype: 1.5e11)
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert torch.__version__ in out and "fp32" in out and "threads" in out
    assert "cpu fp32: 0.15 TFLOP/s (measured)" in out
    assert main(["env"]) == 0 and "(cached)" in capsys.readouterr().out
