"""The SFT policy the alignment benchmarks start from, built once and reused.

    python bench/align_base.py [--out bench/.runs/align-base] [--quick]

A Llama-family base (the `llama-tiny` preset at block 256) pretrained on the embedded corpus for
600 steps, then fully fine-tuned on the embedded verifiable tasks with the `sft-tiny` preset (300
steps, batch 8): the model of `bench/sft.py`'s "full" row, about 36% held-out exact match. The
folder is reused when it already holds both runs (delete it to rebuild); `sft_policy()` returns the
SFT run folder, `sft_config()` the SFT run's config (its seed and task count say which prompts it
trained on: the alignment benchmarks hold out prompts disjoint from them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from scratchlm.checkpoint import load_config_and_tokenizer
from scratchlm.config import Config, get_preset

DEFAULT = Path(__file__).resolve().parent / ".runs" / "align-base"


def sft_policy(out: Path = DEFAULT, quick: bool = False) -> Path:
    """The SFT run folder under `out`, built first if missing (pretrain, then SFT)."""
    from scratchlm.sft.train import sft
    from scratchlm.train.pretrain import pretrain

    base, policy = out / "pretrain", out / "sft"
    steps, sft_steps = (60, 30) if quick else (600, 300)
    if not (base / "ckpt" / "latest").exists():
        cfg = get_preset("llama-tiny")
        cfg.model.block_size, cfg.out_dir, cfg.train.tensorboard = 256, str(base), False
        cfg.train.max_steps, cfg.train.eval_interval, cfg.train.batch_size = steps, steps, 8
        pretrain(cfg, progress=False)
    if not (policy / "ckpt" / "latest").exists():
        cfg = get_preset("sft-tiny")
        cfg.out_dir, cfg.sft.base, cfg.train.tensorboard = str(policy), str(base), False
        cfg.train.max_steps, cfg.train.eval_interval, cfg.train.batch_size = sft_steps, sft_steps, 8
        cfg.sft.n_tasks = 3000  # the numbers of bench/rm.py, dpo.py and cai.py were measured on this policy
        sft(cfg, progress=False)
    return policy


def plateau_policy(out: Path = DEFAULT) -> Path:
    """The same base fine-tuned to its plateau: 2,000 SFT steps on 20,000 tasks (98% held-out exact
    match: add 93%, the other families >= 99.5%; about 7 minutes on 2 cores), built once under `out`.
    A reward model can only judge what its trunk knows: on `add` the 36% policy gets 0% right."""
    from scratchlm.sft.train import sft

    base, policy = sft_policy(out).parent / "pretrain", out / "sft-plateau"
    if not (policy / "ckpt" / "latest").exists():
        cfg = get_preset("sft-tiny")
        cfg.out_dir, cfg.sft.base, cfg.train.tensorboard = str(policy), str(base), False
        cfg.train.max_steps, cfg.train.eval_interval, cfg.train.batch_size = 2000, 2000, 8
        cfg.sft.n_tasks = 20000
        sft(cfg, progress=False)
    return policy


def sft_config(policy: Path) -> Config:
    from scratchlm.checkpoint import find_checkpoint

    return load_config_and_tokenizer(find_checkpoint(policy))[0]


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT)
    p.add_argument("--quick", action="store_true", help="60 + 30 steps: a smoke test, not a usable policy")
    args = p.parse_args()
    print(sft_policy(args.out, args.quick))
