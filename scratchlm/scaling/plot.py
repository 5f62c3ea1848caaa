"""The grid's picture, one PNG of two panels.

Left: the IsoFLOP profiles, final validation loss against non-embedding parameters, one colour per
budget, each with its parabola (in ln N, over the runs it was fitted to) and its minimum (a star;
hollow when it lies outside them). Right: the optima N_opt against the compute they stand for, with
the fitted power laws, for non-embedding N (filled) and total N (hollow, dashed).

Drawn with matplotlib's object API (`Figure`, no pyplot): no backend or global state is touched,
and the file is written atomically.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from scratchlm.io import atomic_open
from scratchlm.scaling.fit import ScalingFit


def _law_label(name: str, fit: ScalingFit) -> str:
    law = fit.n_law
    se = "" if math.isnan(law.exponent_se) else f" ± {law.exponent_se:.2f}"
    return f"{name}: N_opt ∝ C^{law.exponent:.2f}{se}"


def plot_scaling(budget: Sequence[float], n: Sequence[float], loss: Sequence[float],
                 fits: dict[str, ScalingFit], path: Path, budget_label=str) -> None:
    """`budget`, `n` (non-embedding), `loss`: the runs; `fits`: {"non-embedding": ..., "total": ...}."""
    budget, n, loss = (np.asarray(a, dtype=np.float64) for a in (budget, n, loss))
    fig = Figure(figsize=(12, 5), layout="constrained")
    left, right = fig.subplots(1, 2)
    colours = [f"C{i}" for i in range(10)]
    optima = {o.budget: o for o in fits["non-embedding"].optima}
    for i, c in enumerate(np.unique(budget)):
        colour = colours[i % len(colours)]
        idx = np.flatnonzero(budget == c)
        order = idx[np.argsort(n[idx])]
        left.plot(n[order], loss[order], "o", color=colour, label=f"C = {budget_label(c)} FLOPs")
        o = optima.get(c)
        if o is None:
            continue
        lo, hi = math.log(min(o.fitted[0], o.n_opt)), math.log(max(o.fitted[1], o.n_opt))
        xs = np.linspace(lo - 0.1, hi + 0.1, 100)
        left.plot(np.exp(xs), o.parabola(xs), "-", color=colour, alpha=0.7)
        left.plot([o.n_opt], [o.loss_opt], "*", markersize=14, color=colour,
                  markerfacecolor=colour if o.inside else "none")
    left.set_xscale("log")
    left.set_xlabel("non-embedding parameters N")
    left.set_ylabel("final validation loss (nats/token)")
    left.set_title("IsoFLOP profiles (stars: parabola minima)")
    left.legend(fontsize=8)

    for (name, fit), style in zip(fits.items(), (("o", "-", None), ("s", "--", "none"))):
        if not fit.optima:
            continue
        marker, line, face = style
        c = np.array([o.compute for o in fit.optima])
        right.plot(c, [o.n_opt for o in fit.optima], marker, color="C0" if line == "-" else "C3",
                   markerfacecolor=face)
        if fit.n_law is not None:
            cs = np.geomspace(c.min() / 1.5, c.max() * 1.5, 50)
            right.plot(cs, fit.n_law(cs), line, color="C0" if line == "-" else "C3", label=_law_label(name, fit))
    right.set_xscale("log")
    right.set_yscale("log")
    right.set_xlabel("compute C = 6·N·D at the optimum (FLOPs)")
    right.set_ylabel("N_opt (parameters)")
    right.set_title("compute-optimal model size")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
