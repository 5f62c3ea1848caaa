"""IsoFLOP profiles and power laws, fitted in float64 NumPy: pure functions of the grid's numbers.

Chinchilla's approach 2 (Hoffmann et al. 2022, section 3.2): for each compute budget C, the runs
trained with C FLOPs give the final loss against model size N. A parabola in ln N fitted through
them (least squares) has its minimum at N_opt(C); the tokens there, D_opt, are read off the line
through the budget's (ln N, ln D) points, which is exact when N is the count the budget was
planned with (every run then has D = C / 6N, so D_opt = C / 6 N_opt), and the compute the optimum
stands for is C_opt = 6 N_opt D_opt. Power laws N_opt = k·C_opt^a and D_opt = k'·C_opt^b are
straight lines in log-log, fitted by ordinary least squares; since ln N_opt + ln D_opt = ln C_opt -
ln 6 for every optimum, a + b = 1 holds by construction (to rounding).

The parabola is a local model of the minimum: across a decade and a half of N a profile is not
symmetric in ln N (the loss climbs faster on the side of too few tokens), and a parabola through all
of it misplaces the vertex. So each budget's parabola goes through the run of lowest loss and its
nearest neighbours in ln N, `WINDOW` runs in all (all of them when there are fewer), as Chinchilla's
profiles span about one decade around their minima.

Uncertainty, two ways:
- the standard error of the slope from the log-log regression (s² / Σ(x - x̄)², s² the residual
  variance on n - 2 degrees of freedom): needs 3 budgets, and with few budgets it is itself rough;
- a bootstrap over grid points (Efron 1979): each replicate redraws every budget's runs with
  replacement, refits the parabolas and the laws; the spread (standard deviation, and the 16th-84th
  percentile interval) of the replicates' exponents. A budget whose redrawn runs hold fewer than 3
  distinct sizes or bend the wrong way is left out of that replicate.

A budget whose parabola opens downwards (or has fewer than 3 sizes) has no minimum; it is left out
of the law and named (`ScalingFit.skipped`). A minimum outside the sizes trained is kept but
flagged (`IsoFLOP.inside`): Chinchilla's grids were chosen so the minimum lies inside them. One
farther out, in ln N, than the sizes span is not a measurement but the tail of a nearly flat
parabola (a bootstrap replicate draws such ones), and is left out like one opening downwards.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

FLOPS_PER_PARAM_TOKEN = 6  # forward 2 + backward 4 FLOPs per parameter per token (Kaplan et al. 2020)
BOOTSTRAP_REPLICATES = 1000
WINDOW = 5  # runs per parabola: the lowest loss and its neighbours in ln N


@dataclass(frozen=True)
class Parabola:
    """y = c2·x² + c1·x + c0."""

    c2: float
    c1: float
    c0: float

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return (self.c2 * x + self.c1) * x + self.c0

    @property
    def convex(self) -> bool:
        return self.c2 > 0

    @property
    def vertex(self) -> tuple[float, float]:
        """(x, y) of the minimum (of the maximum, for a parabola opening downwards)."""
        x = -self.c1 / (2 * self.c2)
        return x, float(self(x))


def fit_parabola(x: Sequence[float], y: Sequence[float]) -> Parabola:
    """Least-squares parabola through (x, y); needs at least 3 distinct x."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if len(np.unique(x)) < 3:
        raise ValueError(f"a parabola needs 3 distinct x, got {len(np.unique(x))}")
    c2, c1, c0 = np.polyfit(x, y, 2)
    return Parabola(float(c2), float(c1), float(c0))


