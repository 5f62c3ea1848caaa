"""The grid of an IsoFLOP study: what every run shares, each point's model and length, and one run.

A point is (compute budget C, width w): a GPT (or Llama) of `layers` blocks and `heads` heads at
width w, trained for D = C / 6N tokens, N its non-embedding parameters (Kaplan et al. 2020's count:
every weight but the token and position tables and an untied output head). D becomes whole steps
of batch_size x block_size tokens, so a point trains `steps x tokens_per_step` tokens, within half
a step of D. Every run takes the same recipe: AdamW at `lr`, a warmup of a tenth of the run (at
most 100 steps), a cosine that reaches lr/10 at the run's last step (so every point ends fully
decayed, as Chinchilla's runs did; a schedule cut short would favour the long runs), one
validation at the end over the same `eval_iters` batches of the held-out split for every point,
fp32 on a CPU and bf16 on a GPU. The learning rate is not tuned per width: a simplification that
the small widths and few budgets here make tolerable, and the main thing a careful study would add.

Why non-embedding N for the budget: at these sizes the token table (vocab x width) is a large share
of the parameters, and its lookup costs no matmul FLOPs; the tied table does cost the output head's
matmul, which the model's own `flops_per_token()` counts, so each point also records that count
and its total parameters, and the fits are made with both counts (stage.py).

Every budget trains every width, except where a point would be too short to mean anything (fewer
than 20 steps: the widest widths at the smallest budgets) or would repeat the training split more
than `max_epochs` times (the narrowest widths at the largest budgets, which are also the grid's
dearest points); those are left out and listed, and a budget left with fewer than 3 widths is
refused. The surviving widths thus slide with the budget, as Chinchilla's per-budget model ranges do.

A point is its own run folder (`pretrain`'s), with `result.json` written atomically when the run
has finished: a point with a result is never trained again; one without is resumed from its
latest checkpoint, or started afresh when it has none.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm.config import Config, get_preset, switch_arch
from scratchlm.errors import UserError
from scratchlm.io import write_json
from scratchlm.model import build_model, padded_vocab
from scratchlm.rundir import reopen_run
from scratchlm.scaling.fit import FLOPS_PER_PARAM_TOKEN
from scratchlm.train.device import pick_device
from scratchlm.train.pretrain import pretrain

RESULT = "result.json"
MIN_STEPS = 20  # fewer: the warmup and the decay are a handful of steps, and the loss says little


@dataclass(frozen=True)
class GridSettings:
    """What every point of a grid shares. A resumed grid keeps them (its budgets and widths may grow), all but
    `device`, `threads` and `max_epochs`, which change how or whether a point runs, not what it trains."""

    arch: str = "gpt"
    layers: int = 4
    heads: int = 4
    block_size: int = 64
    batch_size: int = 16
    # the BPE trained once on the corpus for the whole grid; 512, not the demo's 2,048: at these widths a
    # 2,048-row table outweighs the blocks, and its output matmul costs more than they do
    vocab_size: int = 512
    tokenizer_max_chars: int = 0  # characters of the corpus the tokenizer is trained on (0 = all)
    lr: float = 2e-3
    eval_iters: int = 40  # validation batches of batch_size x block_size tokens, the same for every point
    seed: int = 1337
    device: str = "auto"
    threads: int = 1  # torch threads per run (0 = auto); 2 were slower than 1 at these widths here
    # a point passing over the training split more often is left out: repeated tokens are worth less
    # (Muennighoff et al. 2023), and the small widths at the large budgets are the grid's dearest points
    max_epochs: float = 8.0

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size


# The defaults: the demo's model shape (4 layers, 4 heads, block 64) at 7 widths (N 7.6k-448k) and 4
# budgets: 24 points (4 left out, over 8 epochs), about 25 minutes at one thread on this machine's CPU.
# Measured here: the optimum sits near width 14 at 1e11 and width 24 at 3e11, and trains 60-160 tokens
# per parameter; larger budgets than 3e12 would need more epochs of this corpus than their optimum is worth.
DEFAULT_BUDGETS = (1e11, 3e11, 1e12, 3e12)
DEFAULT_WIDTHS = (12, 16, 24, 32, 48, 64, 96)
DEFAULT_SETTINGS = GridSettings()
# --quick, for tests: 2-layer models of 16-32 dims, a few hundred steps each.
QUICK_BUDGETS = (1e9, 2e9, 4e9)
QUICK_WIDTHS = (16, 24, 32)
QUICK_SETTINGS = GridSettings(layers=2, heads=2, block_size=32, batch_size=8, vocab_size=512,
                              tokenizer_max_chars=200_000, eval_iters=4)


def budget_name(c: float) -> str:
    """1e12 -> '1e12', 3e12 -> '3e12', 2.5e9 -> '2.5e9'."""
    mantissa, exponent = f"{c:.6e}".split("e")
    return f"{float(mantissa):g}e{int(exponent)}"


def base_config(s: GridSettings) -> Config:
    """The demo's `tiny` preset with the grid's shared settings (the width is each point's)."""
    cfg = get_preset("tiny")
    cfg.name = "scaling"
    cfg.seed = cfg.data.seed = s.seed
    cfg.tokenizer.vocab_size, cfg.tokenizer.max_chars = s.vocab_size, s.tokenizer_max_chars
    if s.arch != cfg.model.arch:
        cfg.model = switch_arch(cfg.model, s.arch)
    m = cfg.model
    m.n_layer, m.n_head, m.block_size, m.dropout = s.layers, s.heads, s.block_size, 0.0
    t = cfg.train
    t.batch_size, t.grad_accum, t.lr, t.min_lr, t.schedule = s.batch_size, 1, s.lr, s.lr / 10, "cosine"
    t.eval_iters, t.device, t.threads, t.keep_last, t.tensorboard = s.eval_iters, s.device, s.threads, 0, False
    t.precision = "bf16" if pick_device(s.device, flag="--device").type == "cuda" else "fp32"
    return cfg


@dataclass(frozen=True)
class Point:
    """One run of the grid, planned: its model's sizes and its length."""

    budget: float
    width: int
    params_total: int  # every parameter, a tied table once
    params_non_embedding: int  # without the token and position tables and an untied head
    flops_per_token: float  # the model's own count: 6 x weights that multiply + attention
    steps: int
    tokens: int  # steps x tokens per step

    @property
    def name(self) -> str:
        return f"C{budget_name(self.budget)}_w{self.width}"


def model_sizes(cfg: Config) -> tuple[int, int, float]:
    """(total, non-embedding parameters, training FLOPs per token) of `cfg.model`, built on the meta device."""
    with torch.device("meta"):
        model = build_model(cfg.model)
    total = sum(p.numel() for p in model.parameters())
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
    head = model.unembedding
    untied = 0 if head is None or head.weight is model.embedding.weight else head.weight.numel()
    return total, total - tables - untied, float(model.flops_per_token())


def check_grid(budgets: list[float], widths: list[int], s: GridSettings) -> None:
    """Refuse what cannot make a grid, before any data is read."""
    if not budgets or any(not (math.isfinite(c) and c > 0) for c in budgets):
        raise UserError(f"--budget {','.join(map(str, budgets))}: budgets must be positive FLOP counts",
                        fix="e.g. --budget 1e12,3e12,1e13")
    if len(set(budgets)) != len(budgets) or len(set(widths)) != len(widths):
        raise UserError("--budget and --widths must not repeat a value")
    for w in widths:
        if w < 1:
            raise UserError(f"--widths: {w} is not a width", fix="use positive whole numbers")
        if w % s.heads:
            raise UserError(f"--widths: {w} is not a multiple of the head count {s.heads}",
                            fix=f"use widths divisible by {s.heads}, or change --heads")
        if s.arch == "llama" and (w // s.heads) % 2:
            raise UserError(f"--widths: {w} gives heads of {w // s.heads} dims; RoPE needs an even head size",
                            fix=f"use multiples of {2 * s.heads}")
    if len(widths) < 3:
        raise UserError(f"--widths: {len(widths)} given; a parabola per budget needs at least 3 sizes")


def plan(budgets: list[float], widths: list[int], s: GridSettings, tokenizer_vocab: int,
         train_tokens: int | None = None) -> tuple[list[Point], list[str]]:
    """The grid's points, smallest budget first, and the (budget, width) pairs left out, each with why:
    fewer than MIN_STEPS steps, or (given the training split's size) more than `max_epochs` epochs.
    A budget left with fewer than 3 widths is refused: its parabola needs 3."""
    points, left_out = [], []
    for c in sorted(budgets):
        kept, why_not = [], []
        for w in sorted(widths):
            cfg = base_config(s)
            cfg.model.n_embd = w
            cfg.model.vocab_size = padded_vocab(cfg.model, tokenizer_vocab)
            total, non_emb, fpt = model_sizes(cfg)
            steps = round(c / (FLOPS_PER_PARAM_TOKEN * non_emb) / s.tokens_per_step)
            tokens = steps * s.tokens_per_step
            if steps < MIN_STEPS:
                why_not.append(f"width {w}: {steps} steps, fewer than {MIN_STEPS}")
            elif train_tokens and tokens / train_tokens > s.max_epochs:
                why_not.append(f"width {w}: {tokens / train_tokens:.1f} epochs, over the {s.max_epochs:g} allowed")
            else:
                kept.append(Point(c, w, total, non_emb, fpt, steps, tokens))
        if len(kept) < 3:
            raise UserError(f"budget {budget_name(c)} keeps {len(kept)} of the widths ({'; '.join(why_not)}); "
                            "its parabola needs 3", fix="add widths near the budget's optimum, change the budget, "
                                                       "or allow more --max-epochs")
        points += kept
        left_out += [f"C {budget_name(c)} {why}" for why in why_not]
    return points, left_out


def point_config(p: Point, s: GridSettings, run_dir: Path) -> Config:
    """The pretraining config of one point: the shared recipe at its width and length."""
    cfg = base_config(s)
    cfg.model.n_embd = p.width
    cfg.out_dir = str(run_dir)
    t = cfg.train
    t.max_steps, t.warmup_steps = p.steps, min(100, max(1, p.steps // 10))
    t.eval_interval = p.steps  # one validation, at the end
    t.ckpt_interval = 500  # and at the end, and on Ctrl-C / SIGTERM
    return cfg


def final_validation(run_dir: Path, steps: int) -> tuple[float, float]:
    """(loss, bits per byte) of the validation logged at the last step: a run resumed from its final
    checkpoint (killed after saving it, before its result was written) does not evaluate again."""
    for line in reversed((run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()):
        record = json.loads(line)
        if record.get("step") == steps and "val_loss" in record:
            return float(record["val_loss"]), float(record.get("val_bpb", math.nan))
    raise UserError(f"{run_dir}: its final checkpoint has no validation logged", fix="delete the folder and --resume")


def run_point(p: Point, s: GridSettings, run_dir: Path, data_dir: Path, train_tokens: int) -> dict[str, Any]:
    """Train one point (resuming its checkpoint if it has one) and record its result atomically.

    The run's own output (its header, the final validation line) goes to `RUN/train.log`, so the
    grid prints one line per point."""
    resume = reopen_run(run_dir)
    cfg = point_config(p, s, run_dir)
    start = time.perf_counter()
    with open(run_dir / "train.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        r = pretrain(cfg, data_dir, resume=resume, progress=False)
    val_loss, val_bpb = (r.val_loss, r.val_bpb) if math.isfinite(r.val_loss) else final_validation(run_dir, p.steps)
    record = {
        **asdict(p), "name": p.name, "layers": s.layers, "heads": s.heads,
        "epochs": p.tokens / train_tokens,
        "val_loss": val_loss, "val_bpb": val_bpb, "train_loss": r.train_loss,
        "compute_non_embedding": FLOPS_PER_PARAM_TOKEN * p.params_non_embedding * p.tokens,
        "compute_total": FLOPS_PER_PARAM_TOKEN * p.params_total * p.tokens,
        "compute_model": p.flops_per_token * p.tokens,
        "seconds": time.perf_counter() - start, "tokens_per_s": r.tokens_per_s, "resumed": resume,
    }
    write_json(run_dir / RESULT, record)
    return record
