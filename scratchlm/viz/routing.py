"""Expert load over training for an MoE run (`scratchlm viz routing`).

At every log step the pretraining loop writes each MoE layer's routing counters into
RUN/metrics.jsonl: `moe/layer_{i}/load_{e}` is how many of that step's token-to-expert
assignments went to expert e of layer i (B*T*k of them in all for the last micro-batch, counted
before any capacity drop). `load_history` reads those back as one (S, E) matrix per layer, S the
logged steps; `draw_routing` draws, per MoE layer, a heatmap of expert (y) against step (x)
coloured by the expert's *share* of the layer's assignments (load / total), plus one line panel
of the balance max/mean load per layer over steps (1 = perfectly even; E = everything on one
expert).

Choices: shares rather than raw counts, so runs with different batch sizes or top-k read on one
scale; a diverging colour map centred on the even share 1/E (white = even, red = overloaded,
blue = starved) when every layer has the same E, a plain 0..max scale otherwise; cells sized by
the actual step spacing (`pcolormesh`), since the last logged step need not be on the interval;
when a resumed run logged a step twice, the later record wins. The balance is recomputed from the
loads (the logged `/balance` is the same quantity). matplotlib's object API (`Figure`), no pyplot
state; the PNG is written atomically. Left out: per-token routing (which tokens go where), expert
co-selection, the router entropy and dropped fraction (logged, not drawn).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np

from scratchlm.errors import UserError
from scratchlm.io import atomic_open

LOAD_KEY = re.compile(r"^moe/layer_(\d+)/load_(\d+)$")
MAX_EXPERT_TICKS = 16  # more experts than this: label only some rows


def read_metrics(path: Path) -> list[dict]:
    """The records of a metrics.jsonl. A torn last line (a run killed mid-write) is skipped with a
    warning; a bad line elsewhere is an error naming it."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise UserError(f"{path}: no such file", fix="pass the folder of a training run (--run RUN)") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: cannot read it ({e})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if n == len(lines):
                print(f"scratchlm: warning: {path}:{n}: skipping a torn last line", file=sys.stderr)
                continue
            raise UserError(f"{path}:{n}: not a JSON record", fix="repair or delete that line") from None
    return records


def load_history(run_dir: str | Path) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """{MoE layer: (steps (S,) int, loads (S, E) float)} from RUN/metrics.jsonl, steps ascending.
    Row s holds the assignments each expert got at steps[s]; it sums to that step's B*T*k."""
    path = Path(run_dir) / "metrics.jsonl"
    # layer -> step -> {expert: load}; a later record for the same step overwrites (resumed runs)
    seen: dict[int, dict[int, dict[int, float]]] = {}
    for r in read_metrics(path):
        if not isinstance(r, dict) or "step" not in r:
            continue
        for key, value in r.items():
            m = LOAD_KEY.match(key)
            if m and isinstance(value, int | float):
                layer, expert = int(m.group(1)), int(m.group(2))
                seen.setdefault(layer, {}).setdefault(int(r["step"]), {})[expert] = float(value)
    if not seen:
        raise UserError(f"not an MoE run (no routing metrics in {path})",
                        fix="train with --model.arch=moe; the loads are logged every train.log_interval steps")
    out = {}
    for layer, by_step in sorted(seen.items()):
        steps = sorted(by_step)
        n_experts = 1 + max(e for row in by_step.values() for e in row)
        loads = np.zeros((len(steps), n_experts))  # (S, E); an expert missing from a record counts 0
        for s, step in enumerate(steps):
            for e, v in by_step[step].items():
                loads[s, e] = v
        out[layer] = (np.asarray(steps, dtype=np.int64), loads)
    return out


def shares(loads: np.ndarray) -> np.ndarray:
    """(S, E) loads -> each expert's fraction of its row's assignments (an all-zero row stays 0)."""
    total = loads.sum(axis=1, keepdims=True)  # (S, 1)
    return np.divide(loads, total, out=np.zeros_like(loads), where=total > 0)


