"""What this machine is: the CPU's name and its matmul-relevant extensions, and a device's name
(the cache key of every timing in timing.py). Read from /proc/cpuinfo on Linux, `sysctl` on macOS,
else `platform`; nothing is measured here.
"""

from __future__ import annotations

import platform
import subprocess
from pathlib import Path

import torch

# CPU features worth knowing for matmul speed: x86 vector / matrix units, then Arm's.
INTERESTING_FLAGS = [
    "avx", "avx2", "fma", "avx_vnni", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
    "amx_tile", "amx_bf16", "amx_int8", "amx_fp16",
    "asimd", "asimdhp", "sve", "sve2", "bf16", "i8mm", "sme",
]
NATIVE_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


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
