"""The IsoFLOP fits on synthetic grids drawn from known laws: exact recovery without noise (float64),
recovery within the reported uncertainty with noise, and Chinchilla's loss law's optimum recovered
by its IsoFLOP parabolas."""

from __future__ import annotations

import math

import numpy as np
import pytest

from scratchlm.scaling.fit import fit_parabola, fit_power_law, fit_scaling, isoflop_optimum

BUDGETS = [1e12, 3e12, 1e13, 3e13, 1e14]


def parabolic_grid(a: float, k: float, noise: float = 0.0, seed: int = 0):
    """Runs whose loss is exactly a parabola in ln N around N* = k·C^a (plus Gaussian noise), with
    D = C / 6N: the grid's minima lie on the law N_opt ∝ C^a, D_opt ∝ C^(1-a)."""
    rng = np.random.default_rng(seed)
    budget, n, d, loss = [], [], [], []
    for c in BUDGETS:
        n_star = k * c**a
        for f in (1 / 8, 1 / 4, 1 / 2, 1, 2, 4, 8):
            size = n_star * f * 1.1  # not centred on N*, so the vertex is interpolated, not a grid point
            budget.append(c)
            n.append(size)
            d.append(c / (6 * size))
            loss.append(3.0 - 0.1 * math.log10(c) + 0.05 * math.log(size / n_star) ** 2 + noise * rng.normal())
    return budget, n, d, loss


def test_parabola_minimum_is_the_vertex():
    x = np.linspace(-2.0, 3.0, 6)
    p = fit_parabola(x, 0.7 * (x - 1.3) ** 2 + 2.5)
    assert p.convex
    assert p.vertex == pytest.approx((1.3, 2.5), abs=1e-12)
    with pytest.raises(ValueError, match="3 distinct"):
        fit_parabola([1.0, 1.0, 2.0], [1.0, 2.0, 3.0])


def test_power_law_exact_and_its_standard_error():
    c = np.array([1e12, 1e13, 1e14, 1e15])
    law = fit_power_law(c, 0.03 * c**0.49)
    assert law.exponent == pytest.approx(0.49, abs=1e-12)
    assert law.prefactor == pytest.approx(0.03, rel=1e-9)
    assert law.exponent_se == pytest.approx(0.0, abs=1e-9)
    # the standard error by hand: residuals +-e on alternate points
    y = 0.03 * c**0.49 * np.exp([0.1, -0.1, 0.1, -0.1])
    lx = np.log(c)
    noisy = fit_power_law(c, y)
    slope = np.polyfit(lx, np.log(y), 1)[0]
    resid = np.log(y) - np.polyval(np.polyfit(lx, np.log(y), 1), lx)
    assert noisy.exponent == pytest.approx(slope, abs=1e-12)
    assert noisy.exponent_se == pytest.approx(math.sqrt((resid**2).sum() / 2 / ((lx - lx.mean()) ** 2).sum()),
                                              rel=1e-9)
    assert math.isnan(fit_power_law(c[:2], y[:2]).exponent_se)


def test_exponents_recovered_exactly_without_noise():
    fit = fit_scaling(*parabolic_grid(a=0.62, k=0.05), replicates=50)
    assert fit.skipped == [] and len(fit.optima) == len(BUDGETS)
    for o in fit.optima:
        assert o.n_opt == pytest.approx(0.05 * o.budget**0.62, rel=1e-9)
        assert o.d_opt == pytest.approx(o.budget / (6 * o.n_opt), rel=1e-9)
        assert o.compute == pytest.approx(o.budget, rel=1e-9)
        assert o.inside
    assert fit.n_law.exponent == pytest.approx(0.62, abs=1e-9)
    assert fit.d_law.exponent == pytest.approx(0.38, abs=1e-9)
    assert fit.n_law.prefactor == pytest.approx(0.05, rel=1e-7)
    assert fit.n_law.exponent + fit.d_law.exponent == pytest.approx(1.0, abs=1e-12)
    assert fit.n_law.exponent_se < 1e-9
    # every replicate of an exact grid gives the exact exponent
    assert fit.n_bootstrap.replicates == 50 and fit.n_bootstrap.sd < 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exponents_within_the_reported_uncertainty_with_noise(seed):
    fit = fit_scaling(*parabolic_grid(a=0.5, k=0.2, noise=0.01, seed=seed), replicates=300, seed=seed)
    a, boot = fit.n_law.exponent, fit.n_bootstrap
    assert a != pytest.approx(0.5, abs=1e-6)  # the noise moved it
    assert abs(a - 0.5) < 3 * fit.n_law.exponent_se
    assert abs(a - 0.5) < 3 * boot.sd
    assert boot.low < boot.high and boot.sd > 0
    assert fit.n_law.exponent + fit.d_law.exponent == pytest.approx(1.0, abs=1e-12)


