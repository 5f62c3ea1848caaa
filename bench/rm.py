"""The reward model measured: held-out pairwise accuracy per task family and kind of pair, beside
scorers that see only a response's length or format, on the demo's SFT policy.

    python bench/rm.py [--steps N] [--lr LR] [--skip-file]

1. The SFT policy of `bench/align_base.py` (built once, reused).
2. A reward model trained from it with the `rm-tiny` preset on the embedded pairs (pref.kind=both:
   corrupted answers and the policy's own right/wrong samples, on 4,000 prompts the SFT run never
   saw, 10% of them held out). Printed per family and kind: the RM's accuracy, the length-only and
   format-only baselines, and reward vs length. The issue's bars: >= 90% on corrupted pairs, >= 75%
   on on-policy pairs, >= 95% overall, the baselines <= 60%.
3. The same recipe on ../shared/data/instruction-data-with-preference.json (1,100 Alpaca-style pairs,
   the 6 with identical chosen and rejected dropped, 10% of the prompts held out), for 500 steps:
   with 1,000 training pairs, 1,000 steps overfit (train loss 0.006, held-out accuracy 73% against
   82% at 500).

Each run's folder (bench/.runs/rm-*) keeps rm_checks.png and eval/rm_summary.md.
"""

from __future__ import annotations

import os
import sys

# bench/tokenizers.py would shadow HF's `tokenizers` package: take this folder off the import path,
# and put the repository root on it for `bench.align_base`.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import argparse
import time
from pathlib import Path

PREFERENCES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "instruction-data-with-preference.json"
RUNS = Path(__file__).resolve().parent / ".runs"


def run(name: str, policy: Path, args: argparse.Namespace, steps: int = 0, **pref) -> tuple[dict, float]:
    from scratchlm.align.reward import train_reward_model
    from scratchlm.config import get_preset

    cfg = get_preset("rm-tiny")
    cfg.out_dir, cfg.pref.base, cfg.train.tensorboard = str(RUNS / name), str(policy), False
    steps = args.steps or steps
    if steps:
        cfg.train.max_steps = cfg.train.eval_interval = steps
    if args.lr:
        cfg.train.lr, cfg.train.min_lr = args.lr, args.lr / 10
    for k, v in pref.items():
        setattr(cfg.pref, k, v)
    extra = " ".join(f"--pref.{k}={','.join(v) if isinstance(v, list) else v}" for k, v in pref.items())
    print(f"\n$ scratchlm rm train --base {policy} --preset rm-tiny {extra}".rstrip()
          + (f" --train.max_steps={cfg.train.max_steps}" if steps else "")
          + (f" --train.lr={cfg.train.lr:g}" if args.lr else ""), flush=True)
    t0 = time.perf_counter()
    result = train_reward_model(cfg, progress=False)
    return result.summary, time.perf_counter() - t0


def table(rows: list[tuple[str, dict, float]]) -> str:
    out = ["| data | pairs | n | reward model | length only | format only | length r | minutes |",
           "|---|---|---:|---:|---:|---:|---:|---:|"]
    for data, s, seconds in rows:
        for group, a in s["accuracy"].items():
            out.append(f"| {data} | {group} | {a['n']} | {a['rm']:.1%} | {a['length_only']:.1%} | "
                       f"{a['format_only']:.1%} | {s['length_correlation']:+.2f} | {seconds / 60:.1f} |")
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=0, help="override rm-tiny's train.max_steps")
    p.add_argument("--lr", type=float, default=0.0, help="override rm-tiny's train.lr (min_lr = lr / 10)")
    p.add_argument("--skip-file", action="store_true", help="only the embedded pairs")
    args = p.parse_args()
    from bench.align_base import sft_policy

    policy = sft_policy()
    rows = []
    summary, seconds = run("rm-embedded", policy, args, kind="both")
    rows.append(("embedded", summary, seconds))
    acc = summary["accuracy"]
    bars = [("kind corrupted", 0.90), ("kind on_policy", 0.75), ("all", 0.95)]
    checks = [f"{g} {acc[g]['rm']:.1%} (target >= {t:.0%}: {'met' if acc[g]['rm'] >= t else 'NOT met'})"
              for g, t in bars if g in acc]
    checks += [f"{b} only {acc['all'][f'{b}_only']:.1%} (target <= 60%: "
               f"{'met' if acc['all'][f'{b}_only'] <= 0.6 else 'NOT met'})" for b in ("length", "format")]
    if not args.skip_file:
        if PREFERENCES.exists():
            summary, seconds = run("rm-file", policy, args, steps=500, data=[str(PREFERENCES)], identical="drop")
            rows.append(("instruction-data-with-preference", summary, seconds))
        else:
            print(f"{PREFERENCES} is absent: the file run is skipped")
    print("\n" + table(rows))
    print("\n" + "; ".join(checks))


if __name__ == "__main__":
    main()
