"""The reward model measured: held-out pairwise accuracy per task family and kind of pair, with and
without the likelihood term, beside scorers that see only a response's length or format.

    python bench/rm.py [--steps N] [--skip-file]

1. Two SFT policies of `bench/align_base.py` (built once, reused): the 36% one the other alignment
   benchmarks start from, and the same base trained to its plateau (98%; 0% vs 93% on add).
2. From each, two reward models with the `rm-tiny` preset on the same embedded pairs (pref.kind=both:
   corrupted answers and the policy's own right/wrong samples, on 4,000 prompts the SFT run never
   saw, 10% of them held out), for the same steps: InstructGPT's last-token head alone
   (`--rm.likelihood=false`, at the lr 1e-3 it was tuned at), and the head plus the response's mean
   log-probability under the policy's own LM head (the default, lr 1e-4). Printed per family and
   kind: the RM's accuracy, the length-only and format-only baselines, and reward vs length. The
   issue's bars: >= 90% on corrupted pairs, >= 75% on on-policy pairs, >= 95% overall, the
   baselines <= 60%.
3. Both heads on ../shared/data/instruction-data-with-preference.json (1,100 Alpaca-style pairs, the
   6 with identical chosen and rejected dropped, 10% of the prompts held out), from the 36% policy.

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


def run(name: str, policy: Path, args: argparse.Namespace, likelihood: bool, **pref) -> tuple[dict, float]:
    from scratchlm.align.reward import train_reward_model
    from scratchlm.config import get_preset

    cfg = get_preset("rm-tiny")
    cfg.out_dir, cfg.pref.base, cfg.train.tensorboard = str(RUNS / name), str(policy), False
    cfg.rm.likelihood = likelihood
    flags = "" if likelihood else " --rm.likelihood=false --train.lr=1e-3"
    if not likelihood:
        cfg.train.lr, cfg.train.min_lr = 1e-3, 1e-4  # the head alone was tuned at 1e-3 (1e-4: 65.5% against 68.2%)
    if args.steps:
        cfg.train.max_steps = cfg.train.eval_interval = args.steps
        flags += f" --train.max_steps={args.steps}"
    for k, v in pref.items():
        setattr(cfg.pref, k, v)
    extra = " ".join(f"--pref.{k}={','.join(v) if isinstance(v, list) else v}" for k, v in pref.items())
    print(f"\n$ scratchlm rm train --base {policy} --preset rm-tiny {extra}{flags}", flush=True)
    t0 = time.perf_counter()
    result = train_reward_model(cfg, progress=False)
    return result.summary, time.perf_counter() - t0


def table(rows: list[tuple[str, str, dict, float]]) -> str:
    out = ["| policy | reward model | pairs | n | accuracy | length only | format only | length r | minutes |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for policy, head, s, seconds in rows:
        for group, a in s["accuracy"].items():
            out.append(f"| {policy} | {head} | {group} | {a['n']} | {a['rm']:.1%} | {a['length_only']:.1%} | "
                       f"{a['format_only']:.1%} | {s['length_correlation']:+.2f} | {seconds / 60:.1f} |")
    return "\n".join(out)


def checks(policy: str, acc: dict) -> str:
    bars = [("kind corrupted", 0.90), ("kind on_policy", 0.75), ("all", 0.95)]
    bars += [(g, 0.90) for g in acc if g.startswith("family ")]
    out = [f"{g} {acc[g]['rm']:.1%} (>= {t:.0%}: {'met' if acc[g]['rm'] >= t else 'NOT met'})"
           for g, t in bars if g in acc]
    out += [f"{b} only {acc['all'][f'{b}_only']:.1%} (<= 60%: {'met' if acc['all'][f'{b}_only'] <= 0.6 else 'NOT met'})"
            for b in ("length", "format")]
    return f"{policy}, with the likelihood term: " + "; ".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=0, help="override rm-tiny's train.max_steps")
    p.add_argument("--skip-file", action="store_true", help="only the embedded pairs")
    args = p.parse_args()
    from bench.align_base import plateau_policy, sft_policy

    policies = {"36% SFT": sft_policy(), "98% SFT": plateau_policy()}
    rows, verdicts = [], []
    for label, policy in policies.items():
        for likelihood in (False, True):
            head = "head + likelihood" if likelihood else "head only"
            name = f"rm-{policy.name}-{'likelihood' if likelihood else 'head'}"
            summary, seconds = run(name, policy, args, likelihood, kind="both")
            rows.append((label, head, summary, seconds))
            if likelihood:
                verdicts.append(checks(label, summary["accuracy"]))
    if not args.skip_file:
        if PREFERENCES.exists():
            for likelihood in (False, True):
                head = "head + likelihood" if likelihood else "head only"
                summary, seconds = run(f"rm-file-{'likelihood' if likelihood else 'head'}", policies["36% SFT"], args,
                                       likelihood, data=[str(PREFERENCES)], identical="drop")
                rows.append(("36% SFT, instruction-data-with-preference", head, summary, seconds))
        else:
            print(f"{PREFERENCES} is absent: the file run is skipped")
    print("\n" + table(rows))
    print("\n" + "\n".join(verdicts))


if __name__ == "__main__":
    main()
