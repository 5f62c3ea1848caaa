"""What a training run records besides its checkpoints: `metrics.jsonl` (one JSON record per log
step, evaluation or skipped batch), TensorBoard when installed (and asked), wandb when asked,
a torch.profiler trace of the first steps (`profile_steps`), and `loss.png` at the end.

`RunLog` fans each record out to every sink the run has; the loop owns when to log, this module
only how. TensorBoard, wandb, the profiler and matplotlib are imported when used: a run that does
not ask for them never pays their import time.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from scratchlm.config import Config
from scratchlm.errors import UserError


class RunLog:
    """The run's records: appended to `RUN/metrics.jsonl` (flushed each time, so a killed run keeps
    them), kept in `history`, and sent to TensorBoard / wandb when the config asks for them."""

    def __init__(self, cfg: Config, run_dir: Path, write: bool = True) -> None:
        """`write=False` (a data-parallel rank other than 0): keep `history` only."""
        self.history: list[dict[str, Any]] = []
        self._file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8") if write else None  # noqa: SIM115
        self._board = tensorboard_writer(run_dir) if cfg.train.tensorboard and write else None
        self._wandb = wandb_run(cfg) if cfg.train.wandb and write else None

    def log(self, record: dict[str, Any]) -> None:
        self.history.append(record)
        if self._file:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        if self._board:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    self._board.add_scalar(k, v, record["step"])
        if self._wandb:
            self._wandb.log(record, step=record["step"])

    def close(self) -> None:
        if self._file:
            self._file.close()
        if self._board:
            self._board.close()
        if self._wandb:
            self._wandb.finish()


def tensorboard_writer(run_dir: Path):
    """A SummaryWriter on `RUN/tb`, or None when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tb"))


def wandb_run(cfg: Config):
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb=true but wandb is not installed", fix="pip install wandb") from None
    return wandb.init(project="scratchlm", name=cfg.name, config=cfg.to_dict(), dir=cfg.out_dir,
                      mode=os.environ.get("WANDB_MODE", "offline"))


def start_profiler(run_dir: Path, steps: int, device: torch.device):
    """A started torch.profiler recording `steps` steps after one warm-up step (`step()` after each);
    GPU kernels too when the run is on `device` cuda (the run's device, from `pick_device`)."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                   record_shapes=False)
    prof.start()
    return prof


def finish_profile(prof, run_dir: Path) -> None:
    """Stop the profiler; write `RUN/profile/trace.json` and the top operators' table."""
    prof.stop()
    out = run_dir / "profile"
    out.mkdir(exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    (out / "top_ops.txt").write_text(table)
    print(f"profile: {out / 'trace.json'} (open in chrome://tracing or Perfetto)\n{table}", flush=True)


def plot_losses(metrics: Path, out: Path) -> None:
    """Train and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if "loss" in r and isinstance(r["loss"], float):
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    if not train:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)


def plot_panels(metrics: Path, out: Path, panels: list[tuple[tuple[str, ...], str]],
                lines: dict[str, float] | None = None) -> None:
    """One panel per (keys, title): each key of metrics.jsonl against step (`val_*` keys as points),
    panels with no data dropped; `lines`: a dashed horizontal line on the panel holding that key (a target)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = [json.loads(line) for line in metrics.read_text(encoding="utf-8").splitlines()]

    def series(key: str) -> list[tuple[int, float]]:
        return [(r["step"], r[key]) for r in records if isinstance(r.get(key), float) and math.isfinite(r[key])]

    panels = [(keys, title) for keys, title in panels if any(series(k) for k in keys)]
    if not panels:
        return
    cols = min(3, len(panels))  # rows of three: wide enough to read, short enough to see at once
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.4 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (keys, title) in zip(axes.flat, panels):
        for key in keys:
            points = series(key)
            if points:
                ax.plot(*zip(*points), "o-" if key.startswith("val_") else "-", label=key, markersize=3)
            if lines and key in lines:
                ax.axhline(lines[key], color="gray", ls="--", lw=1, label=f"{key} target")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out)
