"""`scratchlm scaling`: an IsoFLOP grid on the embedded corpus, fitted, drawn and summarised.

The output folder holds:
- `plan.json`: the grid's shared settings, budgets and widths;
- `data/`: the corpus tokenized once for the whole grid (`prepare_run_data`: one BPE, one split);
- `points/C<budget>_w<width>/`: one pretraining run folder per point, `result.json` when finished;
- `results.json`, `summary.md`, `scaling.png`: the runs, the fits, the picture.

Resuming (`resume=True`) keeps the data and every finished point (never retrained), resumes an
interrupted point from its checkpoint, and may add budgets or widths; the shared settings must be
the plan's. Without `resume` an existing grid is refused unless `overwrite`, which removes this
verb's own outputs (the names above) and nothing else.

Compute: a budget C counts 6·N·D with N the non-embedding parameters (grid.py says why). The
fits are made twice over the same runs: with that N, and with N the total parameters, the optimum's
compute then being 6·N_opt·D_opt in that count (fit.py). results.json also records each point's
compute by the model's own `flops_per_token()` (output head and attention included).

results.json (format "scratchlm.scaling", version 1): {"format", "version", "convention",
"settings", "budgets", "widths", "train_tokens", "val_tokens", "points": [one record per point:
sizes, steps, tokens, epochs, val_loss, computes, seconds], "left_out": [pairs not trained, and
why], "fits": {"non-embedding" | "total": {"optima": [...], "skipped": [...], "n_opt": law,
"d_opt": law, "a_plus_b", "notes"}}}; a law is {"exponent", "prefactor", "exponent_se",
"bootstrap": {"sd", "p16", "p84", "replicates"}}. NaN is written as null.
"""

from __future__ import annotations

import math
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tqdm import tqdm

from scratchlm.data.loader import TokenShards
from scratchlm.errors import UserError
from scratchlm.io import write_json, write_text
from scratchlm.rundir import check_plan, claim_outputs, claim_run_dir, read_result
from scratchlm.scaling.fit import PowerLaw, ScalingFit, Spread, fit_scaling
from scratchlm.scaling.grid import (
    MIN_STEPS,
    RESULT,
    GridSettings,
    Point,
    base_config,
    budget_name,
    check_grid,
    plan,
    run_point,
)
from scratchlm.scaling.plot import plot_scaling
from scratchlm.train.pretrain import prepare_run_data

ARTEFACTS = ("plan.json", "data", "points", "results.json", "summary.md", "scaling.png")
CONVENTION = ("budget C = 6·N·D, N the non-embedding parameters (every weight but the token and position "
              "tables); fits also made with N the total parameters, C_opt = 6·N_opt·D_opt in that count")
COUNTS = {"non-embedding": "params_non_embedding", "total": "params_total"}


def si(x: float) -> str:
    """1234567 -> '1.23M'."""
    for unit, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def _check_record(p: Point, rec: dict[str, Any], run_dir: Path) -> None:
    for key in ("steps", "params_non_embedding", "params_total"):
        if rec.get(key) != getattr(p, key):
            raise UserError(f"{run_dir / 'result.json'}: {key}={rec.get(key)}, the plan says {getattr(p, key)}",
                            fix="pass --overwrite to retrain the grid")


def _point_line(rec: dict[str, Any], status: str) -> str:
    return (f"C {budget_name(rec['budget']):>6}  width {rec['width']:>4}  N {si(rec['params_non_embedding']):>6} "
            f"(total {si(rec['params_total']):>6})  {rec['steps']:>6} steps  {si(rec['tokens']):>6} tokens "
            f"({rec['epochs']:.2f} epochs)  val loss {rec['val_loss']:.4f}  {rec['seconds']:6.1f}s  {status}")


