"""Learning-rate schedules as pure functions of the step.

- cosine: linear warmup to `lr`, then a half cosine down to `min_lr` at `max_steps`
  (Loshchilov & Hutter 2017; GPT-2/3 and nanoGPT).
- wsd: warmup, a long stable phase at `lr`, then a linear decay to `min_lr` over the last
  `decay_frac` of the steps (warmup-stable-decay, as in MiniCPM): one run can be extended or
  branched before the decay.
- constant: warmup, then `lr`.

Warmup ramps as lr·(step+1)/warmup_steps, so step 0 already moves the weights a little.
"""

from __future__ import annotations

import math

from scratchlm.config import TrainConfig
from scratchlm.errors import UserError

SCHEDULES = ("cosine", "wsd", "constant")


def lr_at(step: int, t: TrainConfig) -> float:
    if t.schedule not in SCHEDULES:
        raise UserError(f"train.schedule={t.schedule!r} is unknown", fix=f"use one of {', '.join(SCHEDULES)}")
    if step < t.warmup_steps:
        return t.lr * (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return t.lr
    if t.schedule == "cosine":
        span = max(t.max_steps - t.warmup_steps, 1)
        progress = min((step - t.warmup_steps) / span, 1.0)
        return t.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (t.lr - t.min_lr)
    decay_steps = max(int(t.decay_frac * t.max_steps), 1)
    decay_start = t.max_steps - decay_steps
    if step < decay_start:
        return t.lr
    progress = min((step - decay_start) / decay_steps, 1.0)
    return t.lr + progress * (t.min_lr - t.lr)
