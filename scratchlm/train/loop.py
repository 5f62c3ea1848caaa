"""The training loop every stage shares, written by hand (no Trainer, Lightning or accelerate).

`train_model`: a stage brings its model, its data as `Batches` (a resumable train loader, fresh
validation loaders) and the config; the loop does the rest. Packed batches (x, y, doc_ids) train
with attention kept inside each document (`DocumentMask`).

One step = `grad_accum` micro-batches, each forward + backward with its mean loss weighted by
its share of the step's valid (unmasked) targets, so the summed gradient is that of the mean over
the whole step's tokens, as one big batch would give (`forward_backward`), then the global
gradient norm is clipped and AdamW steps with the schedule's learning rate. Around that:
- device, threads and precision come from `device.py`: `auto` picks bf16 autocast where it is
  faster (CUDA; on a CPU, measured at the model's own shapes) and fp32 elsewhere, and the header
  says why, and why this many threads;
  fp16 (CUDA) uses a gradient scaler; the weights and the optimizer stay fp32 throughout;
- validation every `eval_interval` steps: mean loss over `eval_iters` fixed batches, and bits per
  byte (the loss in bits divided by the UTF-8 bytes the predicted tokens stand for, comparable
  across tokenizers). Without validation data (`Batches.make_val=None`) validation is skipped:
  no val loss (NaN in the result), no `ckpt/best`;
- logging: a progress bar (loss, lr, tokens/s, MFU, ETA), and the instruments (`instruments.py`:
  `metrics.jsonl`, TensorBoard when installed, wandb when asked, `loss.png` at the end);
- checkpoints (`scratchlm.checkpoint`) every `ckpt_interval` steps, at the end, and on Ctrl-C or
  SIGTERM; resuming (`resume_from`) continues exactly as if never stopped (the data loader
  position, RNG states, optimizer moments, fp16's loss scale and the step all come back);
- a NaN or inf loss stops the run naming the step (or skips the batch, `on_nan=skip`: no update,
  but the step counts, and its evaluation and checkpoint still happen);
- `profile_steps=N` traces N steps with torch.profiler into `RUN/profile/`.
"""

from __future__ import annotations

import contextlib
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from scratchlm import checkpoint as ckpt_io
from scratchlm.config import Config, TrainConfig
from scratchlm.data.loader import BatchLoader
from scratchlm.errors import Interrupted, UserError
from scratchlm.model.base import LanguageModel
from scratchlm.model.layers import DocumentMask
from scratchlm.model.moe import MoELayer
from scratchlm.rundir import trim_metrics
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.device import (
    autocast_ctx,
    linear_shapes,
    observe_mfu,
    peak_flops,
    pick_precision,
    pick_threads,
)
from scratchlm.train.distributed import (
    Parallel,
    Place,
    all_max,
    full_grad_norm,
    full_optimizer_state,
    full_weights,
    join,
    parallel_kind,
    parallelize,
    prepare_blocks,
)
from scratchlm.train.instruments import RunLog, finish_profile, plot_losses, start_profiler
from scratchlm.train.memory import (
    fit_micro_batch,
    is_oom,
    memory_budget,
    one_sequence_too_big,
    read_peak,
    rechunk,
    reset_peak,
    smaller_micro_batch,
)
from scratchlm.train.objective import Objective, count_examples, network_of
from scratchlm.train.optim import make_optimizer
from scratchlm.train.schedule import lr_at


