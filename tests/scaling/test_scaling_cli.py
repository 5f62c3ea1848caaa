"""`scratchlm scaling` end to end: the quick grid writes its picture, results and summary; a resumed
grid retrains nothing finished, resumes an interrupted point, and keeps its settings; bad input is
one line and exit 2; --overwrite replaces only the verb's own outputs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from scratchlm.cli import main
from scratchlm.errors import Interrupted
from scratchlm.scaling import grid
from scratchlm.scaling.fit import fit_scaling
from scratchlm.scaling.plot import plot_scaling

PNG = b"\x89PNG\r\n\x1a\n"
SMALL = ["--quick", "--budget", "1e9", "--widths", "16,24,32", "--quiet"]  # 3 points, a few seconds


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def one_line_error(code: int, err: str, *names: str) -> None:
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scratchlm: error: "), err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0]


def statuses(stdout: str) -> list[str]:
    """The status ending each point's line: trained, resumed, kept (finished before)."""
    return [line.rsplit("s  ", 1)[1] for line in stdout.splitlines() if line.startswith("C ") and "val loss" in line]


def result_times(out) -> dict[str, int]:
    return {p.parent.name: p.stat().st_mtime_ns for p in sorted(out.glob("points/*/result.json"))}


def test_quick_grid_end_to_end_and_a_second_run_retrains_nothing(tmp_path, capsys):
    out = tmp_path / "grid"
    code, stdout, _ = run(capsys, "scaling", "--quick", "--out", str(out), "--quiet")
    assert code == 0
    assert (out / "scaling.png").read_bytes()[:8] == PNG
    results = json.loads((out / "results.json").read_text())
    points = results["points"]
    assert len(points) == 9 and {p["width"] for p in points} == set(grid.QUICK_WIDTHS)
    assert {p["budget"] for p in points} == set(grid.QUICK_BUDGETS)
    for p in points:
        assert np.isfinite(p["val_loss"]) and 0 < p["val_loss"] < 10
        assert p["tokens"] == p["steps"] * grid.QUICK_SETTINGS.tokens_per_step
        assert p["epochs"] == pytest.approx(p["tokens"] / results["train_tokens"], rel=1e-12)
        # the budget is 6·N·D in non-embedding parameters, within half a step
        assert abs(p["compute_non_embedding"] - p["budget"]) <= 3 * p["params_non_embedding"] * 256
        assert p["params_total"] > p["params_non_embedding"] > 0
    assert set(results["fits"]) == {"non-embedding", "total"}
    assert "| val loss |" in (out / "summary.md").read_text()
    assert statuses(stdout) == ["trained"] * 9 and "epochs" in stdout
    before = result_times(out)
    assert len(before) == 9

    code, stdout, _ = run(capsys, "scaling", "--quick", "--out", str(out), "--quiet", "--resume")
    assert code == 0
    assert statuses(stdout) == ["kept (finished before)"] * 9
    assert result_times(out) == before
    assert json.loads((out / "results.json").read_text())["points"] == points

    code, _, err = run(capsys, "scaling", "--quick", "--out", str(out), "--quiet")
    one_line_error(code, err, str(out), "--resume", "--overwrite")
    code, _, err = run(capsys, "scaling", "--quick", "--out", str(out), "--quiet", "--resume", "--heads", "4")
    one_line_error(code, err, "plan.json", "heads=2", "heads=4")
    assert result_times(out) == before


