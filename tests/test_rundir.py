"""Run folders and single outputs (`scratchlm.rundir`), and the temp clean-up in `scratchlm.io`."""

from __future__ import annotations

import os
import subprocess

import pytest

from scratchlm.errors import UserError
from scratchlm.io import remove_stale_temps
from scratchlm.rundir import LOCK, check_output_path, claim_run_dir


def dead_pid() -> int:
    """The PID of a process that has exited and been reaped."""
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def old_run(path):
    """A folder holding an earlier run's artefacts, plus a file of the user's."""
    (path / "ckpt" / "step_0000100").mkdir(parents=True)
    (path / "ckpt" / "latest").write_text("step_0000100\n")
    (path / "metrics.jsonl").write_text('{"step": 100, "loss": 1.0}\n')
    (path / "data").mkdir()
    (path / "notes.txt").write_text("mine")
    return path


def test_fresh_run_refuses_an_old_run_and_overwrite_clears_only_run_artefacts(tmp_path):
    run = old_run(tmp_path / "run")
    with pytest.raises(UserError, match=r"already holds a run \(metrics.jsonl, ckpt, data\).*--resume.*--overwrite"), \
            claim_run_dir(run):
        pass
    assert (run / "ckpt" / "step_0000100").is_dir() and (run / "metrics.jsonl").exists()
    with claim_run_dir(run, resume=True):  # resuming keeps everything
        assert (run / "ckpt" / "latest").exists()
    with claim_run_dir(run, overwrite=True):
        assert sorted(p.name for p in run.iterdir()) == [LOCK, "notes.txt"]
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # the lock goes with the run
    with pytest.raises(UserError, match="contradict"), claim_run_dir(run, resume=True, overwrite=True):
        pass


def test_lock_refuses_a_second_writer_and_reclaims_a_stale_lock(tmp_path, capsys):
    run = tmp_path / "run"
    with claim_run_dir(run):
        assert (run / LOCK).read_text() == f"{os.getpid()}\n"
        # A second claim opens the lock file anew; flock treats it as another holder, as it would a process.
        with pytest.raises(UserError, match=rf"another scratchlm process \(PID {os.getpid()}\)"), \
                claim_run_dir(run, resume=True):
            pass
    assert not (run / LOCK).exists()
    pid = dead_pid()
    (run / LOCK).write_text(f"{pid}\n")  # a killed run never removed its lock (and holds no flock)
    with claim_run_dir(run, resume=True):
        assert (run / LOCK).read_text() == f"{os.getpid()}\n"
    assert f"reclaimed the stale lock of PID {pid}" in capsys.readouterr().err


def test_stale_temporaries_of_dead_processes_are_removed(tmp_path, capsys):
    run = tmp_path / "run"
    ckpt = run / "ckpt"
    ckpt.mkdir(parents=True)
    dead, alive = dead_pid(), os.getpid()
    (ckpt / f".step_0000004.tmp-{dead}").mkdir()  # a save killed halfway
    (ckpt / f".step_0000004.tmp-{dead}" / "model.safetensors").write_bytes(b"partial")
    (ckpt / f".best.old-{dead}").mkdir()  # a `best` swap killed between its two renames
    (ckpt / f".best.old-{dead}" / "model.safetensors").write_bytes(b"old best")
    (ckpt / f".latest.tmp-{dead}").write_text("step_0000004\n")
    (ckpt / f".step_0000006.tmp-{alive}").mkdir()  # a live process's work in progress stays
    with claim_run_dir(run, resume=True):
        names = sorted(p.name for p in ckpt.iterdir())
    assert names == [f".step_0000006.tmp-{alive}", "best"]
    assert (ckpt / "best" / "model.safetensors").read_bytes() == b"old best"  # put back, not deleted
    assert "removed 2 temporary file(s)" in capsys.readouterr().err
    assert remove_stale_temps(tmp_path / "nowhere") == []


def test_outputs_that_are_inputs_or_of_the_wrong_kind_are_refused(tmp_path, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("text")
    for overwrite in (False, True):
        with pytest.raises(UserError, match="is the input"):
            check_output_path(corpus, overwrite=overwrite, inputs=[str(corpus)])
    with pytest.raises(UserError, match="already exists.*--overwrite"):
        check_output_path(corpus, overwrite=False)
    assert check_output_path(corpus, overwrite=True) == corpus
    with pytest.raises(UserError, match="is a folder"):
        check_output_path(tmp_path, overwrite=True)
    with pytest.raises(UserError, match="c.txt: is a file"):
        check_output_path(corpus / "sub" / "out.json", overwrite=False)
    with pytest.raises(UserError, match="exists and is not a folder"), claim_run_dir(corpus):
        pass
    base = tmp_path / "base"
    (base / "ckpt" / "step_0000002").mkdir(parents=True)
    with pytest.raises(UserError, match=r"holds the input .*step_0000002 \(in its ckpt\)"), \
            claim_run_dir(base, overwrite=True, inputs=[str(base / "ckpt" / "step_0000002")]):
        pass
    with pytest.raises(UserError, match="is the input"), claim_run_dir(base, overwrite=True, inputs=[str(base)]):
        pass
    assert (base / "ckpt" / "step_0000002").is_dir()
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only folder, even for root
    with pytest.raises(UserError, match="not writable"), claim_run_dir(tmp_path / "new"):
        pass
    assert not (tmp_path / "new").exists()