@dataclass(frozen=True)
class PowerLaw:
    """y = prefactor·x^exponent, fitted as a line in log-log; `exponent_se` is the slope's standard
    error (NaN with 2 points: no residual degrees of freedom)."""

    exponent: float
    prefactor: float
    exponent_se: float
    points: int

    def __call__(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.prefactor * np.power(x, self.exponent)


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLaw:
    """Ordinary least squares of ln y on ln x; needs 2 distinct positive x."""
    lx, ly = np.log(np.asarray(x, dtype=np.float64)), np.log(np.asarray(y, dtype=np.float64))
    if len(np.unique(lx)) < 2:
        raise ValueError("a power law needs 2 distinct x")
    sxx = float(((lx - lx.mean()) ** 2).sum())
    slope = float(((lx - lx.mean()) * (ly - ly.mean())).sum() / sxx)
    intercept = float(ly.mean() - slope * lx.mean())
    n = len(lx)
    if n > 2:
        residual = ly - (intercept + slope * lx)
        se = math.sqrt(float((residual**2).sum()) / (n - 2) / sxx)
    else:
        se = math.nan
    with np.errstate(over="ignore"):  # two nearly equal x (a bootstrap's draw) can give a vast slope
        prefactor = float(np.exp(intercept))
    return PowerLaw(slope, prefactor, se, n)


@dataclass(frozen=True)
class IsoFLOP:
    """One budget's profile: the parabola in ln N, and its minimum."""

    budget: float
    parabola: Parabola  # loss against ln N
    n_opt: float
    d_opt: float
    compute: float  # 6·n_opt·d_opt
    loss_opt: float
    inside: bool  # the minimum lies within the sizes fitted
    fitted: tuple[float, float]  # the smallest and largest N the parabola went through


def isoflop_optimum(budget: float, n: Sequence[float], d: Sequence[float], loss: Sequence[float],
                    window: int = WINDOW) -> IsoFLOP | str:
    """The minimum of one budget's runs (sizes `n`, tokens `d`, final losses `loss`), or a string
    saying why there is none (fewer than 3 sizes, a parabola opening downwards, a minimum far outside).
    The parabola goes through the `window` runs nearest the lowest loss in ln N (0: all runs)."""
    order = np.argsort(np.log(np.asarray(n, dtype=np.float64)), kind="stable")
    x = np.log(np.asarray(n, dtype=np.float64))[order]
    y = np.asarray(loss, dtype=np.float64)[order]
    ln_d = np.log(np.asarray(d, dtype=np.float64))[order]
    if 0 < window < len(x):
        start = min(max(int(np.argmin(y)) - window // 2, 0), len(x) - window)
        x, y, ln_d = x[start:start + window], y[start:start + window], ln_d[start:start + window]
    distinct = len(np.unique(x))
    if distinct < 3:
        return f"{distinct} distinct sizes (a parabola needs 3)"
    p = fit_parabola(x, y)
    if not p.convex:
        return "its parabola opens downwards: the sizes do not straddle the optimum"
    x_opt, loss_opt = p.vertex
    span = float(x.max() - x.min())
    if not x.min() - span <= x_opt <= x.max() + span:
        return (f"its minimum (ln N = {x_opt:.3g}) lies farther outside the sizes fitted than they span: "
                "the sizes do not straddle the optimum")
    line = np.polyfit(x, ln_d, 1)  # ln D along the budget's runs
    n_opt, d_opt = math.exp(x_opt), math.exp(float(np.polyval(line, x_opt)))
    return IsoFLOP(budget, p, n_opt, d_opt, FLOPS_PER_PARAM_TOKEN * n_opt * d_opt, loss_opt,
                   bool(x.min() <= x_opt <= x.max()), (math.exp(x.min()), math.exp(x.max())))


@dataclass(frozen=True)
class Spread:
    """A bootstrap's replicates of one exponent."""

    sd: float
    low: float  # 16th percentile
    high: float  # 84th percentile
    replicates: int


@dataclass
class ScalingFit:
    """Every budget's optimum, and the laws through them (None with fewer than 2 optima)."""

    optima: list[IsoFLOP]
    skipped: list[tuple[float, str]]  # (budget, why it has no optimum)
    n_law: PowerLaw | None
    d_law: PowerLaw | None
    n_bootstrap: Spread | None = None
    d_bootstrap: Spread | None = None
    notes: list[str] = field(default_factory=list)


def _groups(budget: np.ndarray) -> list[np.ndarray]:
    return [np.flatnonzero(budget == b) for b in np.unique(budget)]


def _laws(optima: list[IsoFLOP]) -> tuple[PowerLaw, PowerLaw] | None:
    if len({o.compute for o in optima}) < 2:
        return None
    c = [o.compute for o in optima]
    return fit_power_law(c, [o.n_opt for o in optima]), fit_power_law(c, [o.d_opt for o in optima])


def _spread(values: list[float]) -> Spread | None:
    if len(values) < 2:
        return None
    v = np.asarray(values)
    return Spread(float(v.std(ddof=1)), float(np.percentile(v, 16)), float(np.percentile(v, 84)), len(v))


def fit_scaling(budget: Sequence[float], n: Sequence[float], d: Sequence[float], loss: Sequence[float], *,
                replicates: int = BOOTSTRAP_REPLICATES, seed: int = 0) -> ScalingFit:
    """IsoFLOP optima per budget and the power laws N_opt(C), D_opt(C), with a bootstrap of `replicates`
    redraws over grid points (0: none). Each run is (budget, size n, tokens d, final loss)."""
    budget, n, d, loss = (np.asarray(a, dtype=np.float64) for a in (budget, n, d, loss))
    groups = _groups(budget)  # each budget's runs; a bootstrap redraws within them
    optima, skipped = [], []
    for idx in groups:
        found = isoflop_optimum(float(budget[idx[0]]), n[idx], d[idx], loss[idx])
        if isinstance(found, str):
            skipped.append((float(budget[idx[0]]), found))
        else:
            optima.append(found)
    laws = _laws(optima)
    fit = ScalingFit(optima, skipped, *(laws or (None, None)))
    if laws is None:
        fit.notes.append(f"{len(optima)} budget(s) with a minimum: a power law needs 2")
        return fit
    rng = np.random.default_rng(seed)
    a_reps, b_reps = [], []
    for _ in range(replicates):
        picked = [rng.choice(idx, size=len(idx), replace=True) for idx in groups]
        found = [isoflop_optimum(float(budget[i[0]]), n[i], d[i], loss[i]) for i in picked]
        replicate = _laws([o for o in found if isinstance(o, IsoFLOP)])
        if replicate is not None:
            a_reps.append(replicate[0].exponent)
            b_reps.append(replicate[1].exponent)
    fit.n_bootstrap, fit.d_bootstrap = _spread(a_reps), _spread(b_reps)
    thin = [float(budget[idx[0]]) for idx in groups if len(idx) == 3]
    if replicates and thin:
        fit.notes.append(f"{len(thin)} budget(s) with only 3 runs: a replicate either redraws all three or has no "
                         "parabola there, so the bootstrap understates the uncertainty")
    if replicates and len(a_reps) < replicates:
        fit.notes.append(f"bootstrap: {replicates - len(a_reps)} of {replicates} replicates left fewer than 2 "
                         "budgets with a minimum and were dropped")
    return fit