def test_an_interrupted_point_resumes_and_a_lost_result_is_recovered(tmp_path, capsys, monkeypatch):
    out = tmp_path / "grid"
    real = grid.pretrain

    def stopped_halfway(cfg, data_dir, **kw):
        if cfg.model.n_embd == 24:
            real(cfg, data_dir, stop_at_step=cfg.train.max_steps // 2, **kw)  # saves a checkpoint, as Ctrl-C does
            raise Interrupted("SIGINT", cfg.train.max_steps // 2)
        return real(cfg, data_dir, **kw)

    monkeypatch.setattr(grid, "pretrain", stopped_halfway)
    code, _, err = run(capsys, "scaling", *SMALL, "--out", str(out))
    assert code == 130 and "--resume" in err
    assert list(result_times(out)) == ["C1e9_w16"]  # the point after the interrupted one never started
    monkeypatch.setattr(grid, "pretrain", real)

    code, stdout, _ = run(capsys, "scaling", *SMALL, "--out", str(out), "--resume")
    assert code == 0
    assert statuses(stdout) == ["kept (finished before)", "resumed", "trained"]
    first = json.loads((out / "results.json").read_text())["points"]
    assert [p["resumed"] for p in first] == [False, True, False]

    # killed after its final checkpoint, before its result: the logged final validation is recorded
    (out / "points" / "C1e9_w32" / "result.json").unlink()
    code, stdout, _ = run(capsys, "scaling", *SMALL, "--out", str(out), "--resume")
    assert code == 0 and statuses(stdout) == ["kept (finished before)"] * 2 + ["resumed"]
    again = json.loads((out / "results.json").read_text())["points"]
    assert again[2]["val_loss"] == first[2]["val_loss"] and again[2]["steps"] == first[2]["steps"]

    (out / "notes.txt").write_text("mine")
    code, stdout, _ = run(capsys, "scaling", *SMALL, "--out", str(out), "--overwrite")
    assert code == 0 and statuses(stdout) == ["trained"] * 3
    assert (out / "notes.txt").read_text() == "mine"


def test_points_too_short_or_over_the_epoch_cap_are_left_out(tmp_path, capsys):
    out = tmp_path / "grid"
    code, stdout, _ = run(capsys, "scaling", "--quick", "--budget", "1e9,2e9", "--widths", "16,24,32,48",
                          "--max-epochs", "0.02", "--out", str(out), "--quiet")
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    trained = sorted((p["budget"], p["width"]) for p in results["points"])
    assert trained == [(1e9, 16), (1e9, 24), (1e9, 32), (2e9, 24), (2e9, 32), (2e9, 48)]
    assert [line.split(":")[0] for line in results["left_out"]] == ["C 1e9 width 48", "C 2e9 width 16"]
    assert "fewer than 20" in results["left_out"][0] and "over the 0.02 allowed" in results["left_out"][1]
    assert all(p["epochs"] <= 0.02 for p in results["points"])
    assert stdout.count("left out: ") == 2 and "Left out" in (out / "summary.md").read_text()


@pytest.mark.parametrize("argv, names", [
    (["--budget", "1e12,lots"], ["--budget", "1e12,lots"]),
    (["--budget=-1e12"], ["--budget"]),
    (["--budget", "0,1e12"], ["--budget", "positive"]),
    (["--widths", "16,30,32"], ["--widths", "30", "head count 4"]),  # the default grid: 4 heads
    (["--widths", "16,24"], ["--widths", "3 sizes"]),
    (["--widths", "16,x"], ["--widths"]),
    (["--budget", "1e3", "--quick"], ["1e3", "steps", "keeps 0"]),
    (["--max-epochs", "0"], ["--max-epochs"]),
    (["--resume", "--overwrite"], ["--resume", "--overwrite"]),
    (["--layers", "0"], ["--layers"]),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, argv, names):
    out = tmp_path / "grid"
    code, _, err = run(capsys, "scaling", "--out", str(out), "--quiet", *argv)
    one_line_error(code, err, *names)
    assert not (out / "points").exists()


def test_an_output_that_is_a_file_is_refused(tmp_path, capsys):
    path = tmp_path / "taken"
    path.write_text("keep me")
    code, _, err = run(capsys, "scaling", *SMALL, "--out", str(path))
    one_line_error(code, err, str(path))
    assert path.read_text() == "keep me"


def test_the_picture_of_a_fitted_grid(tmp_path):
    budget, n, d, loss = [], [], [], []
    for c in (1e12, 1e13, 1e14):
        for f in (0.25, 0.5, 1, 2, 4):
            size = 0.1 * c**0.5 * f
            budget.append(c), n.append(size), d.append(c / (6 * size)), loss.append(3 + 0.05 * np.log(f) ** 2)
    fits = {"non-embedding": fit_scaling(budget, n, d, loss, replicates=20),
            "total": fit_scaling(budget, [x * 1.5 for x in n], d, loss, replicates=20)}
    plot_scaling(budget, n, loss, fits, tmp_path / "s.png")
    assert (tmp_path / "s.png").read_bytes()[:8] == PNG
    assert fits["non-embedding"].n_law.exponent == pytest.approx(0.5, abs=1e-9)