def token_bytes(tok: Tokenizer, vocab: int) -> torch.Tensor:
    """(V,) UTF-8 bytes each id adds to the text; 0 for specials and padding (for bits per byte).

    Byte-level tokenizers count their raw bytes (a token may be part of a character, which
    decodes alone to U+FFFD). Every other kind counts what the token adds when decoded after an
    ordinary token, so the space a word-initial WordPiece or Unigram piece brings is counted
    and a continuation (`##ing`) adds only its letters. Ids are never used as list indices,
    since where the specials sit differs between kinds.
    """
    out = torch.zeros(vocab, dtype=torch.float32)
    specials = set(tok.special_tokens.values())
    ordinary = [i for i in range(tok.vocab_size) if i not in specials]
    raw = getattr(tok, "decode_bytes", None)  # byte-level BPE
    anchor = ordinary[0]
    anchor_len = len(tok.decode([anchor]).encode("utf-8"))
    for i in ordinary:
        if raw is not None:
            out[i] = len(raw([i]))
        elif tok.kind == "byte":
            out[i] = 1
        else:
            out[i] = len(tok.decode([anchor, i]).encode("utf-8")) - anchor_len
    return out


def block_grad_norms(model: LanguageModel) -> dict[str, float]:
    """{"grad_norm/layer_i": norm} over the parameters of each transformer block (`model.blocks`) that
    have a gradient, read before the optimizer zeroes the gradients (after clipping)."""
    out: dict[str, float] = {}
    for i, block in enumerate(model.blocks):
        grads = [p.grad for p in block.parameters() if p.grad is not None]
        if grads:
            out[f"grad_norm/layer_{i}"] = sum(g.float().pow(2).sum().item() for g in grads) ** 0.5
    return out


def forward_backward(model: LanguageModel, micro_batches: list[tuple[torch.Tensor, ...]],
                     amp: contextlib.AbstractContextManager, scaler: torch.amp.GradScaler | None,
                     counts: list[int] | None = None, *, net: nn.Module | None = None,
                     n_valid: int | None = None, world_size: int = 1,
                     no_sync: Callable[[bool], contextlib.AbstractContextManager] | None = None) -> torch.Tensor:
    """Accumulate the gradient of the step's loss over `micro_batches`; return that loss (detached).

    The step's loss is what one batch of all its micro-batches would give: the mean cross-entropy
    over the step's valid targets (those not -1). Each micro-batch's mean is weighted by its share
    of them, since masked batches (SFT, classification) hold different numbers. A model's auxiliary
    losses (`aux_loss()`, e.g. the MoE routers') belong to each micro-batch's routing and are
    averaged over the micro-batches. `counts`: what each micro-batch's mean is over, when not its
    valid targets (an `Objective`'s pairs; `count_examples`).

    Data parallel (`distributed.py`): `model` is the DDP/FSDP module and `net` the model with the
    hooks; `n_valid` is the count over all ranks' micro-batches (`world_size` x these), each share is
    of that, and the backward is scaled by `world_size` since the ranks' gradients are averaged. The
    returned loss is this rank's part of the step's loss (the ranks' parts sum to it).
    `no_sync(last)` wraps each micro-batch (DDP reduces on the last only).
    """
    net = net if net is not None else model
    counts = counts or [int(mb[1].ne(-1).sum()) for mb in micro_batches]
    n_valid = sum(counts) if n_valid is None else n_valid
    n_micro = len(micro_batches) * world_size
    total = torch.zeros((), dtype=torch.float64)
    for i, ((x, y, *doc), n) in enumerate(zip(micro_batches, counts)):
        with no_sync(i == len(micro_batches) - 1) if no_sync else contextlib.nullcontext():
            with amp:
                _, loss = model(x, y, doc_mask=DocumentMask(doc[0]) if doc else None)
            aux = net.aux_loss()
            share = n / n_valid if n_valid else float("nan")  # all targets masked: a NaN loss, as one batch gives
            # loss = cross-entropy + aux; without targets the cross-entropy is NaN and weighs nothing
            part = aux / n_micro if n == 0 and n_valid else loss * share + aux * (1 / n_micro - share)
            if torch.is_tensor(part):
                scaled = part * world_size if world_size > 1 else part
                (scaler.scale(scaled) if scaler else scaled).backward()
                total += part.detach().double().cpu()
    return total


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, iters: int, amp, tbytes: torch.Tensor) -> tuple[float, float]:
    """(mean loss in nats per token, bits per byte) over `iters` batches; an `Objective`'s mean loss per
    example and NaN."""
    model.eval()
    if isinstance(model, Objective):
        total, n = 0.0, 0
        for _ in range(iters):
            x, y = loader.next_batch()[:2]
            with amp:
                _, loss = model(x, y)
            total, n = total + loss.item() * model.count(y), n + model.count(y)
        model.train()
        return total / max(n, 1), math.nan
    nats, n_tokens, n_bytes = 0.0, 0, 0.0
    for _ in range(iters):
        x, y, *doc = loader.next_batch()
        with amp:
            logits, _ = model(x, doc_mask=DocumentMask(doc[0]) if doc else None)
        losses = nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none",
                                             ignore_index=-1)  # masked targets (-1) add 0
        counted = y.flatten() >= 0
        nats += losses.sum().item()
        n_tokens += int(counted.sum())
        n_bytes += tbytes[y.flatten()[counted].cpu()].sum().item()
    model.train()
    return nats / max(n_tokens, 1), nats / math.log(2) / max(n_bytes, 1.0)