def test_chinchilla_loss_law_optimum_recovered_by_isoflop_parabolas():
    """L(N, D) = E + A/N^α + B/D^β at C = 6ND has its minimum at N_opt = G·(C/6)^(β/(α+β)),
    G = (αA/βB)^(1/(α+β)) (Hoffmann et al. 2022, eq. 4): the parabolas find it to within a few per cent."""
    e, big_a, big_b, alpha, beta = 1.69, 406.4, 410.7, 0.34, 0.28
    g = (alpha * big_a / (beta * big_b)) ** (1 / (alpha + beta))
    budget, n, d, loss = [], [], [], []
    for c in BUDGETS:
        n_star = g * (c / 6) ** (beta / (alpha + beta))
        for f in np.geomspace(1 / 4, 4, 9):
            size = n_star * f
            budget.append(c)
            n.append(size)
            d.append(c / (6 * size))
            loss.append(e + big_a / size**alpha + big_b / d[-1] ** beta)
    fit = fit_scaling(budget, n, d, loss, replicates=0)
    assert fit.n_law.exponent == pytest.approx(beta / (alpha + beta), abs=2e-3)
    for o in fit.optima:
        assert o.n_opt == pytest.approx(g * (o.budget / 6) ** (beta / (alpha + beta)), rel=0.05)


def test_a_budget_without_a_minimum_is_skipped_and_named():
    budget, n, d, loss = parabolic_grid(a=0.5, k=0.2)
    flipped = [(-v if b == BUDGETS[0] else v) for b, v in zip(budget, loss)]
    fit = fit_scaling(budget, n, d, flipped, replicates=0)
    assert [b for b, _ in fit.skipped] == [BUDGETS[0]] and "downwards" in fit.skipped[0][1]
    assert len(fit.optima) == len(BUDGETS) - 1
    assert fit.n_law.exponent == pytest.approx(0.5, abs=1e-9)
    assert isinstance(isoflop_optimum(1e12, [1.0, 1.0, 2.0], [1.0, 1.0, 1.0], [1.0, 2.0, 3.0]), str)
    three = [i for i in range(len(budget)) if i % 7 < 3]  # 3 runs per budget
    thin = fit_scaling(*([v[i] for i in three] for v in (budget, n, d, loss)), replicates=50)
    assert thin.n_bootstrap.sd < 1e-9 and any("understates" in note for note in thin.notes)
    one = fit_scaling(budget[:7], n[:7], d[:7], loss[:7])
    assert one.n_law is None and one.notes and "needs 2" in one.notes[0]


def test_a_minimum_outside_the_sizes_is_flagged_and_one_far_outside_left_out():
    n = [1e5, 2e5, 4e5]
    d = [1e12 / (6 * s) for s in n]
    found = isoflop_optimum(1e12, n, d, [(math.log(s) - math.log(1e6)) ** 2 for s in n])
    assert not found.inside and found.n_opt == pytest.approx(1e6, rel=1e-9)  # ln 2.5 past the edge, span ln 4
    assert "farther outside" in isoflop_optimum(1e12, n, d, [(math.log(s) - math.log(2e6)) ** 2 for s in n])
    # a nearly flat parabola: its vertex would overflow exp(); it is left out instead
    flat = isoflop_optimum(1e12, n, d, [3.0 - 1e-3 * math.log(s) + 1e-12 * math.log(s) ** 2 for s in n])
    assert isinstance(flat, str)


def test_the_parabola_through_the_runs_nearest_the_minimum_places_it_better_than_one_through_all():
    """Over three decades of N a loss profile is lopsided in ln N; the 5 runs around the lowest loss
    find its minimum where a parabola through all 13 misses by far more."""
    e, big_a, big_b, alpha, beta, c = 1.69, 406.4, 410.7, 0.34, 0.28, 1e18
    n_star = (alpha * big_a / (beta * big_b)) ** (1 / (alpha + beta)) * (c / 6) ** (beta / (alpha + beta))
    n = n_star * np.geomspace(1 / 30, 30, 13) * 1.2
    d = c / (6 * n)
    loss = e + big_a / n**alpha + big_b / d**beta
    near = isoflop_optimum(c, n, d, loss)
    whole = isoflop_optimum(c, n, d, loss, window=0)
    assert near.fitted == pytest.approx((n[4], n[8]), rel=1e-12)  # the lowest is n[6]: 2 either side
    assert abs(math.log(near.n_opt / n_star)) < 0.02
    assert abs(math.log(whole.n_opt / n_star)) > 5 * abs(math.log(near.n_opt / n_star))
