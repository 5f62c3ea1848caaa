"""Where a run computes and how: the device, the CPU thread count, the autocast precision, and the
matmul peak its MFU is measured against. Every stage (pretraining, SFT, classification,
sampling, chat) picks its device here, so `auto` means the same thing everywhere.

- Device: `auto` is a CUDA GPU, else Apple MPS, else the CPU; an explicit device must exist.
- Threads: OpenMP threads that wait for work spin on their core. When another process holds one
  of two cores, two threads spinning on the one left made training 18x slower; so `auto` uses
  the cores that are free now: their idle share in /proc/stat over `FREE_CORES_WINDOW_S`
  (the load average where there is no /proc/stat), never more than torch's current count. An
  explicit `train.threads`, or OMP_NUM_THREADS, wins. (The CLI also makes idle OpenMP threads
  sleep rather than spin, for load that arrives after the choice; see `scratchlm.cli.main`.)
- Precision: `auto` is bf16 on a GPU that supports it. On a CPU it is decided by measurement,
  not by a CPU flag (AMX, avx512_bf16 and emulated bf16 differ widely, and casts can cost more
  than the faster matmul saves on small shapes): the forward + backward of each of the model's
  linear shapes is timed in fp32 and under bf16 autocast (`scratchlm.env.linear_times`, cached
  per machine), weighted by how often the model uses that shape, and bf16 is chosen when it is
  at least `BF16_MARGIN` times faster. The margin stands for what the linears leave out:
  attention, norms and the element-wise ops gain less from bf16 or lose to its casts.
  Mixture-of-experts expert weights (not `nn.Linear`) are left out of the measurement.
- MFU: achieved model FLOP/s over the measured matmul peak; a run that achieves more than the
  cached peak raises it (`scratchlm.env.raise_peak`), so MFU never passes 100%.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from scratchlm.env import timing as env
from scratchlm.errors import UserError

# bf16 must beat fp32 by this factor on the linears to be chosen: the rest of a step gains less. On
# a busy AMD EPYC (avx512_bf16, no AMX; 1 thread) the tiny demo model's linears ran 2.7x faster, a whole step 1.16x.
BF16_MARGIN = 1.3
MAX_PROBE_ROWS = 1024  # rows timed per linear: enough for the fp32/bf16 ratio, bounded for large batches
FREE_CORES_WINDOW_S = 0.1  # /proc/stat counts in 10 ms ticks: 10 per core
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ----------------------------------------------------------------------------------------------
# the device


def pick_device(name: str, flag: str = "--train.device") -> torch.device:
    """The device for `name` (auto | cpu | cuda | cuda:N | mps); `flag` is the setting named in errors."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"{flag}={name!r} is not a device", fix="use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"{flag}={name} but no CUDA GPU is visible", fix=f"use {flag}=auto or {flag}=cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"{flag}={name} but Apple MPS is not available here", fix=f"use {flag}=auto or {flag}=cpu")
    return device


# ----------------------------------------------------------------------------------------------
# threads


def _cores() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def _cpu_times() -> dict[int, tuple[int, int]]:
    """{cpu: (idle jiffies, total jiffies)} from /proc/stat; empty where there is none."""
    times: dict[int, tuple[int, int]] = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return times
    for line in lines:
        name, *fields = line.split()
        if name.startswith("cpu") and name[3:].isdigit():
            values = [int(v) for v in fields]
            idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
            times[int(name[3:])] = (idle, sum(values[:8]))  # guest time is already inside user time
    return times


def free_cores() -> tuple[float, int]:
    """(cores' worth of idle time among ours over the next `FREE_CORES_WINDOW_S` seconds, cores we
    may use). This process sleeps while it looks, so whatever is busy belongs to something else."""
    cores = _cores()
    before = _cpu_times()
    if before:
        time.sleep(FREE_CORES_WINDOW_S)
        after = _cpu_times()
        idle = 0.0
        for c in cores:
            if c in before and c in after:
                d_idle, d_total = after[c][0] - before[c][0], after[c][1] - before[c][1]
                idle += min(1.0, d_idle / d_total) if d_total > 0 else 1.0
        return idle, len(cores)
    if hasattr(os, "getloadavg"):  # macOS, BSD: the 1-minute run queue length
        return max(0.0, len(cores) - os.getloadavg()[0]), len(cores)
    return float(len(cores)), len(cores)


