"""How fast this machine multiplies: the matmul peak that MFU is measured against, and how fast a
linear layer runs in fp32 and under bf16 autocast (what `precision=auto` decides by), each
measured once and cached on disk.

`peak_flops(device, dtype)` is the denominator of model FLOPs utilisation. On a CPU there is no
datasheet figure to trust (it depends on the cores we were given, the clock under load and the
kernels torch's build dispatches to), so it is measured: square matmuls, growing from 512 until
one takes ~20 ms (at most 2048 on a CPU), then timed in several rounds with pauses between them,
keeping the fastest call: another process's burst of work rarely covers every round. A machine
that stays busy through the whole measurement still gives a peak that is too low, so the figure
is not trusted forever: when a training run achieves more FLOP/s than the cached peak,
`raise_peak` raises it (MFU can never pass 100%, and the peak corrects itself). On a CUDA GPU
listed in `DATASHEET_PEAKS`, bf16 and fp16 use the vendor's dense tensor-core peak instead, as
MFU is conventionally reported (a measured matmul reaches ~70-80% of it).

`linear_times(device, shapes)` times a linear layer's forward + backward at each (rows, d_in,
d_out) shape, in fp32 and under bf16 autocast, all interleaved in the same rounds; autocast's
casts of the input and the weight are inside the timed call, since on small shapes they cost
more than the faster matmul saves.

Every result is cached as JSON in the scratchlm cache folder (`$SCRATCHLM_CACHE`, else
`~/.cache/scratchlm`), keyed by device name, torch version, thread count, dtype (and shape),
with when it was measured, from how many calls, and the load average then; only the first call
(or `--remeasure`) pays for it. Entries in an older format are measured again.

Left out: memory bandwidth, multi-GPU interconnect, and power/clock state.
"""

from __future__ import annotations

import contextlib
import functools
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from scratchlm.env.machine import device_name
from scratchlm.io import cache_dir, write_json

# Dense (no 2:4 sparsity) tensor-core peaks from NVIDIA's datasheets, FLOP/s, by a substring of
# torch.cuda.get_device_name; the first match wins, so more specific names come first.
DATASHEET_PEAKS: list[tuple[str, dict[str, float]]] = [
    ("H100 PCIe", {"bf16": 756e12, "fp16": 756e12}),
    ("H100", {"bf16": 989e12, "fp16": 989e12}),  # SXM
    ("H200", {"bf16": 989e12, "fp16": 989e12}),
    ("A100", {"bf16": 312e12, "fp16": 312e12}),
    ("L40S", {"bf16": 362e12, "fp16": 362e12}),
    ("L4", {"bf16": 121e12, "fp16": 121e12}),
    ("RTX 4090", {"bf16": 165e12, "fp16": 165e12}),  # with fp32 accumulation
    ("V100", {"fp16": 125e12}),
    ("T4", {"fp16": 65e12}),
]

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CACHE_NAME = "peak_flops.json"

# Timing: the fastest call over ROUNDS rounds of at least ROUND_S seconds each, PAUSE_S apart.
ROUNDS = 5
ROUND_S = 0.08
PAUSE_S = 0.05


# ----------------------------------------------------------------------------------------------
# the device


def _sync(device: str) -> None:
    kind = torch.device(device).type
    if kind == "cuda":
        torch.cuda.synchronize(torch.device(device))
    elif kind == "mps":
        torch.mps.synchronize()


def runs(device: str, dtype: torch.dtype) -> bool:
    """Whether a small matmul in this dtype runs on this device and gives finite numbers."""
    try:
        a = torch.ones(16, 16, device=device, dtype=dtype)
        return bool(torch.isfinite((a @ a).float()).all())
    except (RuntimeError, TypeError):
        return False


# ----------------------------------------------------------------------------------------------
# timing


