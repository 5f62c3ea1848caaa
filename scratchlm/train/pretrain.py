"""The training loop, written by hand (no Trainer, Lightning or accelerate), and pretraining.

`train_model` is the loop every training stage shares: a stage brings its model, its data as
`Batches` (a resumable train loader, fresh validation loaders) and the config. `pretrain` is the
first such stage: token shards in, a model trained from scratch out. Packed batches
(x, y, doc_ids) train with attention kept inside each document (`DocumentMask`).

One step = `grad_accum` micro-batches, each forward + backward with the loss divided by
`grad_accum` (so the summed gradient is the mean over the whole step), then the global gradient
norm is clipped and AdamW steps with the schedule's learning rate. Around that:
- precision: `auto` picks bf16 autocast where it is faster (CUDA; CPUs with AMX once the model
  is big enough for its matmuls to dominate) and fp32 elsewhere, and says why in the header;
  fp16 (CUDA) uses a gradient scaler; the weights and the optimizer stay fp32 throughout;
- validation every `eval_interval` steps: mean loss over `eval_iters` fixed batches, and bits per
  byte (the loss in bits divided by the UTF-8 bytes the predicted tokens stand for, comparable
  across tokenizers);
- logging: a progress bar (loss, lr, tokens/s, MFU, ETA), `metrics.jsonl`, TensorBoard when
  installed (wandb when asked), and `loss.png` at the end;
- checkpoints (see checkpoint.py) every `ckpt_interval` steps, at the end, and on Ctrl-C or
  SIGTERM; `resume=True` continues from the latest one exactly as if never stopped (the data
  loader position, RNG states, optimizer moments and the step all come back);
- a NaN or inf loss stops the run naming the step (or skips the batch, `on_nan=skip`);
- `profile_steps=N` traces N steps with torch.profiler into `RUN/profile/`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from scratchlm.config import Config, ModelConfig
from scratchlm.data.loader import BatchLoader, TokenShards
from scratchlm.errors import UserError
from scratchlm.model import build_model, padded_vocab
from scratchlm.model.layers import DocumentMask
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt_io
from scratchlm.train.optim import make_optimizer
from scratchlm.train.schedule import lr_at

# bf16 autocast on an AMX CPU: matmuls run ~6x faster than fp32 at large sizes, but the casts
# cost more than they save on tiny models (0.8M params: 1.4-2.2x slower). Measured crossover.
BF16_CPU_MIN_PARAMS = 5_000_000


def pick_device(name: str) -> torch.device:
    if name != "auto":
        if name.startswith("cuda") and not torch.cuda.is_available():
            raise UserError(f"train.device={name} but no CUDA GPU is visible", fix="use --train.device=cpu")
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read(100_000)
    except OSError:
        return False


def pick_precision(choice: str, device: torch.device, n_params: int) -> tuple[str, str]:
    """(precision, why) for `train.precision`."""
    if choice not in ("auto", "fp32", "bf16", "fp16"):
        raise UserError(f"train.precision={choice!r} is unknown", fix="use auto, fp32, bf16 or fp16")
    if choice == "fp16" and device.type != "cuda":
        raise UserError("train.precision=fp16 needs a CUDA GPU", fix="use bf16 or fp32 on this device")
    if choice != "auto":
        return choice, "set"
    if device.type == "cuda":
        return ("bf16", "auto: GPU supports bf16") if torch.cuda.is_bf16_supported() else ("fp16", "auto: no bf16")
    if device.type == "cpu" and cpu_has_amx():
        if n_params >= BF16_CPU_MIN_PARAMS:
            return "bf16", f"auto: AMX CPU and {n_params / 1e6:.1f}M params"
        return "fp32", f"auto: {n_params / 1e6:.1f}M params, below the {BF16_CPU_MIN_PARAMS / 1e6:.0f}M where bf16 pays"
    return "fp32", "auto"


def autocast_ctx(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def token_bytes(tok: Tokenizer, vocab: int) -> torch.Tensor:
    """(V,) UTF-8 bytes each id stands for; 0 for specials and padding (for bits per byte)."""
    out = torch.zeros(vocab, dtype=torch.float32)
    specials = set(tok.special_tokens.values())
    for i in range(tok.vocab_size):
        if i not in specials:
            out[i] = len(tok.decode([i]).encode("utf-8")) if not hasattr(tok, "vocab") else len(tok.vocab[i])
    return out


def block_grad_norms(model: nn.Module) -> dict[str, float]:
    """{"grad_norm/layer_i": norm} over the parameters of each transformer block (`h.i.*` or
    `layers.i.*`), read before the optimizer zeroes the gradients (after clipping)."""
    sq: dict[int, float] = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if p.grad is not None and parts[0] in ("h", "layers"):
            sq[int(parts[1])] = sq.get(int(parts[1]), 0.0) + p.grad.float().pow(2).sum().item()
    return {f"grad_norm/layer_{i}": v**0.5 for i, v in sorted(sq.items())}


def forward_backward(model: nn.Module, micro_batches: list[tuple[torch.Tensor, ...]],
                     amp: contextlib.AbstractContextManager, scaler: torch.amp.GradScaler | None) -> torch.Tensor:
    """Accumulate the gradient of the mean loss over `micro_batches`; return that mean (detached)."""
    total = torch.zeros(())
    for x, y, *doc in micro_batches:
        with amp:
            _, loss = model(x, y, cache=DocumentMask(doc[0]) if doc else None)
        loss = loss / len(micro_batches)
        (scaler.scale(loss) if scaler else loss).backward()
        total += loss.detach().float().cpu()
    return total


@torch.no_grad()
def evaluate(model: nn.Module, loader: BatchLoader, iters: int, amp, tbytes: torch.Tensor) -> tuple[float, float]:
    """(mean loss in nats per token, bits per byte) over `iters` batches."""
    model.eval()
    nats, n_tokens, n_bytes = 0.0, 0, 0.0
    for _ in range(iters):
        x, y, *doc = loader.next_batch()
        with amp:
            logits, _ = model(x, cache=DocumentMask(doc[0]) if doc else None)
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


class _Stop:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (a second Ctrl-C kills)."""

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


