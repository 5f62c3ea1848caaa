"""Where a verb may write: run folders claimed under a lock, single outputs checked first.

The rule every verb follows: never delete or overwrite what it did not create in this run, unless
the user passed `--overwrite`. Two entry points implement it, and every verb uses one of them:

- `claim_run_dir(path, resume=..., overwrite=...)`, a context manager, for a run folder
  (pretrain, sft, classify train, experiment, demo). While it is held, `RUN/.lock` carries the
  PID and an exclusive `flock`, so a second process on the same folder is refused at once. The
  kernel drops a flock when its process dies, however it dies; a lock file left by a killed run
  is therefore recognised as stale, reported and reclaimed, whatever its PID has become since.
  On entry it also removes the temporary files and folders dead processes left behind
  (`io.remove_stale_temps`). A fresh run (no `resume`) into a folder that already holds any
  run artefact (`RUN_ARTEFACTS`: checkpoints, metrics.jsonl, prepared data, ...) is refused;
  with `overwrite` those artefacts are removed first, and nothing else in the folder, so nothing
  of the old run mixes into the new one (its data, its metrics, its `ckpt/best`). `resume`
  keeps everything: the stage continues the run and appends to its metrics, after
  `trim_metrics` has dropped what a killed run logged past its last checkpoint.
- `check_output_path(path, overwrite=..., inputs=...)` for one output file or folder
  (tokenizer files, PNGs, prepared data, converted models): refuses an existing output without
  `overwrite`, and always refuses an output that is one of the inputs.

Both check up front what would otherwise fail halfway with a traceback: an output that exists
with the wrong type (a file where a folder goes, or the reverse), a parent path that is a file,
a folder that is not writable. What can only fail later (a full disk) is an `OSError` that the
CLI reports in one line.

Left out: Windows (the lock is a POSIX flock), locks across machines (a flock on NFS may not be
shared) and locking of single outputs (their writes are atomic; the last writer wins).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
from collections.abc import Iterable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

from scratchlm.errors import UserError
from scratchlm.io import remove_stale_temps, write_text

LOCK = ".lock"

# Every name a verb writes into its run folder. A fresh run refuses a folder holding any of them;
# --overwrite removes exactly these (tests check that the stages write nothing else).
RUN_ARTEFACTS = (
    "config.json", "metrics.jsonl", "loss.png", "ckpt", "data", "tb", "profile", "wandb",  # every training stage
    "eval", "adapters.safetensors", "adapters.json", "labels.json",  # sft, classify
    "tokenizer.json", "tokenizers.png", "pretrain", "sft", "rm", "dpo", "grpo", "ppo", "report.md",  # demo
    "evaluation", "quantized", "draft", "report.html", "scale", "scaling", "arch",  # demo: later stages
    "rmsnorm", "layernorm", "norms.png",  # experiment norms
)


def _within(inner: Path, outer: Path) -> bool:
    return inner == outer or outer in inner.parents


def _check_writable_location(path: Path, want_dir: bool) -> None:
    """Refuse an output whose type is wrong or whose nearest existing ancestor is not a writable folder."""
    if path.exists():
        if want_dir and not path.is_dir():
            raise UserError(f"{path}: exists and is not a folder", fix="choose another --out")
        if not want_dir and path.is_dir():
            raise UserError(f"{path}: is a folder; a file path is needed here", fix="name a file, e.g. "
                            f"{path / 'out'}")
    ancestor = path if want_dir and path.exists() else path.parent
    while not ancestor.exists():
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise UserError(f"{ancestor}: is a file, so {path} cannot be created", fix="choose another --out")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise UserError(f"{ancestor}: not writable", fix="choose another --out, or fix the folder's permissions")


def check_output_path(path: str | os.PathLike, *, overwrite: bool, inputs: Iterable[str | os.PathLike] = (),
                      folder: bool = False) -> Path:
    """Check that a verb may write the file (or, with `folder`, the folder) `path`; return it.

    Refused: an output that is one of `inputs` or contains one (even with `overwrite`), an
    existing output without `overwrite` (an empty folder does not count), and the cases of the
    module docstring.
    """
    path = Path(path)
    here = path.resolve()
    for item in inputs:
        src = Path(item).resolve()
        if _within(src, here) or _within(here, src):
            raise UserError(f"{path}: is the input {item} or overlaps it; writing there would destroy it",
                            fix="choose another --out")
    _check_writable_location(path, folder)
    exists = path.is_dir() and any(path.iterdir()) if folder else path.exists()
    if exists and not overwrite:
        raise UserError(f"{path}: already exists", fix="pass --overwrite to replace it, or choose another --out")
    return path


@contextlib.contextmanager
def _lock(folder: Path) -> Iterator[None]:
    """Hold `folder/.lock` (PID + an exclusive flock) for the block; refuse if another process holds it."""
    lock = folder / LOCK
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{folder}: another scratchlm process (PID {holder}) is writing to this folder",
                            fix="wait for it to finish, or choose another --out") from None
        # The holder we waited for may have removed the file just before we locked it: only a lock
        # on the file that is there now counts.
        with contextlib.suppress(FileNotFoundError):
            if os.stat(lock).st_ino == os.fstat(fd).st_ino:
                break
        os.close(fd)
    try:
        stale = os.read(fd, 64).decode(errors="replace").strip()
        if stale:
            print(f"scratchlm: note: {lock}: reclaimed the stale lock of PID {stale}, which ended without "
                  "releasing it", file=sys.stderr)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            lock.unlink()
        os.close(fd)


def _remove(folder: Path, names: Iterable[str]) -> None:
    """Delete `folder/name` for each name: a folder with its contents, a file or a link (not its target)."""
    for name in names:
        target = folder / name
        if target.is_dir() and not target.is_symlink():
            shutil.rmtree(target)
        else:
            target.unlink()


@contextlib.contextmanager
def claim_run_dir(path: str | os.PathLike, *, resume: bool = False, overwrite: bool = False,
                  inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Hold the run folder `path` for a verb's whole run (see the module docstring); yields it.

    `inputs` are what the run reads (corpus files, a base checkpoint, prepared data): a fresh run
    refuses a folder where one of them sits inside a run artefact it would replace.
    """
    path = Path(path)
    if os.environ.get("RANK", "0") != "0" and "WORLD_SIZE" in os.environ:
        yield path  # torchrun's other processes: rank 0 claims the folder for the run, and alone writes in it
        return
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other",
                        fix="--resume continues the run in the folder, --overwrite replaces it")
    _check_writable_location(path, want_dir=True)
    if not resume:
        here = path.resolve()
        for item in inputs:
            src = Path(item).resolve()
            clash = next((n for n in RUN_ARTEFACTS if _within(src, here / n)), None)
            if clash:
                raise UserError(f"{path}: holds the input {item} (in its {clash}); a new run there would replace it",
                                fix="choose another --out")
            if _within(here, src):
                raise UserError(f"{path}: is the input {item} or lies inside it", fix="choose another --out")
    path.mkdir(parents=True, exist_ok=True)
    with _lock(path):
        removed = [name for where in (path, path / "ckpt") for name in remove_stale_temps(where)]
        if removed:
            print(f"scratchlm: note: removed {len(removed)} temporary file(s) left by killed runs in {path}: "
                  + ", ".join(removed), file=sys.stderr)
        found = [n for n in RUN_ARTEFACTS if (path / n).exists() or (path / n).is_symlink()]
        if found and not resume:
            if not overwrite:
                raise UserError(f"{path}: already holds a run ({', '.join(found[:4])}"
                                f"{', ...' if len(found) > 4 else ''})",
                                fix="pass --resume to continue it, --overwrite to replace it, or choose another --out")
            _remove(path, found)
        yield path