def balance(loads: np.ndarray) -> np.ndarray:
    """(S, E) loads -> (S,) max / mean load per step, as `MoE.routing_metrics` logs it."""
    return loads.max(axis=1) / np.maximum(loads.mean(axis=1), 1e-9)


def _edges(steps: np.ndarray) -> np.ndarray:
    """(S,) step positions -> (S+1,) cell edges halfway between them (width 1 for a single step)."""
    x = steps.astype(float)
    if len(x) == 1:
        return np.array([x[0] - 0.5, x[0] + 0.5])
    mid = (x[1:] + x[:-1]) / 2
    return np.concatenate([[x[0] - (mid[0] - x[0])], mid, [x[-1] + (x[-1] - mid[-1])]])


def draw(history: dict[int, tuple[np.ndarray, np.ndarray]], out: str | Path, title: str = "") -> None:
    """One heatmap per MoE layer (expert x step, coloured by share) and a balance panel. Writes a PNG."""
    from matplotlib.colors import Normalize, TwoSlopeNorm
    from matplotlib.figure import Figure

    layers = sorted(history)
    n_experts = {history[i][1].shape[1] for i in layers}
    peak = max(float(shares(history[i][1]).max()) for i in layers)
    if len(n_experts) == 1:
        even = 1.0 / n_experts.pop()
        # white at the even share; the top at least 2x even so a balanced run stays pale
        norm, cmap = TwoSlopeNorm(vcenter=even, vmin=0.0, vmax=max(peak, 2 * even)), "RdBu_r"
    else:
        even, norm, cmap = None, Normalize(0.0, max(peak, 1e-9)), "viridis"

    heights = [max(1.3, 0.2 * history[i][1].shape[1] + 0.5) for i in layers] + [2.0]  # inches per panel
    fig = Figure(figsize=(9.0, sum(heights) + 0.6), layout="constrained")
    axes = fig.subplots(len(layers) + 1, 1, sharex=True, height_ratios=heights, squeeze=False)[:, 0]
    mesh = None
    for ax, layer in zip(axes, layers):
        steps, loads = history[layer]
        E = loads.shape[1]
        # pcolormesh wants C as (rows=y, cols=x): the expert axis first
        mesh = ax.pcolormesh(_edges(steps), np.arange(E + 1) - 0.5, shares(loads).T, norm=norm, cmap=cmap)
        ax.set_ylim(E - 0.5, -0.5)  # expert 0 on top, as in a table
        if E <= MAX_EXPERT_TICKS:
            ax.set_yticks(range(E))
        ax.tick_params(labelsize=7)
        ax.set_ylabel(f"layer {layer}\nexpert", fontsize=8)
    cbar = fig.colorbar(mesh, ax=list(axes[:-1]), shrink=0.9, label="share of the layer's assignments")
    if even is not None:
        cbar.ax.axhline(even, color="black", linewidth=0.8)  # the even share 1/E
    ax = axes[-1]
    for layer in layers:
        steps, loads = history[layer]
        ax.plot(steps, balance(loads), marker="o", markersize=2.5, linewidth=1, label=f"layer {layer}")
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)  # perfectly even
    ax.set_ylabel("max / mean load", fontsize=8)
    ax.set_xlabel("step")
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(layers) <= 12:
        ax.legend(fontsize=7, ncols=min(len(layers), 6))
    if title:
        fig.suptitle(title, fontsize=10)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def draw_routing(run_dir: Path, out: Path) -> None:
    """The expert-load heatmaps of an MoE run's metrics, titled with the run's name and size, to `out`."""
    history = load_history(run_dir)
    steps = {int(s) for st, _ in history.values() for s in st}
    E = sorted({loads.shape[1] for _, loads in history.values()})
    title = (f"{Path(run_dir).name}: {len(history)} MoE layers, {'/'.join(map(str, E))} experts, "
             f"{len(steps)} logged steps")
    draw(history, out, title)