@dataclass
class RunResult:
    run_dir: Path
    steps: int
    train_loss: float
    val_loss: float
    val_bpb: float
    seconds: float
    tokens_per_s: float
    mfu: float | None
    history: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Batches:
    """What the loop needs from a stage's data: a resumable training loader and fresh, fixed-order
    validation loaders (`make_val=None`: there is no validation data, and the loop skips
    validation: no val loss, no best checkpoint). A loader's `next_batch()` returns (x, y) or
    (x, y, doc_ids) for packed sequences; `state_dict()`/`load_state_dict()` make it resumable."""

    train: Any
    make_val: Callable[[], Any] | None


class _Stop:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second Ctrl-C kills).

    The loop then saves a checkpoint and raises `Interrupted`, so the stage stops there (an SFT
    run skips its evaluation) and the CLI exits with 143 or 130 rather than a success status.
    """

    def __init__(self) -> None:
        self.requested: str | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> _Stop:
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)


class _OutOfMemory(Exception):
    """A step ran out of memory where `train.micro_batch=auto` may halve the micro-batch and redo it."""


def _set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)  # e.g. LoRA's adapters, see optim.param_groups


def _step_loss(par: Parallel, micro: list[tuple[torch.Tensor, ...]], amp: contextlib.AbstractContextManager,
               scaler: torch.amp.GradScaler | None, t: TrainConfig, block_size: int, counts: list[int],
               backoff: bool = False) -> float:
    """The step's forward and backward over all ranks (`forward_backward`); the loss, summed over the
    ranks. Running out of memory names the settings, or with `backoff` raises `_OutOfMemory`."""
    n_valid = int(par.all_sum([float(sum(counts))])[0])
    try:
        loss = forward_backward(par.module, micro, amp, scaler, counts, net=par.model, n_valid=n_valid,
                                world_size=par.world_size, no_sync=par.no_sync)
    except RuntimeError as e:
        if is_oom(e) and backoff:
            raise _OutOfMemory from None
        if is_oom(e):
            raise UserError(
                f"a micro-batch of {micro[0][0].size(0)}x{block_size} tokens does not fit in memory",
                fix="lower --train.batch_size and raise --train.grad_accum to keep tokens per step "
                    "(or --train.micro_batch=auto)",
            ) from None
        raise
    return par.all_sum([loss.item()])[0]


def _optimizer_step(model: LanguageModel, optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler | None,
                    grad_clip: float) -> torch.Tensor:
    """Clip the global gradient norm (after unscaling fp16's gradients), step; returns the norm before clipping."""
    if scaler:
        scaler.unscale_(optimizer)
    norm = full_grad_norm(nn.utils.clip_grad_norm_(model.parameters(), grad_clip if grad_clip > 0 else math.inf))
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    model.after_optimizer_step()  # e.g. MoE routers' balancing bias
    return norm


def _save(cfg: Config, step: int, par: Parallel, optimizer: torch.optim.Optimizer, tok: Tokenizer,
          trainer: dict[str, Any], train_loader: Any, scaler: torch.amp.GradScaler | None,
          val_loss: float | None) -> None:
    """A checkpoint of this step (`val_loss`: this step's evaluation, None without one); the best so
    far also becomes `ckpt/best`. `trainer` (best val loss, loader position) is updated in place.
    Every rank calls this; under FSDP they gather the whole weights and moments together, and rank 0
    writes the same single-device checkpoint one process would."""
    model = par.model
    trainer["loader"] = train_loader.state_dict()
    is_best = val_loss is not None and (trainer["best_val_loss"] is None or val_loss < trainer["best_val_loss"])
    if is_best:
        trainer["best_val_loss"] = val_loss
    weights, opt_state = network_of(model), optimizer
    if par.kind == "fsdp":
        weights, opt_state = full_weights(network_of(model)), full_optimizer_state(optimizer)
    if par.place.main:
        path = ckpt_io.save_checkpoint(Path(cfg.out_dir), step, weights, opt_state, cfg, tok, trainer,
                                       keep_last=cfg.train.keep_last, scaler=scaler,
                                       extra=_extra_tensors(model, train_loader))
        if is_best:
            ckpt_io.mark_best(path)
    par.barrier()  # no rank reads or moves on before the checkpoint is whole


# A stage's objective or loader may hold tensors it needs to resume beyond the network's weights (an RL
# run's value head, the rest of a rollout): it offers them as `extra_tensors()` and takes them back
# in `load_extra_tensors(d)`; they travel in the checkpoint's extra.safetensors, keys prefixed by owner.
_EXTRA_OWNERS = ("objective", "loader")


def _extra_tensors(model: nn.Module, loader: Any) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for owner, obj in zip(_EXTRA_OWNERS, (model, loader)):
        if hasattr(obj, "extra_tensors"):
            out.update({f"{owner}.{k}": v for k, v in obj.extra_tensors().items()})
    return out


def _load_extra_tensors(model: nn.Module, loader: Any, tensors: dict[str, torch.Tensor]) -> None:
    for owner, obj in zip(_EXTRA_OWNERS, (model, loader)):
        if hasattr(obj, "load_extra_tensors"):
            prefix = owner + "."
            obj.load_extra_tensors({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})


def _auto_micro_batch(model: nn.Module, t: TrainConfig, rows: int, loader: Any, device: torch.device,
                      amp: contextlib.AbstractContextManager) -> tuple[int, int, str]:
    """(micro-batch rows, budget bytes, why) for `train.micro_batch=auto` (`memory.fit_micro_batch`):
    trial forward and backward passes on the loader's first batch (its rows repeated to the size
    tried), on the whole model before data parallelism (the ranks agree on each peak, so they pick
    the same size). The trials leave no gradient, and the loader and the random number generators
    where they were."""
    if isinstance(model, Objective):
        print(f"note: train.micro_batch=auto sizes language models' batches; this objective keeps "
              f"train.batch_size={t.batch_size}", flush=True)
        return t.batch_size, 0, ""
    budget = memory_budget(device, t.memory_budget_gb)
    moments = 2 * sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)  # AdamW's

    position = loader.state_dict()
    sample = loader.next_batch()
    loader.load_state_dict(position)

    def trial(m: int) -> int:
        """The peak of m rows' forward and backward, the largest over the ranks. Every rank reaches
        the all_max: one that runs out of memory offers +inf, and then every rank raises out of memory."""
        cpu_rng = torch.random.get_rng_state()
        cuda_rng = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        x, y, *doc = (torch.cat([part] * -(-m // part.size(0)))[:m] for part in sample)
        reset_peak(device)
        try:
            with amp:
                _, loss = model(x, y, doc_mask=DocumentMask(doc[0]) if doc else None)
            (loss + model.aux_loss()).backward()
            peak = float(read_peak(device))
        except RuntimeError as e:
            if not is_oom(e):
                raise
            peak = math.inf
        finally:
            model.zero_grad(set_to_none=True)
            torch.random.set_rng_state(cpu_rng)
            if cuda_rng is not None:
                torch.cuda.set_rng_state(cuda_rng, device)
        peak = all_max(peak)
        if math.isinf(peak):
            raise torch.OutOfMemoryError(f"train.micro_batch=auto: {m} rows ran out of memory (on some rank)")
        return int(peak)

    loads = _routing_loads(model)
    try:
        m, why = fit_micro_batch(trial, rows, budget, extra=moments)
    finally:
        _put_back(loads)  # the trials' routing counts toward no bias update
    return m, budget, why


def _routing_loads(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Each MoE layer's `step_load` (its router's assignments since the last balancing-bias update)
    with a copy, for `_put_back`: micro-batch trials and a step's attempt that ran out of memory must
    not count toward the update."""
    return [(layer.step_load, layer.step_load.clone()) for layer in model.modules() if isinstance(layer, MoELayer)]


def _put_back(loads: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    for buffer, saved in loads:
        buffer.copy_(saved)


def _halve(micro_rows: int, rows: int, step: int, what: str, bar: tqdm) -> int:
    smaller = smaller_micro_batch(micro_rows, rows)
    if smaller is None:
        raise one_sequence_too_big(f"step {step + 1}: one sequence per micro-batch {what}")
    bar.write(f"step {step + 1}: a micro-batch of {micro_rows} rows {what}; going on with {smaller}")
    return smaller


def _accum_per_rank(t: TrainConfig, here: Place, kind: str) -> int:
    """Micro-batches each rank runs per step: `train.grad_accum` counts them over all ranks, so the
    step's batch (batch_size x grad_accum sequences) does not depend on the world size."""
    world = here.world_size if kind != "none" else 1
    if t.grad_accum % world:
        raise UserError(f"train.grad_accum={t.grad_accum} (micro-batches per step over all ranks) is not divisible "
                        f"by the {world} processes", fix=f"use a multiple of {world}, e.g. "
                        f"--train.grad_accum={world * max(1, round(t.grad_accum / world))}")
    return t.grad_accum // world


def _header(cfg: Config, model: nn.Module, device: torch.device, precision: str, why: str, threads: int,
            threads_why: str, tokens_per_step: int, start: int, par: Parallel | None = None) -> str:
    n_params = model.num_params()
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    return (f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M params"
            + (f" ({trainable / 1e6:.2f}M trainable)" if frozen else "")
            + f", {len(model.blocks)} layers, block {cfg.model.block_size}, vocab {cfg.model.vocab_size} | device "
            f"{device}, precision {precision} ({why}), {threads} threads ({threads_why})"
            + (f" | {par.kind} over {par.world_size} processes" if par and par.kind != "none" else "")
            + (f" | activation checkpointing every {cfg.train.activation_checkpointing} block(s)"
               if cfg.train.activation_checkpointing else "") + " | "
            f"{tokens_per_step:,} tokens/step, steps {start}->{cfg.train.max_steps}" + (" (resumed)" if start else ""))


def train_model(
    cfg: Config,
    model: LanguageModel,
    tok: Tokenizer,
    batches: Batches,
    *,
    resume_from: Path | None = None,
    progress: bool = True,
    stop_at_step: int | None = None,
    layer_grad_norms: bool = False,
    desc: str = "train",
) -> RunResult:
    """The loop every training stage shares (see the module docstring): the stage brings the model,
    its data as `Batches`, and the config; checkpoints, logs and plots land in `cfg.out_dir`."""
    t, run_dir = cfg.train, Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    here, device = join(t.device)
    kind = parallel_kind(t.parallel, here)  # once: its note, when it has one, prints once
    accum = _accum_per_rank(t, here, kind)
    threads_before = torch.get_num_threads()
    threads, threads_why = pick_threads(t.threads)
    torch.set_num_threads(threads)  # before any timing below; restored when the run ends
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats slow CPU math ~10x; flushing them costs nothing
    model = model.to(device)
    precision, why = pick_precision(t.precision, device, linear_shapes(model, t.batch_size * cfg.model.block_size))
    amp = autocast_ctx(precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    if resume_from is not None:  # into the whole model, before FSDP shards it: any world size resumes
        ckpt_io.load_weights(network_of(model), resume_from)
    prepare_blocks(model, t)
    rows = t.batch_size * accum  # sequences this process runs per step
    micro_rows, budget, micro_why = t.batch_size, 0, ""
    if t.micro_batch == "auto":
        micro_rows, budget, micro_why = _auto_micro_batch(model, t, rows, batches.train, device, amp)
    par = parallelize(model, t, here, device, kind)
    optimizer = make_optimizer(model, t)
    train_loader = batches.train

    trainer: dict[str, Any] = {"best_val_loss": None}
    start = 0
    if resume_from is not None:
        trainer = ckpt_io.load_trainer_state(resume_from, optimizer, scaler)
        train_loader.load_state_dict(trainer["loader"])
        _load_extra_tensors(model, train_loader, ckpt_io.load_extra(resume_from))
        start = trainer["step"]
        if here.main:
            trim_metrics(run_dir / "metrics.jsonl", start)
    if here.main:
        cfg.save(run_dir / "config.json")

    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
    flops_per_token = model.flops_per_token()
    peak = peak_flops(device, precision)
    tbytes = token_bytes(tok, cfg.model.vocab_size)
    print(_header(cfg, model, device, precision, why, threads, threads_why, tokens_per_step, start, par)
          + (f" | micro-batch {micro_why}" if micro_why else ""), flush=True)

    runlog = RunLog(cfg, run_dir, write=here.main)
    profiler = start_profiler(run_dir, t.profile_steps, device) if t.profile_steps > 0 and here.main else None
    model.train()
    stop_at = min(stop_at_step or t.max_steps, t.max_steps)
    bar = tqdm(total=stop_at, initial=start, desc=desc, unit="step", disable=not progress or not here.main,
               dynamic_ncols=True)
    loss_val, val_loss, bpb = float("nan"), float("nan"), float("nan")
    t_loop, window_t, step = time.perf_counter(), time.perf_counter(), start
    # positions actually run (x's size: a stage with padded rows runs fewer than batch x block_size)
    window_tokens, run_tokens = 0, 0
    mfu = None
    try:
        with _Stop() as stop:
            while step < stop_at:
                lr = lr_at(step, t)
                _set_lr(optimizer, lr)
                loaded = [train_loader.next_batch() for _ in range(accum)]
                loads = []
                if budget:
                    reset_peak(device)
                    loads = _routing_loads(model)
                while True:
                    micro = rechunk(loaded, micro_rows) if budget else loaded
                    counts = [count_examples(model, mb[1]) for mb in micro]
                    try:
                        loss_val = _step_loss(par, micro, amp, scaler, t, cfg.model.block_size, counts,
                                              backoff=bool(budget) and par.world_size == 1)
                        break
                    except _OutOfMemory:  # redo this step's rows in smaller micro-batches
                        optimizer.zero_grad(set_to_none=True)
                        _put_back(loads)
                        micro_rows = _halve(micro_rows, rows, step, "ran out of memory", bar)
                if budget and device.type == "cpu" and par.any(read_peak(device) > budget):
                    # the kernel would kill the run rather than raise: the next steps run smaller
                    micro_rows = _halve(micro_rows, rows, step, f"passed the {budget / 2**30:.2f} GiB budget", bar)
                finite = math.isfinite(loss_val)
                if not finite:
                    if t.on_nan != "skip":
                        raise UserError(f"loss became {loss_val} at step {step}",
                                        fix="lower --train.lr, keep --train.grad_clip on, or use --train.on_nan=skip")
                    # no update from this batch; the step still counts, so evaluation and checkpoints below run
                    runlog.log({"step": step, "skipped": 1, "loss": str(loss_val)})
                else:
                    norm = _optimizer_step(model, optimizer, scaler, t.grad_clip)
                logging_now = finite and ((step + 1) % t.log_interval == 0 or step + 1 == stop_at)
                layer_norms = block_grad_norms(model) if layer_grad_norms and logging_now else {}
                optimizer.zero_grad(set_to_none=True)
                step += 1
                step_tokens = sum(mb[0].numel() for mb in micro) * par.world_size
                window_tokens += step_tokens
                run_tokens += step_tokens
                if profiler:
                    profiler.step()
                    if step - start >= t.profile_steps + 1:
                        finish_profile(profiler, run_dir)
                        profiler = None

                if logging_now:
                    dt = time.perf_counter() - window_t
                    tps = window_tokens / dt
                    mfu, peak = observe_mfu(flops_per_token * window_tokens / dt, peak, device, precision)
                    window_t, window_tokens = time.perf_counter(), 0
                    routing = model.routing_metrics()
                    if isinstance(model, Objective):
                        routing.update(model.metrics())
                    runlog.log({"step": step, "loss": loss_val, "lr": lr, "grad_norm": norm.item(), "tokens_per_s": tps,
                                **({"mfu": mfu} if mfu is not None else {}), **layer_norms, **routing})
                    bar.set_postfix_str(f"loss {loss_val:.4f} lr {lr:.2e} {tps / 1e3:.1f}k tok/s"
                                        + (f" MFU {mfu:.0%}" if mfu is not None else ""), refresh=False)
                bar.update(1)
                stop.requested = stop.requested or ("SIGTERM" if par.any(bool(stop.requested)) else None)
                end = step == stop_at or stop.requested
                evaluated = batches.make_val is not None and (step % t.eval_interval == 0 or step == t.max_steps)
                if evaluated:  # every rank evaluates the same batches (FSDP needs all of them for a forward)
                    val_loss, bpb = evaluate(model, batches.make_val(), t.eval_iters, amp, tbytes)
                    val_metrics = {f"val_{k}": v for k, v in model.metrics(training=False).items()} \
                        if isinstance(model, Objective) else {}
                    runlog.log({"step": step, "val_loss": val_loss, "val_bpb": bpb, **val_metrics})
                    per_byte = "" if math.isnan(bpb) else f", {bpb:.3f} bits/byte"
                    bar.write(f"step {step}: train loss {loss_val:.4f}, val loss {val_loss:.4f}{per_byte}")
                if end or (t.ckpt_interval and step % t.ckpt_interval == 0):
                    _save(cfg, step, par, optimizer, tok, trainer, train_loader, scaler,
                          val_loss if evaluated else None)
                if stop.requested:
                    break
    finally:
        torch.set_num_threads(threads_before)
        torch.set_flush_denormal(False)  # the process default: the run leaves no global setting behind
        bar.close()
        runlog.close()
    seconds = time.perf_counter() - t_loop
    if here.main:
        plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    if stop.requested:
        raise Interrupted(stop.requested, step)
    steps_run = step - start
    result = RunResult(run_dir, step, loss_val, val_loss, bpb, seconds,
                       run_tokens / seconds if seconds else 0.0, mfu, runlog.history)
    val = f"val loss {val_loss:.4f}" if batches.make_val is not None else "validation skipped (no validation split)"
    print(f"done: {steps_run} steps in {seconds:.1f}s, train loss {loss_val:.4f}, {val} -> {run_dir}", flush=True)
    return result