def _time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds one call of `fn` takes on `device`, its queued work included."""
    _sync(device)
    t0 = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t0


def _best_times(fns: list[Callable[[], object]], device: str) -> tuple[list[float], int]:
    """([fastest seconds per fn], the fewest calls any fn got). The fns take turns in the same
    rounds, so a burst of load outside hits them alike; within a round each is called for
    ROUND_S / len(fns) seconds (at least once). The fastest call is the least disturbed one."""
    best, calls = [math.inf] * len(fns), [0] * len(fns)
    for r in range(ROUNDS):
        if r:
            time.sleep(PAUSE_S)  # let a burst of another process's work end
        for i, fn in enumerate(fns):
            deadline = time.perf_counter() + ROUND_S / len(fns)
            while True:
                best[i] = min(best[i], _time_call(fn, device))
                calls[i] += 1
                if time.perf_counter() >= deadline:
                    break
    return best, min(calls)


def _randn(shape: tuple[int, ...], device: str, seed: int = 0) -> torch.Tensor:
    # Normal values (not zeros or ones) so no kernel can shortcut; made on the CPU for portability.
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(device)


def _probe_matmul(device: str, dtype: torch.dtype) -> tuple[float, int]:
    """(best FLOP/s of an (n, n) @ (n, n) matmul (2n^3 FLOPs), calls timed). n grows from 512
    until one call takes ~20 ms, then calls are timed in rounds (`_best_times`)."""
    n, n_max = 512, (2048 if torch.device(device).type == "cpu" else 8192)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _randn((n, n), device, 0).to(dtype), _randn((n, n), device, 1).to(dtype)

    mm = functools.partial(torch.mm, *make(n))
    _time_call(mm, device)  # warm-up: thread pool start, kernel selection
    while n < n_max and _time_call(mm, device) < 0.02:
        n *= 2
        mm = functools.partial(torch.mm, *make(n))
        _time_call(mm, device)
    (best,), calls = _best_times([mm], device)
    return 2.0 * n**3 / best, calls


def _linear_step(device: str, rows: int, d_in: int, d_out: int, autocast: bool) -> Callable[[], None]:
    """Forward + backward of a linear layer without bias, x (rows, d_in) @ W (d_out, d_in)^T, the
    gradients of both included; under bf16 autocast the casts of x and W are part of it."""
    x = _randn((rows, d_in), device, 0).requires_grad_()
    w = (_randn((d_out, d_in), device, 1) / d_in**0.5).requires_grad_()
    g = _randn((rows, d_out), device, 2)

    def step() -> None:
        x.grad = w.grad = None
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=autocast):
            y = F.linear(x, w)
        y.backward(g.to(y.dtype))

    step()  # warm-up
    return step


def _probe_linears(device: str, shapes: list[tuple[int, int, int]]) -> tuple[list[tuple[float, float]], int]:
    """([(fp32 seconds, bf16-autocast seconds) per (rows, d_in, d_out) shape], calls of each), all
    timed in the same rounds."""
    fns = [_linear_step(device, *shape, autocast) for shape in shapes for autocast in (False, True)]
    best, calls = _best_times(fns, device)
    return list(zip(best[0::2], best[1::2])), calls


# ----------------------------------------------------------------------------------------------
# the cache


def _key(device: str, what: str) -> str:
    return f"{device_name(device)}|torch {torch.__version__}|{torch.get_num_threads()} threads|{what}"


def _cache_key(device: str, dtype: torch.dtype) -> str:
    return _key(device, DTYPE_NAMES[dtype])


def _linear_key(device: str, rows: int, d_in: int, d_out: int) -> str:
    return _key(device, f"linear {rows}x{d_in}->{d_out} forward+backward, fp32 vs bf16 autocast")


def _read_cache() -> dict[str, dict[str, Any]]:
    """The cached records; an absent or corrupt file, or an entry in an older format, is left out
    (measured again and rewritten)."""
    try:
        data = json.loads((cache_dir() / CACHE_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): v for k, v in data.items() if isinstance(v, dict) and "when" in v}


def _write_records(records: dict[str, dict[str, Any]], drop: Callable[[str], bool] = lambda key: False) -> None:
    """Add `records` to the cache file, leaving out the keys `drop` names."""
    cache = _read_cache()  # read again just before writing: another process may have added entries
    cache = {k: v for k, v in cache.items() if not drop(k)} | records
    with contextlib.suppress(OSError):  # a read-only cache folder costs a re-measurement next time, nothing more
        write_json(cache_dir() / CACHE_NAME, cache)


def _measured(calls: int) -> dict[str, Any]:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    return {"how": "measured", "when": time.strftime("%Y-%m-%d %H:%M"), "calls": calls, "rounds": ROUNDS,
            "load": None if load is None else round(load, 2)}


def describe(record: dict[str, Any]) -> str:
    """Where a cached figure came from, in words: "measured 2025-01-31 14:02, best of 60 calls in
    5 rounds, load 0.31" or "raised 2025-01-31 14:05 by a training run that achieved it"."""
    if record.get("how") == "observed":
        return f"raised {record['when']} by a training run that achieved it"
    load = f", load {record['load']:.2f}" if record.get("load") is not None else ""
    return f"measured {record['when']}, best of {record['calls']} calls in {record['rounds']} rounds{load}"