def trim_metrics(path: str | os.PathLike, step: int) -> None:
    """Keep only the records of `metrics.jsonl` up to `step`, the checkpoint a run resumes from:
    the steps a killed run logged after it are redone, and their records would appear twice.
    A last line cut short by the kill is dropped too."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record.get("step", 0) <= step:
            kept.append(line + "\n")
    write_text(path, "".join(kept))


# -- a stage's outputs inside its claimed folder (experiment arch, scaling) -----------------------------
# Such a stage owns a fixed list of names in its folder; `claim_outputs`, `check_plan` and `read_result`
# refuse, keep or replace them, each message worded by the caller ("an architecture comparison", "run").

def claim_outputs(out: Path, names: Iterable[str], *, resume: bool, overwrite: bool, holds: str,
                  kept: str) -> None:
    """Refuse a folder already holding any of `names` unless `resume` (all kept) or `overwrite` (those
    removed, nothing else). `holds` names the stage's output ("a scaling grid"), `kept` what a resume keeps
    ("finished points are kept")."""
    found = [name for name in names if (out / name).exists()]
    if not found or resume:
        return
    if not overwrite:
        raise UserError(f"{out}: already holds {holds} ({', '.join(found)})",
                        fix=f"pass --resume to finish it ({kept}), --overwrite to replace it, or choose another --out")
    _remove(out, found)


def check_plan(path: Path, settings: Any, *, ignore: Iterable[str], made: str, not_plan: str,
               afresh: str) -> None:
    """A resumed stage keeps the settings its `plan.json` (at `path`) recorded under "settings": what was
    trained with others would not compare. `settings` is the stage's settings dataclass, compared as JSON
    holds it (tuples as lists); the keys in `ignore` may change. Wording: `made` names the stage's output
    ("the grid"), `not_plan` what an unreadable file is not ("a scaling plan"), `afresh` the fix then."""
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))["settings"]
    except (ValueError, KeyError, TypeError):
        raise UserError(f"{path}: not {not_plan}", fix=afresh) from None
    new = json.loads(json.dumps(asdict(settings)))
    ignore = set(ignore)
    changed = [k for k in new if k not in ignore and old.get(k) != new[k]]
    if changed:
        k = changed[0]
        raise UserError(f"{path}: {made} was made with {k}={old.get(k)}, this call asks {k}={new[k]}",
                        fix="resume with the same settings (--quick too), or pass --overwrite to start afresh")


def read_result(path: Path, what: str) -> dict[str, Any] | None:
    """The record of a finished `what` ("run", "point") at `path` (its result.json), or None when absent."""
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError):  # written atomically: only an edit by hand can break it
        raise UserError(f"{path}: not a {what}'s result (unreadable JSON)",
                        fix=f"delete it, and --resume retrains that {what}") from None


def reopen_run(run_dir: Path) -> bool:
    """Ready one run folder of such a stage, inside its claimed folder: True when it resumes from its
    checkpoint; a run killed before its first checkpoint starts afresh (its folder is removed)."""
    for where in (run_dir, run_dir / "ckpt"):  # what a killed run left half-written
        remove_stale_temps(where)
    resume = (run_dir / "ckpt" / "latest").is_file()
    if run_dir.exists() and not resume:  # stopped before its first checkpoint: nothing to keep
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return resume
