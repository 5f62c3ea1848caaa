"""Fitting a run in memory, applied to a model from outside: activation checkpointing, and the
largest micro-batch that fits a memory budget (`train.micro_batch=auto`).

A block's backward needs tensors its forward made (the inputs of each matmul, the attention
probabilities or what the fused kernel keeps, the MLP's hidden activations): ordinarily they stay
in memory from the forward until the backward, which for a deep model is most of the memory a
step uses. `checkpoint_blocks(model, k)` makes every k-th block keep only its input and run its
forward a second time in the backward to remake the rest (`torch.utils.checkpoint`, the
non-reentrant kind that composes with FSDP2 and torch.compile):

- k = 1 checkpoints every block: activation memory falls to one tensor (B, T, C) per block, and a
  step costs about one more forward of the blocks (from 3x to 4x the forward's FLOPs);
- k > 1 checkpoints blocks 0, k, 2k, ...: a middle point between memory and compute.

The gradients are those of the plain model (the recompute runs the same operations in the same
order; dropout draws the same masks, as the RNG state is restored). The block's forward is
replaced on the instance, so the weights keep their names and checkpoints do not change.

`train.micro_batch=auto` keeps the step's batch (batch_size x grad_accum sequences) and chooses
how many of them go through the model at once: the largest divisor m of the rows a process runs
per step whose forward and backward peak fits `train.memory_budget_gb` (default: 90% of the GPU's
memory, or on a CPU 80% of the RAM available now plus what the process holds). `fit_micro_batch`
measures the peak at the two smallest sizes (CUDA's allocator peak; on Linux CPUs the resident
set's high-water mark, reset through /proc/self/clear_refs), extrapolates the line with room for
AdamW's two moments, then tries its pick, stepping down to the next divisor while the trial
runs out of memory or over the budget. The loop then cuts each step's rows into micro-batches of
m (`rechunk`): the same rows, weighted by their valid targets, so the same loss as any other
split. A step that still runs out of memory (or, on a CPU, where the kernel's OOM killer would end
the run rather than an exception, a step whose peak passes the budget) halves m and carries on.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from torch.utils.flop_counter import FlopCounterMode

from scratchlm.errors import UserError

# a pick is tried against this much of the budget (the line through two small sizes is an estimate)
SAFETY = 0.9


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # inference, evaluation: nothing to save, nothing to recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module, every: int = 1) -> list[int]:
    """Checkpoint blocks 0, every, 2*every, ... of `model.blocks` in place; returns their indices."""
    if every < 1:
        raise ValueError(f"every={every} must be >= 1")
    done = []
    for i, block in enumerate(model.blocks):
        if i % every == 0 and not getattr(block, "_checkpointed", False):
            block.forward = functools.partial(_checkpointed, block.forward)
            block._checkpointed = True
            done.append(i)
    return done


def step_costs(model: nn.Module, *inputs: torch.Tensor) -> tuple[int, int]:
    """(bytes autograd keeps from the forward for the backward, FLOPs of forward + backward) of one
    step of `model(*inputs)` (its loss, or the sum of its output), counted with
    `saved_tensors_hooks` and `FlopCounterMode`. A checkpointed block keeps only its inputs, and its
    forward is counted again in the backward. The gradients are left in place."""
    kept = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal kept
        kept += t.numel() * t.element_size()
        return t

    with FlopCounterMode(display=False) as flops:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(*inputs)
        loss = out[1] if isinstance(out, tuple) else out.sum()
        loss.backward()
    return kept, flops.get_total_flops()


# ----------------------------------------------------------------------------------------------
# memory: budget and peak


def _status_kib(field: str) -> int | None:
    try:
        m = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M)
    except OSError:
        return None
    return int(m.group(1)) if m else None


def memory_budget(device: torch.device, gib: float = 0.0) -> int:
    """Bytes a process may use: `gib` GiB when set, else 90% of the GPU's memory, or on a CPU 80%
    of the memory available now plus what this process already holds."""
    if gib > 0:
        return int(gib * 2**30)
    if device.type == "cuda":
        return int(0.9 * torch.cuda.get_device_properties(device).total_memory)
    try:
        avail = int(re.search(r"^MemAvailable:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M).group(1))
    except (OSError, AttributeError):
        avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
        return int(0.8 * avail)
    return int((0.8 * avail + (_status_kib("VmRSS") or 0)) * 1024)


def reset_peak(device: torch.device) -> None:
    """Start measuring the peak afresh (CUDA: the allocator's; a Linux CPU: the resident set's)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    with contextlib.suppress(OSError):
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current resident set