# ----------------------------------------------------------------------------------------------
# the matmul peak


def datasheet_peak(device: str, dtype: torch.dtype) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = device_name(device)
    for pattern, peaks in DATASHEET_PEAKS:
        if pattern in name:
            return peaks.get(DTYPE_NAMES[dtype])
    return None


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"no peak for {dtype}; use one of {', '.join(map(str, DTYPE_NAMES))}")


def peak_with_source(device: str = "cpu", dtype: torch.dtype = torch.float32,
                     remeasure: bool = False) -> tuple[float, str]:
    """(FLOP/s, where it came from: "datasheet", or `describe`'s words for a measured or raised
    peak, after "cached; " when read from the cache)."""
    _check_dtype(dtype)
    sheet = datasheet_peak(device, dtype)
    if sheet is not None:
        return sheet, "datasheet"
    key = _cache_key(device, dtype)
    record = _read_cache().get(key)
    if record and record.get("flops", 0) > 0 and not remeasure:
        return float(record["flops"]), "cached; " + describe(record)
    flops, calls = _probe_matmul(device, dtype)
    record = {"flops": flops, **_measured(calls)}
    _write_records({key: record})
    return flops, describe(record)


def peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, remeasure: bool = False) -> float:
    """Peak matmul FLOP/s on `device` in `dtype`: measured once and cached (or a GPU datasheet
    figure; see the module docstring). The denominator of MFU."""
    return peak_with_source(device, dtype, remeasure)[0]


def raise_peak(device: str, dtype: torch.dtype, achieved: float) -> float:
    """The peak once `achieved` FLOP/s has been seen to happen: a cached peak below it was measured
    while the machine was busy, so it is raised to `achieved` (and cached, saying so). Returns the
    peak now in force, never below `achieved`."""
    _check_dtype(dtype)
    sheet = datasheet_peak(device, dtype)
    if sheet is not None:
        return max(sheet, achieved)  # a datasheet is not ours to rewrite
    key = _cache_key(device, dtype)
    record = _read_cache().get(key, {})
    if record.get("flops", 0) >= achieved:
        return float(record["flops"])
    _write_records({key: {"flops": achieved, "how": "observed", "when": time.strftime("%Y-%m-%d %H:%M")}})
    return achieved


# ----------------------------------------------------------------------------------------------
# fp32 against bf16 autocast at a model's shapes


def linear_times(device: str, shapes: list[tuple[int, int, int]]) -> dict[tuple[int, int, int], tuple[float, float]]:
    """{(rows, d_in, d_out): (fp32 seconds, bf16-autocast seconds)} for forward + backward of a
    linear layer at each shape: measured once per machine, thread count and shape (the shapes not
    in the cache together), then cached."""
    cache = _read_cache()
    times: dict[tuple[int, int, int], tuple[float, float]] = {}
    for shape in shapes:
        record = cache.get(_linear_key(device, *shape), {})
        if record.get("fp32_s", 0) > 0 and record.get("bf16_s", 0) > 0:
            times[shape] = (float(record["fp32_s"]), float(record["bf16_s"]))
    missing = [shape for shape in dict.fromkeys(shapes) if shape not in times]
    if missing:
        measured, calls = _probe_linears(device, missing)
        times.update(zip(missing, measured))
        _write_records({_linear_key(device, *shape): {"fp32_s": fp32, "bf16_s": bf16, **_measured(calls)}
                        for shape, (fp32, bf16) in zip(missing, measured)})
    return times


def forget_linear_times() -> None:
    """Drop every cached linear timing, so `linear_times` measures them again when next asked
    (`scratchlm env --remeasure`: timings from a busy day are not kept forever)."""
    _write_records({}, drop=lambda key: "|linear " in key)
