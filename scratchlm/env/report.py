"""The report `scratchlm env` prints (`env_lines`): the device (CPU model and its vector/matrix
extensions, CUDA GPUs, Apple MPS), the torch version and build, the thread count, the precisions
that run here, and the peak matmul throughput in TFLOP/s with where each figure came from
(timing.py: measured, cached, raised by a training run, or a datasheet's).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import torch

from scratchlm.env.machine import NATIVE_BF16_FLAGS, cpu_flags, cpu_name
from scratchlm.env.timing import DTYPE_NAMES, forget_linear_times, peak_with_source, runs


def _precisions(device: str) -> list[str]:
    kind = torch.device(device).type
    names = ["fp32"]
    if kind == "cuda":
        major, _ = torch.cuda.get_device_capability(torch.device(device))
        if major >= 8:
            names.append("tf32")
        if torch.cuda.is_bf16_supported():
            names.append("bf16")
        names.append("fp16")
    elif kind == "mps":
        names += [n for n, dt in (("fp16", torch.float16), ("bf16", torch.bfloat16)) if runs(device, dt)]
    elif runs("cpu", torch.bfloat16):
        native = NATIVE_BF16_FLAGS & set(cpu_flags())
        names.append(f"bf16 ({'native: ' + ', '.join(sorted(native)) if native else 'emulated: no bf16 units'})")
    return names


def _peak_line(device: str, dtype: torch.dtype, remeasure: bool) -> str:
    flops, source = peak_with_source(device, dtype, remeasure)
    return f"{device} {DTYPE_NAMES[dtype]}: {flops / 1e12:.3g} TFLOP/s ({source})"


def env_lines(remeasure: bool = False, threads: tuple[int, str] | None = None) -> Iterator[str]:
    """The report's lines: the device, torch build, precisions, then the matmul peaks, each measured
    only when its line is asked for (so a caller can show the facts first); `threads` is what
    training would use and why (`train.device.pick_threads`, which builds on this module)."""
    rows: list[tuple[str, str]] = []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    rows.append(("cpu", f"{cpu_name()} ({cores} cores available)"))
    flags = cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    rows.append(("cpu extensions", f"{' '.join(flags) or 'none reported'} (torch kernels: {capability})"))
    devices = ["cpu"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, {p.total_memory / 2**30:.1f} GiB, compute {p.major}.{p.minor}"))
        devices.append("cuda")
    else:
        rows.append(("cuda", "not available"))
    if torch.backends.mps.is_available():
        rows.append(("mps", "Apple MPS available"))
        devices.append("mps")
    rows.append(("torch", torch.__version__))
    if torch.version.cuda:
        build = f"CUDA {torch.version.cuda}"
        if torch.backends.cudnn.is_available():
            build += f", cuDNN {torch.backends.cudnn.version()}"
    elif getattr(torch.version, "hip", None):
        build = f"ROCm {torch.version.hip}"
    else:
        build = "CPU only"
    extras = [n for n, ok in (("MKL", torch.backends.mkl.is_available()),
                              ("oneDNN", torch.backends.mkldnn.is_available())) if ok]
    rows.append(("build", build + (f" ({', '.join(extras)})" if extras else "")))
    rows.append(("threads", f"{torch.get_num_threads()} (torch.get_num_threads)"
                 + (f"; training would use {threads[0]} ({threads[1]})" if threads else "")))
    for dev in devices:
        rows.append((f"precisions {dev}", ", ".join(_precisions(dev))))

    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        yield f"{key:<{width}}  {value}"

    # The peaks last: they may take a second to measure, and the facts above are already shown.
    peaks = [("cpu", torch.float32)]
    if runs("cpu", torch.bfloat16):
        peaks.append(("cpu", torch.bfloat16))
    if "cuda" in devices:
        peaks += [("cuda", torch.float32), ("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else
                                            torch.float16)]
    if "mps" in devices:
        peaks.append(("mps", torch.float32))
    if remeasure:  # the fp32 / bf16 timings behind precision=auto are measured again when next needed
        forget_linear_times()
    for i, (dev, dtype) in enumerate(peaks):
        yield f"{'peak matmul' if i == 0 else '':<{width}}  {_peak_line(dev, dtype, remeasure)}"
