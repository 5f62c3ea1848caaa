"""Which matmul a quantized layer uses at inference, measured on this machine, not assumed.

The candidates per format (`QuantLinear.KERNELS`): the reference (dequantize to fp32, F.linear in
the input's dtype); dequantize straight into bf16 and multiply in bf16; PyTorch's weight-packed CPU
ops, `_weight_int8pack_mm` (int8 codes (out, in), one scale per row) and
`_weight_int4pack_mm_for_cpu` (our nibbles repacked once by `_convert_weight_to_int4pack_for_cpu`,
with scale and zero point 0 per group). Which is fastest differs between CPUs (on one AMD EPYC, a
bf16 matrix-vector product ran 1.74x faster than fp32 and the int8 packed op 0.65x), so
`kernel_times` times each, at batch 1 and 8, next to fp32 and bf16 F.linear on a full-precision
weight of the same shape (what quantization is compared with), and `pick_kernel` takes the fastest
path whose output agrees with the reference (fp32-activation paths to 1e-4 relative, bf16 paths to
2e-2: bf16 keeps 8 significant bits). The choice is cached as JSON per machine, torch version,
thread count, format and shape in the scratchlm cache folder (as scratchlm/env/timing.py caches
its timings), so only the first load on a machine pays for it; `use_fastest_kernels(model)` applies
it to every QuantLinear of a model. Timing keeps the fastest of several rounds (another process's
burst of work rarely covers them all) and decides by the batch-1 time (decoding).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.io import cache_dir, write_json
from scratchlm.model.quant import QuantLinear

CACHE_NAME = "quant_kernels.json"
TOLERANCE = {"reference": 0.0, "int8pack": 1e-4, "int4pack": 1e-4, "dequant_bf16": 2e-2}  # relative, fp32 inputs


def _best_time(fn: Callable[[], object], rounds: int = 5, min_s: float = 0.02) -> float:
    """Seconds per call: the fastest round of `rounds`, each round repeating the call for ~min_s."""
    fn()  # warm up (and build any lazy state)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < min_s / 4:
        fn()
        n += 1
    reps = max(1, int(n * 4))
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        best = min(best, (time.perf_counter() - t0) / reps)
    return best


def relative_error(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30)).item()


def kernel_times(out_features: int, in_features: int, fmt: str, group_size: int = 64,
                 batches: tuple[int, ...] = (1, 8), seed: int = 0) -> dict[str, dict[str, Any]]:
    """Time every path for a random (out, in) weight in `fmt`, at each batch (fp32 activations).
    Returns path -> {"seconds": {batch: s}, "error": relative error vs the reference, "ok": bool};
    `fp32` and `bf16` are F.linear on a full-precision weight (not quantized paths: for comparison)."""
    g = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features, bias=False)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(out_features, in_features, generator=g) * in_features ** -0.5)
    layer = QuantLinear.from_linear(linear, group_size=group_size, fmt=fmt).eval()
    w32, w16 = linear.weight.detach(), linear.weight.detach().bfloat16()
    result: dict[str, dict[str, Any]] = {"fp32": {"seconds": {}}, "bf16": {"seconds": {}}}
    for kernel in QuantLinear.KERNELS[fmt]:
        result[kernel] = {"seconds": {}}
    with torch.no_grad():
        x_err = torch.randn(8, in_features, generator=g)
        layer.use_kernel("reference")
        ref = layer(x_err)
        for kernel in QuantLinear.KERNELS[fmt]:
            layer.use_kernel(kernel)
            err = relative_error(layer(x_err), ref)
            result[kernel].update(error=err, ok=err <= TOLERANCE[kernel] or kernel == "reference")
        for b in batches:
            x = torch.randn(b, in_features, generator=g)
            xb = x.bfloat16()
            result["fp32"]["seconds"][b] = _best_time(lambda x=x: F.linear(x, w32))
            result["bf16"]["seconds"][b] = _best_time(lambda xb=xb: F.linear(xb, w16))
            for kernel in QuantLinear.KERNELS[fmt]:
                layer.use_kernel(kernel)
                result[kernel]["seconds"][b] = _best_time(lambda x=x: layer(x))
    return result


def _key(out_features: int, in_features: int, fmt: str, group_size: int) -> str:
    return (f"cpu|torch {torch.__version__}|threads {torch.get_num_threads()}|{fmt}|g{group_size}|"
            f"{out_features}x{in_features}")


def _read_cache() -> dict[str, Any]:
    try:
        data = json.loads((cache_dir() / CACHE_NAME).read_text(encoding="utf-8"))
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def pick_kernel(out_features: int, in_features: int, fmt: str, group_size: int = 64, remeasure: bool = False) -> str:
    """The fastest correct path at batch 1 for this shape and format (measured once, then cached)."""
    key = _key(out_features, in_features, fmt, group_size)
    cached = _read_cache().get(key)
    if cached and not remeasure and cached.get("kernel") in QuantLinear.KERNELS[fmt]:
        return cached["kernel"]
    times = kernel_times(out_features, in_features, fmt, group_size, batches=(1,))
    ok = [k for k in QuantLinear.KERNELS[fmt] if times[k]["ok"]]
    kernel = min(ok, key=lambda k: times[k]["seconds"][1])
    cache = _read_cache()  # read again just before writing: another process may have added entries
    cache[key] = {"kernel": kernel, "seconds": {k: v["seconds"][1] for k, v in times.items()},
                  "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    write_json(cache_dir() / CACHE_NAME, cache)
    return kernel


def use_fastest_kernels(model: nn.Module, device: str | torch.device = "cpu") -> dict[str, int]:
    """Switch every QuantLinear of `model` to its fastest correct path on this machine (CPU only: on
    another device the reference stays). Returns how many layers took each path."""
    counts: dict[str, int] = {}
    for m in model.modules():
        if isinstance(m, QuantLinear):
            kernel = "reference" if torch.device(device).type != "cpu" else \
                pick_kernel(m.out_features, m.in_features, m.fmt, m.group_size or 64)
            if m.fmt in ("int4", "nf4") and m.in_features % m.group_size:
                kernel = "reference" if kernel == "int4pack" else kernel
            m.use_kernel(kernel)
            counts[kernel] = counts.get(kernel, 0) + 1
    return counts
