"""SIGKILL a checkpointing run at random moments; count what breaks: `python bench/kill_checkpoints.py`.

A tiny char-level GPT pretrains in a subprocess with a checkpoint after every step (fp32, one
thread), so most moments of its life are inside a save. The script kills it with SIGKILL at a
random moment, checks what the run folder holds, resumes it with `--resume`, kills it again, and so
on `--kills` times; then lets it finish and compares it with the same run never interrupted.

After each kill:
- the checkpoint `ckpt/latest` names must load: `find_checkpoint` + `load_model_for_inference`,
  and the trainer state (optimizer moments, RNG states) through `load_trainer_state`; its
  `trainer.json` step must equal the step in its name;
- the resumed process must start at that step: its run header ("steps S->M (resumed)") is read
  back; a resume that refuses to start (e.g. a stale lock it does not reclaim) counts as a failure.
Most kills land while training; one in five lands at a uniform moment of the start-up (imports,
lock, resume load), where the resumed process's header may not be printed yet ("resumes checked"
says how many were). Kill moments are uniform over a window sized so that all kills fit in the run.

Temporary folders a save leaves behind (`.step_N.tmp-PID`, `.NAME.old-PID`, `.NAME.tmp-PID`) are
counted right after each kill (what SIGKILL leaves) and once the run has finished (what nothing
cleaned up: the figure must be 0). A kill also leaves the run folder's lock (`RUN/.lock`, the dead
writer's PID); each resume must reclaim it rather than refuse to start, and the table says how many
kills left one and how many resumes reported reclaiming one.

Resume ≡ uninterrupted: the interrupted run and a never-interrupted run with the same settings
must end with bitwise equal weights (`torch.equal` on every tensor of the final model.safetensors:
same machine, same single thread, same operation order, so exactness is expected, not a tolerance);
the maximum absolute difference is printed as well.

Options: --kills N (default 25), --seed S, --steps M (max_steps of the run), --keep (keep the work
folder). The table at the end has the figures; exit status 1 when any must-be-zero figure is not.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

# bench/tokenizers.py would shadow HF's `tokenizers` package: take this folder off the import path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import torch  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from scratchlm import checkpoint as ckpt_io  # noqa: E402
from scratchlm.train.optim import make_optimizer  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"
HEADER = re.compile(r"steps (\d+)->(\d+)")
TEMP = re.compile(r"^\..*\.(tmp|old)-\d+$")
LOCK = ".lock"  # scratchlm/rundir.py: the run folder's lock file, holding its writer's PID
RECLAIMED = "reclaimed the stale lock"
STARTUP_KILL_SHARE = 0.2

# A ~10k-parameter GPT: a step takes milliseconds, so a save (every step) is most of the run's life.
OVERRIDES = [
    "--model.n_layer=1", "--model.n_head=2", "--model.n_embd=32", "--model.block_size=32",
    "--train.batch_size=4", "--train.ckpt_interval=1", "--train.keep_last=2", "--train.precision=fp32",
    "--train.device=cpu", "--train.eval_interval=50", "--train.eval_iters=2", "--train.log_interval=10",
    "--train.warmup_steps=10", "--train.tensorboard=false", "--data.workers=1",
]


@dataclass
class Tally:
    kills: int = 0
    kills_at_startup: int = 0
    unloadable: int = 0
    step_mismatch: int = 0  # trainer.json step differs from the name `latest` gives
    resumes_checked: int = 0
    wrong_step: int = 0
    resume_failed: int = 0
    temps_after_kill: int = 0  # the most seen right after one kill
    locks_left: int = 0  # kills after which RUN/.lock still named the dead process
    locks_reclaimed: int = 0  # resumes that said they reclaimed such a lock
    problems: list[str] = field(default_factory=list)


def launch(corpus: Path, run: Path, steps: int, log: Path, resume: bool) -> subprocess.Popen:
    argv = [sys.executable, "-m", "scratchlm", "pretrain", str(corpus), "--preset", "char-tiny", "--out", str(run),
            "--quiet", f"--train.max_steps={steps}", *OVERRIDES, *(["--resume"] if resume else [])]
    # One thread: identical operation order in every segment and in the uninterrupted run.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SCRATCHLM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    out = open(log, "w")  # noqa: SIM115 (the child holds it; closed when the parent drops it)
    try:
        return subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=run.parent)
    finally:
        out.close()


def header(log: Path) -> tuple[int, int] | None:
    m = HEADER.search(log.read_text(errors="replace"))
    return (int(m[1]), int(m[2])) if m else None


def wait_for(cond, proc: subprocess.Popen, timeout: float) -> bool:
    """Poll `cond()` until true; False when the process exits first or the time runs out."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if cond():
            return True
        if proc.poll() is not None:
            return bool(cond())
        time.sleep(0.01)
    return False