def read_peak(device: torch.device) -> int:
    """Bytes at the peak since `reset_peak` (0 where it cannot be read)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return (_status_kib("VmHWM") or 0) * 1024


def is_oom(e: BaseException) -> bool:
    """An out-of-memory error: CUDA's, or a CPU allocation that failed."""
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


# ----------------------------------------------------------------------------------------------
# micro-batch size


def divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def smaller_micro_batch(m: int, rows: int) -> int | None:
    """The micro-batch after running out of memory at m: the largest divisor of rows <= m / 2."""
    below = [d for d in divisors(rows) if d <= m // 2]
    return below[-1] if below else None


def one_sequence_too_big(what: str) -> UserError:
    """The error when even one sequence per micro-batch does not fit (`what`: where and how)."""
    return UserError(what, fix="lower --model.block_size, use --train.activation_checkpointing=1, or raise "
                               "--train.memory_budget_gb")


def _peak_or_none(trial: Callable[[int], int], m: int) -> int | None:
    """trial(m), or None where it runs out of memory."""
    try:
        return trial(m)
    except RuntimeError as e:
        if not is_oom(e):
            raise
        return None


def fit_micro_batch(trial: Callable[[int], int], rows: int, budget: int, extra: int = 0) -> tuple[int, str]:
    """(micro-batch, why): the largest divisor m of `rows` whose `trial(m)` (a forward and backward
    of m rows; returns its peak bytes, or raises out of memory) stays within `budget` once `extra`
    bytes (the optimizer's moments, not yet allocated) are added. Under torchrun every rank must
    see the same peaks and the same out-of-memory errors (the loop's trial agrees them by all_max)."""
    sizes = divisors(rows)
    if len(sizes) == 1:
        return 1, "auto: 1 row per step"
    p1 = _peak_or_none(trial, sizes[0])
    if p1 is None:
        raise one_sequence_too_big("train.micro_batch=auto: one sequence per micro-batch ran out of memory")
    p2 = _peak_or_none(trial, sizes[1])
    per_row = 0.0 if p2 is None else max(0.0, (p2 - p1) / (sizes[1] - sizes[0]))
    base = p1 - sizes[0] * per_row + extra
    fits = [d for d in sizes if base + d * per_row <= SAFETY * budget] or [sizes[0]]
    i = 0 if p2 is None else sizes.index(fits[-1])
    while True:
        m = sizes[i]
        peak = p1 if i == 0 else _peak_or_none(trial, m)  # one row was measured (and fit) above
        if peak is not None:
            peak += extra
        if peak is not None and (peak <= budget or i == 0):
            gib = 2**30
            return m, (f"auto: {m} rows of {rows} per micro-batch, peak {peak / gib:.2f} of a "
                       f"{budget / gib:.2f} GiB budget (about {per_row / 2**20:.1f} MiB per row)")
        i -= 1


def rechunk(micro: list[tuple[torch.Tensor, ...]], m: int) -> list[tuple[torch.Tensor, ...]]:
    """A step's micro-batches re-cut into micro-batches of m rows (the same rows, in order)."""
    if all(mb[0].size(0) == m for mb in micro):
        return micro
    parts = [torch.cat(tensors).split(m) for tensors in zip(*micro)]
    return list(zip(*parts))
