"""What this machine can do (`scratchlm env`), and the matmul peak that MFU is measured against.

`env_cli` prints the device (CPU model and its vector/matrix extensions, CUDA GPUs, Apple MPS),
the torch version and build, the thread count, the precisions that run here, and the peak
matmul throughput in TFLOP/s.

`peak_flops(device, dtype)` is the denominator of model FLOPs utilisation. On a CPU there is no
datasheet figure to trust (it depends on the cores we were given, the clock under load and the
kernels torch's build dispatches to), so it is measured: square matmuls, growing from 512 until
one takes ~20 ms (at most 2048 on a CPU), then ~0.3 s of timed calls, keeping the fastest.
The result is cached as JSON in the scratchlm cache folder (`$SCRATCHLM_CACHE`, else
`~/.cache/scratchlm`), keyed by device name, torch version, thread count and dtype, so only the
first call (or `--remeasure`) pays for it. On a CUDA GPU listed in `DATASHEET_PEAKS`, bf16 and
fp16 use the vendor's dense tensor-core peak instead, as MFU is conventionally reported (a
measured matmul reaches ~70-80% of it); other GPUs and dtypes are measured like the CPU.

Left out: memory bandwidth, multi-GPU interconnect, and power/clock state.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import subprocess
import time
from pathlib import Path

import torch

from scratchlm.data.sources import _cache_dir
from scratchlm.io import write_json

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

# CPU features worth knowing for matmul speed: x86 vector / matrix units, then Arm's.
INTERESTING_FLAGS = [
    "avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm", "sme",
]
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}
CACHE_NAME = "peak_flops.json"


# ----------------------------------------------------------------------------------------------
# the device


def _cpuinfo() -> dict[str, str]:
    """The first processor's fields from /proc/cpuinfo (Linux); empty elsewhere."""
    fields: dict[str, str] = {}
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields.get("model name") or fields.get("flags") or fields.get("Features"):
                break  # one processor is enough; the rest repeat it
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_name() -> str:
    info = _cpuinfo()
    if info.get("model name"):
        return info["model name"]
    if platform.system() == "Darwin":
        try:
            out = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True, text=True,
                                 timeout=2)
            if out.stdout.strip():
                return out.stdout.strip()
        except (OSError, subprocess.SubprocessError):
            pass
    return platform.processor() or platform.machine() or "unknown CPU"


def cpu_flags() -> list[str]:
    """The matmul-relevant extensions this CPU reports, in `INTERESTING_FLAGS` order."""
    info = _cpuinfo()
    have = set((info.get("flags") or info.get("Features") or "").split())
    return [f for f in INTERESTING_FLAGS if f in have]


def device_name(device: str) -> str:
    kind = torch.device(device).type
    if kind == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    if kind == "mps":
        return f"Apple MPS ({cpu_name()})"
    return cpu_name()


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
# the matmul peak


def _probe_matmul(device: str, dtype: torch.dtype, seconds: float = 0.3) -> float:
    """Best FLOP/s of an (n, n) @ (n, n) matmul (2n^3 FLOPs). n grows from 512 until one call
    takes ~20 ms, then calls are timed for `seconds` and the fastest is kept (the least disturbed
    by other processes and frequency changes)."""
    kind = torch.device(device).type
    n, n_max = 512, (2048 if kind == "cpu" else 8192)
    gen = torch.Generator(device="cpu").manual_seed(0)

    def make(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        # Normal values (not zeros or ones) so no kernel can shortcut; made on the CPU for portability.
        return tuple(torch.randn(n, n, generator=gen).to(device=device, dtype=dtype) for _ in range(2))

    def timed(a: torch.Tensor, b: torch.Tensor) -> float:
        _sync(device)
        t0 = time.perf_counter()
        torch.mm(a, b)
        _sync(device)
        return time.perf_counter() - t0

    a, b = make(n)
    timed(a, b)  # warm-up: thread pool start, kernel selection, lazy initialisation
    while n < n_max and timed(a, b) < 0.02:
        n *= 2
        a, b = make(n)
        timed(a, b)
    best = float("inf")
    deadline = time.perf_counter() + seconds
    while True:
        best = min(best, timed(a, b))
        if time.perf_counter() >= deadline:
            break
    return 2.0 * n**3 / best


def _cache_key(device: str, dtype: torch.dtype) -> str:
    return f"{device_name(device)}|torch {torch.__version__}|{torch.get_num_threads()} threads|{DTYPE_NAMES[dtype]}"


def _read_cache(path: Path) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return {str(k): float(v) for k, v in data.items()} if isinstance(data, dict) else {}
    except (OSError, ValueError, TypeError, AttributeError):
        return {}  # absent or corrupt: measure again and rewrite it


def datasheet_peak(device: str, dtype: torch.dtype) -> float | None:
    if torch.device(device).type != "cuda":
        return None
    name = device_name(device)
    for pattern, peaks in DATASHEET_PEAKS:
        if pattern in name:
            return peaks.get(DTYPE_NAMES[dtype])
    return None


def peak_with_source(device: str = "cpu", dtype: torch.dtype = torch.float32,
                     remeasure: bool = False) -> tuple[float, str]:
    """(FLOP/s, where it came from: "datasheet", "cached" or "measured")."""
    if dtype not in DTYPE_NAMES:
        raise ValueError(f"no peak for {dtype}; use one of {', '.join(map(str, DTYPE_NAMES))}")
    sheet = datasheet_peak(device, dtype)
    if sheet is not None:
        return sheet, "datasheet"
    path = _cache_dir() / CACHE_NAME
    key = _cache_key(device, dtype)
    cache = _read_cache(path)
    if key in cache and cache[key] > 0 and not remeasure:
        return cache[key], "cached"
    flops = _probe_matmul(device, dtype)
    cache[key] = flops
    with contextlib.suppress(OSError):  # a read-only cache folder costs a re-measurement next time, nothing more
        write_json(path, cache)
    return flops, "measured"


def peak_flops(device: str = "cpu", dtype: torch.dtype = torch.float32, remeasure: bool = False) -> float:
    """Peak matmul FLOP/s on `device` in `dtype`: measured once and cached (or a GPU datasheet
    figure; see the module docstring). The denominator of MFU."""
    return peak_with_source(device, dtype, remeasure)[0]


# ----------------------------------------------------------------------------------------------
# the CLI verb


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


def env_cli(remeasure: bool = False) -> None:
    """`scratchlm env`: print the device, torch build, precisions and matmul peaks."""
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
    rows.append(("threads", f"{torch.get_num_threads()} (torch.get_num_threads)"))
    for dev in devices:
        rows.append((f"precisions {dev}", ", ".join(_precisions(dev))))

    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}", flush=True)

    # The peaks last: they may take a second to measure, and the facts above are already shown.
    peaks = [("cpu", torch.float32)]
    if runs("cpu", torch.bfloat16):
        peaks.append(("cpu", torch.bfloat16))
    if "cuda" in devices:
        peaks += [("cuda", torch.float32), ("cuda", torch.bfloat16 if torch.cuda.is_bf16_supported() else
                                            torch.float16)]
    if "mps" in devices:
        peaks.append(("mps", torch.float32))
    for i, (dev, dtype) in enumerate(peaks):
        print(f"{'peak matmul' if i == 0 else '':<{width}}  {_peak_line(dev, dtype, remeasure)}", flush=True)