def stale_temps(run: Path) -> list[Path]:
    return [p for p in run.rglob(".*") if TEMP.match(p.name)]  # folders and files (`.latest.tmp-PID`)


def latest_step(run: Path) -> int:
    return int((run / "ckpt" / "latest").read_text().strip().removeprefix("step_"))


def check_latest(run: Path, tally: Tally) -> int | None:
    """Load what `latest` names (model, trainer state); return its step, or None when it fails."""
    try:
        ckpt = ckpt_io.find_checkpoint(run)
        model, _, cfg = ckpt_io.load_model_for_inference(run)
        trainer = ckpt_io.load_trainer_state(ckpt, make_optimizer(model, cfg.train))
        named = int(ckpt.name.removeprefix("step_"))
        if trainer["step"] != named:
            tally.step_mismatch += 1
            tally.problems.append(f"kill {tally.kills}: {ckpt.name} holds step {trainer['step']}")
        return named
    except Exception as e:  # anything at all is a checkpoint that does not load
        tally.unloadable += 1
        tally.problems.append(f"kill {tally.kills}: latest does not load: {type(e).__name__}: {e}")
        return None


def check_resume_start(log: Path, expected_start: int | None, tally: Tally, what: str) -> None:
    """Count a resume whose header is in `log`, and a problem if it did not start at `expected_start`."""
    got = header(log)
    if expected_start is not None and got is not None:
        tally.resumes_checked += 1
        if got[0] != expected_start:
            tally.wrong_step += 1
            tally.problems.append(f"{what} started at {got[0]}, latest was {expected_start}")