def prepare_run_data(cfg: Config, run_dir: Path, inputs: list[str] | None, progress: bool) -> Path:
    """Train the config's tokenizer on the inputs and shard them into RUN/data (reused if present)."""
    from scratchlm.data.prepare import prepare
    from scratchlm.data.sources import read_corpus_text
    from scratchlm.tokenizer import train_tokenizer

    data_dir = run_dir / "data"
    if (data_dir / "manifest.json").exists():
        return data_dir
    texts = read_corpus_text(inputs, cfg.tokenizer.jsonl_field, cfg.tokenizer.max_chars)
    tok = train_tokenizer(texts, cfg.tokenizer, progress=progress)
    prepare(inputs, tok, cfg, data_dir, progress=progress)
    return data_dir


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.OutOfMemoryError) or "can't allocate memory" in str(e) or "out of memory" in str(e)


@dataclass
class Batches:
    """What the loop needs from a stage's data: a resumable training loader and fresh, fixed-order
    validation loaders. A loader's `next_batch()` returns (x, y) or (x, y, doc_ids) for packed
    sequences; `state_dict()`/`load_state_dict()` make it resumable."""

    train: Any
    make_val: Callable[[], Any]


def pretrain(
    cfg: Config,
    data_dir: Path | None = None,
    inputs: list[str] | None = None,
    *,
    resume: bool = False,
    progress: bool = True,
    stop_at_step: int | None = None,
    build: Callable[[ModelConfig], nn.Module] = build_model,
    layer_grad_norms: bool = False,
) -> RunResult:
    """Train `cfg.model` from scratch on token shards; everything lands in `cfg.out_dir`.

    `stop_at_step` ends the run early (with a checkpoint) as an interruption would, for tests.
    `build` makes the model from its config (experiments pass variants); `layer_grad_norms` logs
    each block's gradient norm (`grad_norm/layer_i`) at every log step.
    """
    t, run_dir = cfg.train, Path(cfg.out_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    latest = ckpt_io.find_checkpoint(run_dir) if resume else None
    if latest is not None:
        cfg.model = ckpt_io.load_config_and_tokenizer(latest)[0].model  # the architecture must be the checkpoint's
    data_dir = data_dir or prepare_run_data(cfg, run_dir, inputs, progress)
    shards = TokenShards(data_dir)
    tok = shards.tokenizer()
    if latest is not None:
        shards.check_tokenizer(ckpt_io.load_config_and_tokenizer(latest)[1])
    cfg.model.vocab_size = padded_vocab(cfg.model, tok.vocab_size)
    device = pick_device(t.device)
    val_split = "val" if shards.tokens("val") > cfg.model.block_size else "train"
    batches = Batches(
        train=BatchLoader(shards, "train", t.batch_size, cfg.model.block_size, seed=cfg.seed, device=device),
        make_val=lambda: BatchLoader(shards, val_split, t.batch_size, cfg.model.block_size, seed=cfg.seed + 1,
                                     device=device),
    )
    torch.manual_seed(cfg.seed)
    model = build(cfg.model)
    return train_model(cfg, model, tok, batches, resume_from=latest, progress=progress, stop_at_step=stop_at_step,
                       layer_grad_norms=layer_grad_norms, desc="pretrain")


def train_model(
    cfg: Config,
    model: nn.Module,
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
    device = pick_device(t.device)
    if device.type == "cpu":
        torch.set_flush_denormal(True)  # denormal floats slow CPU math ~10x; flushing them costs nothing
    model = model.to(device)
    n_params = model.num_params()
    precision, why = pick_precision(t.precision, device, n_params)
    amp = autocast_ctx(precision, device)
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None
    optimizer = make_optimizer(model, t)
    step_model = torch.compile(model) if t.compile else model
    train_loader = batches.train

    trainer: dict[str, Any] = {"best_val_loss": None}
    start = 0
    if resume_from is not None:
        ckpt_io.load_weights(model, resume_from)
        trainer = ckpt_io.load_trainer_state(resume_from, optimizer)
        train_loader.load_state_dict(trainer["loader"])
        start = trainer["step"]
    cfg.save(run_dir / "config.json")

    tokens_per_step = t.batch_size * t.grad_accum * cfg.model.block_size
    flops_per_step = model.flops_per_token() * tokens_per_step
    peak = _peak_flops(device, precision)
    tbytes = token_bytes(tok, cfg.model.vocab_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters()) - trainable
    print(f"model: {cfg.model.arch}, {n_params / 1e6:.2f}M params"
          + (f" ({trainable / 1e6:.2f}M trainable)" if frozen else "")
          + f", {cfg.model.n_layer} layers, block {cfg.model.block_size}, vocab {cfg.model.vocab_size} | device "
          f"{device}, precision {precision} ({why}), {torch.get_num_threads()} threads | {tokens_per_step:,} "
          f"tokens/step, steps {start}->{t.max_steps}" + (" (resumed)" if start else ""), flush=True)

    metrics_file = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115 (closed in finally)
    board = _tensorboard(run_dir) if t.tensorboard else None
    wandb_run = _wandb(cfg) if t.wandb else None
    history: list[dict[str, Any]] = []
    profiler = _profiler(run_dir, t.profile_steps) if t.profile_steps > 0 else None

    def log(record: dict[str, Any]) -> None:
        history.append(record)
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
        if board:
            for k, v in record.items():
                if k != "step" and isinstance(v, int | float):
                    board.add_scalar(k, v, record["step"])
        if wandb_run:
            wandb_run.log(record, step=record["step"])

    def validate(step: int) -> tuple[float, float]:
        val_loss, bpb = evaluate(step_model, batches.make_val(), t.eval_iters, amp, tbytes)
        log({"step": step, "val_loss": val_loss, "val_bpb": bpb})
        return val_loss, bpb

    def save(step: int, val_loss: float | None) -> None:
        trainer["loader"] = train_loader.state_dict()
        is_best = val_loss is not None and (trainer["best_val_loss"] is None or val_loss < trainer["best_val_loss"])
        if is_best:
            trainer["best_val_loss"] = val_loss
        path = ckpt_io.save_checkpoint(run_dir, step, model, optimizer, cfg, tok, trainer, keep_last=t.keep_last)
        if is_best:
            ckpt_io.mark_best(path)

    model.train()
    stop_at = min(stop_at_step or t.max_steps, t.max_steps)
    bar = tqdm(total=stop_at, initial=start, desc=desc, unit="step", disable=not progress, dynamic_ncols=True)
    loss_val, val_loss, bpb = float("nan"), float("nan"), float("nan")
    t_loop, window_t, window_steps, step = time.perf_counter(), time.perf_counter(), 0, start
    mfu = None
    try:
        with _Stop() as stop:
            while step < stop_at:
                lr = lr_at(step, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro = [train_loader.next_batch() for _ in range(t.grad_accum)]
                try:
                    loss = forward_backward(step_model, micro, amp, scaler)
                except RuntimeError as e:
                    if _is_oom(e):
                        raise UserError(
                            f"a micro-batch of {t.batch_size}x{cfg.model.block_size} tokens does not fit in memory",
                            fix="lower --train.batch_size and raise --train.grad_accum to keep tokens per step",
                        ) from None
                    raise
                loss_val = loss.item()
                if not math.isfinite(loss_val):
                    optimizer.zero_grad(set_to_none=True)
                    if t.on_nan == "skip":
                        log({"step": step, "skipped": 1, "loss": str(loss_val)})
                        step += 1
                        continue
                    raise UserError(f"loss became {loss_val} at step {step}",
                                    fix="lower --train.lr, keep --train.grad_clip on, or use --train.on_nan=skip")
                if scaler:
                    scaler.unscale_(optimizer)
                norm = nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else float("inf"))
                if scaler:
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    optimizer.step()
                if hasattr(model, "after_optimizer_step"):  # e.g. MoE routers' balancing bias
                    model.after_optimizer_step()
                logging_now = (step + 1) % t.log_interval == 0 or step + 1 == stop_at
                layer_norms = block_grad_norms(model) if layer_grad_norms and logging_now else {}
                optimizer.zero_grad(set_to_none=True)
                step += 1
                window_steps += 1
                if profiler:
                    profiler.step()
                    if step - start >= t.profile_steps + 1:
                        _finish_profile(profiler, run_dir)
                        profiler = None

                if logging_now:
                    dt = time.perf_counter() - window_t
                    tps = tokens_per_step * window_steps / dt
                    mfu = flops_per_step * window_steps / dt / peak if peak else None
                    window_t, window_steps = time.perf_counter(), 0
                    log({"step": step, "loss": loss_val, "lr": lr, "grad_norm": norm.item(), "tokens_per_s": tps,
                         **({"mfu": mfu} if mfu is not None else {}),
                         **layer_norms, **(model.routing_metrics() if hasattr(model, "routing_metrics") else {})})
                    bar.set_postfix_str(f"loss {loss_val:.4f} lr {lr:.2e} {tps / 1e3:.1f}k tok/s"
                                        + (f" MFU {mfu:.0%}" if mfu is not None else ""), refresh=False)
                bar.update(1)
                end = step == stop_at or stop.requested
                if step % t.eval_interval == 0 or step == t.max_steps:
                    val_loss, bpb = validate(step)
                    bar.write(f"step {step}: train loss {loss_val:.4f}, val loss {val_loss:.4f}, {bpb:.3f} bits/byte")
                if end or (t.ckpt_interval and step % t.ckpt_interval == 0):
                    save(step, val_loss if step % t.eval_interval == 0 or step == t.max_steps else None)
                if stop.requested:
                    bar.write(f"{stop.requested}: saved a checkpoint at step {step}; continue with --resume")
                    break
    finally:
        bar.close()
        metrics_file.close()
        if board:
            board.close()
        if wandb_run:
            wandb_run.finish()
    seconds = time.perf_counter() - t_loop
    plot_losses(run_dir / "metrics.jsonl", run_dir / "loss.png")
    steps_run = step - start
    result = RunResult(run_dir, step, loss_val, val_loss, bpb, seconds,
                       tokens_per_step * steps_run / seconds if seconds else 0.0, mfu, history)
    print(f"done: {steps_run} steps in {seconds:.1f}s, train loss {loss_val:.4f}, val loss {val_loss:.4f} "
          f"-> {run_dir}", flush=True)
    return result


# -- optional instruments -------------------------------------------------------------------------


def _peak_flops(device: torch.device, precision: str) -> float | None:
    try:
        from scratchlm.env import peak_flops
    except ImportError:
        return None
    dtype = torch.float32 if precision == "fp32" else (torch.bfloat16 if precision == "bf16" else torch.float16)
    try:
        return peak_flops(device.type, dtype)
    except Exception as e:  # an unmeasurable peak only costs the MFU column
        print(f"(MFU unavailable: {e})", file=sys.stderr)
        return None


def _tensorboard(run_dir: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(str(run_dir / "tb"))


def _wandb(cfg: Config):
    try:
        import wandb
    except ImportError:
        raise UserError("train.wandb=true but wandb is not installed", fix="pip install wandb") from None
    return wandb.init(project="scratchlm", name=cfg.name, config=cfg.to_dict(), dir=cfg.out_dir,
                      mode=os.environ.get("WANDB_MODE", "offline"))


def _profiler(run_dir: Path, steps: int):
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    prof = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                   record_shapes=False)
    prof.start()
    return prof


def _finish_profile(prof, run_dir: Path) -> None:
    prof.stop()
    out = run_dir / "profile"
    out.mkdir(exist_ok=True)
    prof.export_chrome_trace(str(out / "trace.json"))
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)
    (out / "top_ops.txt").write_text(table)
    print(f"profile: {out / 'trace.json'} (open in chrome://tracing or Perfetto)\n{table}", flush=True)


def plot_losses(metrics: Path, out: Path) -> None:
    """Train and validation loss against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = [], []
    for line in metrics.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if "loss" in r and isinstance(r["loss"], float):
            train.append((r["step"], r["loss"]))
        if "val_loss" in r:
            val.append((r["step"], r["val_loss"]))
    if not train:
        return
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(*zip(*train), label="train")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, out)