def _finite(x: Any) -> Any:
    """JSON has no NaN: None instead, recursively."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_finite(v) for v in x]
    return x


def _law_dict(law: PowerLaw | None, boot: Spread | None) -> dict[str, Any] | None:
    if law is None:
        return None
    return {"exponent": law.exponent, "prefactor": law.prefactor, "exponent_se": law.exponent_se,
            "points": law.points, "bootstrap": None if boot is None else
            {"sd": boot.sd, "p16": boot.low, "p84": boot.high, "replicates": boot.replicates}}


def fit_dict(fit: ScalingFit) -> dict[str, Any]:
    return {
        "optima": [{"budget": o.budget, "n_opt": o.n_opt, "d_opt": o.d_opt, "compute": o.compute,
                    "loss_opt": o.loss_opt, "inside": o.inside,
                    "parabola_ln_n": [o.parabola.c2, o.parabola.c1, o.parabola.c0]} for o in fit.optima],
        "skipped": [{"budget": b, "why": why} for b, why in fit.skipped],
        "n_opt": _law_dict(fit.n_law, fit.n_bootstrap),
        "d_opt": _law_dict(fit.d_law, fit.d_bootstrap),
        "a_plus_b": None if fit.n_law is None else fit.n_law.exponent + fit.d_law.exponent,
        "notes": fit.notes,
    }


def law_line(name: str, fit: ScalingFit) -> str:
    """One line: both exponents with their standard errors and bootstrap spreads, and a + b."""
    if fit.n_law is None:
        return f"{name} N: no power law ({'; '.join(fit.notes)})"

    def one(law: PowerLaw, boot: Spread | None) -> str:
        se = "n/a with 2 budgets" if math.isnan(law.exponent_se) else f"{law.exponent_se:.3f}"
        spread = "" if boot is None else f", bootstrap sd {boot.sd:.3f}, 68% [{boot.low:.3f}, {boot.high:.3f}]"
        return f"C^{law.exponent:.3f} (s.e. {se}{spread})"

    return (f"{name} N: N_opt ∝ {one(fit.n_law, fit.n_bootstrap)}; D_opt ∝ {one(fit.d_law, fit.d_bootstrap)}; "
            f"a + b = {fit.n_law.exponent + fit.d_law.exponent:.6f}")


def _optimum_lines(fit: ScalingFit) -> list[str]:
    lines = [(o.budget, f"C {budget_name(o.budget)}: N_opt {si(o.n_opt)}, D_opt {si(o.d_opt)} tokens, loss "
                        f"{o.loss_opt:.4f}{'' if o.inside else ' (outside the sizes trained: extrapolated)'}")
             for o in fit.optima]
    lines += [(b, f"C {budget_name(b)}: no minimum ({why})") for b, why in fit.skipped]
    return [line for _, line in sorted(lines)]


def summary_markdown(results: dict[str, Any], fits: dict[str, ScalingFit]) -> str:
    s = results["settings"]
    rows = "\n".join(
        f"| {budget_name(r['budget'])} | {r['width']} | {si(r['params_non_embedding'])} | {si(r['params_total'])} | "
        f"{r['steps']} | {si(r['tokens'])} | {r['epochs']:.2f} | {r['val_loss']:.4f} | {r['seconds']:.0f} |"
        for r in results["points"])
    parts = [
        "# Scaling laws: IsoFLOP profiles (Chinchilla approach 2)\n",
        f"Embedded corpus, BPE {s['vocab_size']}, training split {results['train_tokens']:,} tokens, validation "
        f"{results['val_tokens']:,} (final loss over {s['eval_iters']} batches of {s['batch_size']}x{s['block_size']}, "
        f"the same for every point). Models: {s['arch']}, {s['layers']} layers, {s['heads']} heads, widths "
        f"{', '.join(map(str, results['widths']))}; lr {s['lr']} with a cosine to lr/10 at each run's end.\n",
        f"Compute: {results['convention']}. Uncertainty: the OLS standard error of the log-log slope, and a "
        "bootstrap over grid points (each budget's runs redrawn with replacement).\n",
        "## Runs\n",
        "| budget C | width | N non-emb | N total | steps | tokens | epochs | val loss | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
        rows + "\n",
    ]
    if results["left_out"]:
        parts += [f"Left out ({results['settings']['max_epochs']:g} epochs at most, {MIN_STEPS} steps at least): "
                  + "; ".join(results["left_out"]) + ".\n"]
    for name, fit in fits.items():
        parts += [f"## Optima and law, {name} N\n"] + [f"- {line}" for line in _optimum_lines(fit)]
        parts += ["", law_line(name, fit), ""] + [f"Note: {n}\n" for n in fit.notes]
    parts += ["![IsoFLOP profiles and the fitted law](scaling.png)\n"]
    return "\n".join(parts)


def run_scaling(out: str | Path, budgets: list[float], widths: list[int], s: GridSettings, *,
                resume: bool = False, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Train every point of the grid not yet finished, fit, draw and summarise; returns results.json's content."""
    check_grid(budgets, widths, s)
    plan(budgets, widths, s, s.vocab_size)  # a budget with too few long-enough points is refused before any data
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other",
                        fix="--resume finishes the grid in the folder, --overwrite replaces it")
    out = Path(out)
    # the folder's lock; what is kept or replaced is decided here, by ARTEFACTS
    with claim_run_dir(out, resume=True):
        claim_outputs(out, ARTEFACTS, resume=resume, overwrite=overwrite, holds="a scaling grid",
                      kept="finished points are kept")
        # a resumed grid keeps its shared settings: a point trained with others would not compare
        check_plan(out / "plan.json", s, ignore=("device", "threads", "max_epochs"), made="the grid",
                   not_plan="a scaling plan", afresh="pass --overwrite to start the grid afresh")
        write_json(out / "plan.json", {"settings": asdict(s), "budgets": sorted(budgets), "widths": sorted(widths)})
        data_dir = prepare_run_data(base_config(s), out, None, progress, resume=resume)
        shards = TokenShards(data_dir)
        train_tokens, val_tokens = shards.tokens("train"), shards.tokens("val")
        points, left_out = plan(budgets, widths, s, shards.tokenizer().vocab_size, train_tokens)
        print(f"grid: {len(points)} points ({len(budgets)} budgets x {len(widths)} widths"
              f"{f', {len(left_out)} left out' if left_out else ''}), "
              f"{sum(p.steps for p in points):,} steps, {si(sum(p.tokens for p in points))} tokens; training split "
              f"{si(train_tokens)} tokens -> {out}", flush=True)
        for line in left_out:
            print(f"left out: {line}", flush=True)
        records = []
        bar = tqdm(total=sum(p.flops_per_token * p.tokens for p in points), unit="FLOP", unit_scale=True,
                   desc="grid", disable=not progress, dynamic_ncols=True)
        try:
            for p in points:
                run_dir = out / "points" / p.name
                rec = read_result(run_dir / RESULT, "point")
                if rec is None:
                    rec = run_point(p, s, run_dir, data_dir, train_tokens)
                    status = "resumed" if rec["resumed"] else "trained"
                else:
                    _check_record(p, rec, run_dir)
                    status = "kept (finished before)"
                records.append(rec)
                bar.update(p.flops_per_token * p.tokens)
                tqdm.write(_point_line(rec, status))  # above the bar (a plain print without one)
        finally:
            bar.close()

        fits = {name: fit_scaling([r["budget"] for r in records], [r[key] for r in records],
                                  [r["tokens"] for r in records], [r["val_loss"] for r in records])
                for name, key in COUNTS.items()}
        results = {"format": "scratchlm.scaling", "version": 1, "convention": CONVENTION, "settings": asdict(s),
                   "budgets": sorted(budgets), "widths": sorted(widths), "train_tokens": train_tokens,
                   "val_tokens": val_tokens, "points": records, "left_out": left_out,
                   "fits": {name: fit_dict(fit) for name, fit in fits.items()}}
        plot_scaling([r["budget"] for r in records], [r["params_non_embedding"] for r in records],
                     [r["val_loss"] for r in records], fits, out / "scaling.png", budget_label=budget_name)
        write_json(out / "results.json", _finite(results))
        write_text(out / "summary.md", summary_markdown(results, fits))
    for name, fit in fits.items():
        print(f"\nIsoFLOP optima, {name} N:\n  " + "\n  ".join(_optimum_lines(fit)))
        print(law_line(name, fit))
        for note in fit.notes:
            print(f"note: {note}")
    print(f"\n-> {out / 'scaling.png'}, {out / 'results.json'}, {out / 'summary.md'}")
    return results
