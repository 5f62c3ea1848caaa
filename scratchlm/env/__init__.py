"""What this machine can do (`scratchlm env`), and how fast it multiplies: the lowest layer's machine
probe, on the standard library and torch alone.

- `machine.py`: what the machine is (CPU name and matmul extensions, a device's name);
- `timing.py`: the measured figures and their disk cache: the matmul peak that MFU is measured
  against (`peak_flops`, raised by `raise_peak` when a run achieves more) and the fp32 / bf16-autocast
  timings of a linear layer that `precision=auto` decides by (`linear_times`);
- `report.py`: the lines `scratchlm env` prints (`env_lines`).
"""

from scratchlm.env.machine import cpu_flags, cpu_name, device_name
from scratchlm.env.report import env_lines
from scratchlm.env.timing import linear_times, peak_flops, peak_with_source, raise_peak, runs

__all__ = ["cpu_flags", "cpu_name", "device_name", "env_lines", "linear_times", "peak_flops", "peak_with_source",
           "raise_peak", "runs"]