def kill_loop(corpus: Path, run: Path, steps: int, kills: int, rng: random.Random, tally: Tally) -> None:
    log = run.parent / "segment.log"
    proc = launch(corpus, run, steps, log, resume=False)
    # The first kill waits for a first checkpoint: before it there is nothing to resume from.
    if not wait_for(lambda: (run / "ckpt" / "latest").exists(), proc, 300):
        raise SystemExit(f"the first run made no checkpoint:\n{log.read_text()}")
    expected_start: int | None = None
    rate = 20.0  # steps per second, measured as the run goes (a shared machine is slower)
    while tally.kills < kills:
        started = time.monotonic()
        at_startup = expected_start is not None and rng.random() < STARTUP_KILL_SHARE
        if at_startup:
            time.sleep(rng.uniform(0, 2.5))  # ~ the start-up: imports, lock, loading the checkpoint
        else:
            wait_for(lambda: header(log) is not None, proc, 300)
            # Leave each remaining kill an equal share of the remaining steps, at the measured speed.
            t_train, done = time.monotonic(), latest_step(run)
            share = max(steps - done - 100, 0) / (kills - tally.kills) / rate
            time.sleep(rng.uniform(0, min(1.5, 2 * share)))
        if proc.poll() not in (None, 0):  # a resume that refuses to start would refuse every time: stop here
            tally.resume_failed += 1
            tally.problems.append(f"resume exited {proc.returncode}: {log.read_text()[-600:]}")
            return
        if proc.poll() is not None:
            raise SystemExit(f"the run ended before kill {tally.kills + 1} (exit {proc.returncode}, "
                             f"{time.monotonic() - started:.1f}s); raise --steps:\n{log.read_text()[-2000:]}")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if not at_startup and time.monotonic() - t_train > 0.2:
            rate = max(0.7 * rate + 0.3 * (latest_step(run) - done) / (time.monotonic() - t_train), 5.0)
        tally.kills += 1
        tally.kills_at_startup += at_startup
        check_resume_start(log, expected_start, tally, f"kill {tally.kills}: resume")
        tally.temps_after_kill = max(tally.temps_after_kill, len(stale_temps(run)))
        tally.locks_left += (run / LOCK).is_file() and bool((run / LOCK).read_text().strip())
        tally.locks_reclaimed += RECLAIMED in log.read_text(errors="replace")
        expected_start = check_latest(run, tally)
        proc = launch(corpus, run, steps, log, resume=True)
    # The last segment runs to the end.
    returncode = proc.wait()
    tally.locks_reclaimed += RECLAIMED in log.read_text(errors="replace")
    if returncode != 0:
        tally.resume_failed += 1
        tally.problems.append(f"final resume exited {proc.returncode}: {log.read_text()[-600:]}")
    check_resume_start(log, expected_start, tally, "final resume")


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(ckpt_io.find_checkpoint(run) / "model.safetensors"))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=1000, help="max_steps of the run")
    ap.add_argument("--keep", action="store_true", help="keep the work folder and print its path")
    args = ap.parse_args()
    if args.kills < 1:
        ap.error("--kills must be >= 1")
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill_checkpoints_"))
    corpus = work / "corpus.txt"
    corpus.write_text(DATA.read_text(encoding="utf-8")[:60_000] if DATA.exists() else
                      "".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(1500)))
    tally = Tally()
    t0 = time.perf_counter()
    try:
        killed, plain = work / "killed", work / "plain"
        kill_loop(corpus, killed, args.steps, args.kills, rng, tally)
        temps_left = len(stale_temps(killed))
        log = work / "plain.log"
        if launch(corpus, plain, args.steps, log, resume=False).wait() != 0:
            raise SystemExit(f"the uninterrupted run failed:\n{log.read_text()[-2000:]}")
        steps_a = ckpt_io.find_checkpoint(killed).name
        steps_b = ckpt_io.find_checkpoint(plain).name
        a, b = final_weights(killed), final_weights(plain)
        same_names = a.keys() == b.keys()
        exact = steps_a == steps_b and same_names and all(torch.equal(a[k], b[k]) for k in a)
        max_diff = max(((a[k].double() - b[k].double()).abs().max().item() for k in a), default=0.0) \
            if same_names else float("inf")
    finally:
        if args.keep:
            print(f"work folder: {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    rows = [
        ("SIGKILLs (at start-up / while training)", f"{tally.kills} ({tally.kills_at_startup} / "
                                                      f"{tally.kills - tally.kills_at_startup})"),
        ("checkpoints `latest` names that failed to load", tally.unloadable),
        ("checkpoints whose trainer step differs from their name", tally.step_mismatch),
        ("resumes checked / started at the wrong step", f"{tally.resumes_checked} / {tally.wrong_step}"),
        ("resumes that failed to run", tally.resume_failed),
        ("kills that left a stale lock / resumes that reclaimed one", f"{tally.locks_left} / {tally.locks_reclaimed}"),
        ("stale temp folders right after a kill (most)", tally.temps_after_kill),
        ("stale temp folders left at the end", temps_left),
        ("final checkpoint killed / uninterrupted", f"{steps_a} / {steps_b}"),
        ("resume ≡ uninterrupted (torch.equal, all tensors)",
         f"{'yes' if exact else 'NO'} (max |diff| {max_diff:.3g})" if steps_a == steps_b
         else "not compared: the killed run did not finish"),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"\nkill_checkpoints: seed {args.seed}, {args.steps} steps, {time.perf_counter() - t0:.0f}s")
    for name, value in rows:
        print(f"  {name:<{width}}  {value}")
    for p in tally.problems:
        print(f"  ! {p}")
    bad = tally.unloadable + tally.step_mismatch + tally.wrong_step + tally.resume_failed + temps_left
    return 1 if bad or not exact else 0


if __name__ == "__main__":
    sys.exit(main())