def pick_threads(setting: int = 0) -> tuple[int, str]:
    """(torch threads for a run, why) for `train.threads` (0 = auto).

    auto: the cores free now, rounded so that a core ~70% idle counts (noise from small
    background jobs must not cost a core), at least 1 and at most torch's current count (which
    OMP_NUM_THREADS, or a program's own `torch.set_num_threads`, already set)."""
    if setting > 0:
        return setting, f"train.threads={setting}"
    current = torch.get_num_threads()
    if os.environ.get("OMP_NUM_THREADS"):
        return current, f"OMP_NUM_THREADS={os.environ['OMP_NUM_THREADS']}"
    if current == 1:
        return 1, "auto: torch is set to 1"  # nothing to lower: skip the look at the cores
    idle, cores = free_cores()
    free = min(cores, int(idle + 0.3))
    why = f"auto: {free} of {cores} cores free"
    if current < free:
        why += f", torch set to {current}"
    return max(1, min(current, free)), why


# ----------------------------------------------------------------------------------------------
# precision


def linear_shapes(model: nn.Module, rows: int) -> Counter[tuple[int, int, int]]:
    """{(rows, in, out): how many of the model's linear layers have that shape}; a weight shared
    by two modules (tied embeddings) counts once per module, as it is used once per module."""
    rows = min(rows, MAX_PROBE_ROWS)
    return Counter((rows, m.in_features, m.out_features) for m in model.modules() if isinstance(m, nn.Linear))


def pick_precision(choice: str, device: torch.device,
                   shapes: Counter[tuple[int, int, int]] | None = None) -> tuple[str, str]:
    """(precision, why) for `train.precision`; auto on a CPU times `shapes` (see `linear_shapes`)."""
    if choice not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"train.precision={choice!r} is unknown", fix="use auto, fp32, bf16 or fp16")
    if choice == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA GPU", fix="use bf16 or fp32 on this device")
    if choice != "auto":
        return choice, "set"
    if device.type == "cuda":
        return ("bf16", "auto: GPU supports bf16") if torch.cuda.is_bf16_supported() else ("fp16", "auto: no bf16")
    if device.type != "cpu":
        return "fp32", f"auto: fp32 on {device.type}"
    if not shapes:
        return "fp32", "auto: no linear layers to speed up"
    if not env.runs("cpu", torch.bfloat16):
        return "fp32", "auto: bf16 does not run on this CPU"
    times = env.linear_times("cpu", list(shapes))
    speedup = sum(n * times[s][0] for s, n in shapes.items()) / sum(n * times[s][1] for s, n in shapes.items())
    if speedup >= BF16_MARGIN:
        return "bf16", f"auto: bf16 {speedup:.1f}x faster than fp32 at this model's shapes (measured)"
    return "fp32", (f"auto: bf16 only {speedup:.2f}x as fast as fp32 at this model's shapes (measured; "
                    f"{BF16_MARGIN}x would pay for the casts elsewhere)")


def autocast_ctx(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISION_DTYPES[precision])


# ----------------------------------------------------------------------------------------------
# MFU


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The matmul peak (FLOP/s) the run's MFU is measured against, or None where it cannot be had."""
    try:
        return env.peak_flops(device.type, PRECISION_DTYPES[precision])
    except Exception as e:  # an unmeasurable peak only costs the MFU column
        print(f"(MFU unavailable: {e})", file=sys.stderr)
        return None


def observe_mfu(achieved: float, peak: float | None, device: torch.device,
                precision: str) -> tuple[float | None, float | None]:
    """(MFU, the peak now in force) for `achieved` model FLOP/s. Achieving more than the peak proves
    the peak was measured low (on a busy machine): it is raised, in the cache too, so MFU is at
    most 1 and the next run starts from the better figure."""
    if not peak:
        return None, peak
    if achieved > peak:
        peak = env.raise_peak(device.type, PRECISION_DTYPES[precision], achieved)
    return achieved / peak, peak
