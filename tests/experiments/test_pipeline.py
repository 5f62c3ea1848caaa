"""The pipeline-schedule simulator against the DualPipe write-up's table (bubble, parameters,
activations of 1F1B, ZB1P and DualPipe), under the cost conditions the formulas assume."""

from __future__ import annotations

import json
import random
from collections import Counter

import pytest

from scratchlm.cli import main
from scratchlm.errors import UserError
from scratchlm.experiments.pipeline import SCHEDULES, Chunk, Costs, device_of, formula, run

SIZES = [(2, 4), (4, 8), (4, 9), (6, 12), (8, 16), (8, 24), (16, 32)]


def random_costs(rng: random.Random, name: str) -> Costs:
    """Costs within the formula's assumptions: any for 1F1B; W <= min(F, B-W) for ZB1P; for DualPipe
    also F = B-W (a forward costs as much as an input gradient) and max(F, B) <= F&B <= F+B."""
    F, W = rng.uniform(0.5, 2.0), rng.uniform(0.1, 2.0)
    if name == "1F1B":
        return Costs(F, rng.uniform(0.5, 4.0), 0.25)
    if name == "ZB1P":
        inp = rng.uniform(0.5, 2.0)
        return Costs(F, inp + min(W, F, inp), min(W, F, inp))
    W = min(W, F)
    B = F + W
    return Costs(F, B, W, rng.uniform(B, F + B))


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_bubble_and_memory_match_the_write_up(name):
    rng = random.Random(0)
    for P, M in SIZES:
        if name == "DualPipe" and (P % 2 or M % 2):
            continue
        for _ in range(10):
            costs = random_costs(rng, name)
            r = run(name, P, M, costs)
            bubble, params, activations = formula(name, P, costs)
            assert abs(max(r.bubble) - bubble) < 1e-9 * (1 + bubble), (P, M, costs, r.bubble, bubble)
            assert max(r.stages_held) == min(r.stages_held) == params
            assert max(r.peak_activations) == activations, (P, M, r.peak_activations)


def test_the_numbers_of_the_report():
    """P=4, M=8 and P=8, M=16 with F=1, B=2, W=1, no overlap (the CLI's defaults)."""
    costs = Costs(1.0, 2.0, 1.0)
    got = {(P, n): (run(n, P, M, costs).makespan, max(run(n, P, M, costs).bubble))
           for P, M in ((4, 8), (8, 16)) for n in SCHEDULES}
    assert got == {(4, "1F1B"): (33, 9), (4, "ZB1P"): (27, 3), (4, "DualPipe"): (26, 2),
                   (8, "1F1B"): (69, 21), (8, "ZB1P"): (55, 7), (8, "DualPipe"): (54, 6)}


@pytest.mark.parametrize("name", list(SCHEDULES))
def test_every_pass_runs_once_on_its_device_after_its_inputs(name):
    P, M = 4, 10
    r = run(name, P, M, Costs(1.0, 2.0, 0.5, 2.5))
    passes = []  # (kind, chunk, start, end); a full backward (B, or in F&B) is both halves, I and W
    for d, dev in enumerate(r.timeline):
        for b in dev:
            back = b.op.back if b.op.kind == "FB" else b.op.chunk
            parts = {"FB": [("F", b.op.chunk), ("I", back), ("W", back)], "B": [("I", back), ("W", back)]}
            for kind, c in parts.get(b.op.kind, [(b.op.kind, b.op.chunk)]):
                assert device_of(c, P) == d
                passes.append((kind, c, b.start, b.end))
    directions = 2 if name == "DualPipe" else 1
    chunks = {Chunk(dr, m, s) for dr in range(directions) for m in range(M // directions) for s in range(P)}
    assert Counter((k, c) for k, c, _, _ in passes) == Counter({(k, c): 1 for k in "FIW" for c in chunks})
    end = {(k, c): e for k, c, _, e in passes}
    for kind, c, start, _ in passes:  # data flow: forwards down the stages, input gradients back up
        if kind == "F" and c.stage > 0:
            assert start >= end["F", Chunk(c.direction, c.mb, c.stage - 1)]
        if kind == "I":
            assert start >= end["F", c]
            if c.stage < P - 1:
                assert start >= end["I", Chunk(c.direction, c.mb, c.stage + 1)]


def test_outside_its_assumptions_the_dualpipe_formula_is_only_an_estimate():
    """With F != B-W the simulated idle time differs from (P/2-1)(F&B+B-3W): the test above is not vacuous."""
    costs = Costs(1.0, 2.0, 0.5, 2.5)
    assert abs(max(run("DualPipe", 8, 16, costs).bubble) - formula("DualPipe", 8, costs)[0]) > 0.1


def test_bad_costs_and_sizes_are_refused():
    with pytest.raises(UserError, match="W"):
        Costs(1.0, 2.0, 2.0)
    with pytest.raises(UserError, match="FB"):
        Costs(1.0, 2.0, 1.0, 0.5)
    with pytest.raises(UserError, match="DualPipe"):
        run("DualPipe", 4, 6, Costs())


def test_cli_draws_the_timeline(tmp_path, capsys):
    out = tmp_path / "pp"
    assert main(["experiment", "pipeline", "--stages", "4", "--micro-batches", "8", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "DualPipe" in printed and (out / "pipeline.png").stat().st_size > 20_000
    saved = json.loads((out / "pipeline.json").read_text())
    assert saved["schedules"]["ZB1P"]["bubble"] == [3.0] * 4
    assert main(["experiment", "pipeline", "--W", "3", "--out", str(tmp_path / "bad")]) == 2
