"""`scratchlm experiment arch`: the frontier architectures against the Llama baseline, one budget for all.

Every run trains the same number of tokens (`budget`, whole steps of batch x block), with the same
recipe (AdamW at `lr`, a warmup of a tenth of the run, a cosine to lr/10 at its last step), the same
data order (the loader's seed is fixed; only the weights' initial draw changes with a baseline seed),
the same validation batches, on one BPE trained once on the embedded corpus. The baseline,
`llama-tiny`, is trained with `seeds` initial seeds: their spread is the noise a difference must
beat. Every other architecture (its `*-tiny` preset's shape) is trained once, at the first seed.

Matching. An architecture's feed-forward widths are its one dial: the dense FFN's hidden width and,
for a mixture of experts, each expert's, scaled together (their ratio kept), searched so that its
non-embedding parameters equal the baseline's to within `TOLERANCE`. For the MoE-based ones (mla and
mtp: DeepSeek-V3's latent attention and routed + shared experts; jamba: its MoE layers) there are two
variants: matched on total parameters (the experts then thin) and matched on the parameters one
token uses (`active_params`: the routed experts it is not sent to left out), which is the usual
"same compute per token" comparison. Counts leave out the token table (tied to the head here), as
the scaling verb does; mtp's prediction modules are counted apart (`train_only`): they are trained,
but the model that generates does not run them, as DeepSeek-V3 reports its 14B MTP weights apart.

Measured per run: validation loss against tokens and against wall time (the training loop's own
clock: the time between its log lines, evaluations inside; `evals` validations per run), the KV-cache
bytes per token (the engine's cache for that model, prefilled with N tokens: its allocated bytes
over N; N = the context, and for jamba also 10x the context, its Mamba state being the same size at
any length) and greedy decode tokens/s (batch 1, the same prompt for all, through the engine: a
prefill then one `decode` per token, after a warm-up; the best of five timed passes). mtp decodes
plainly here: its modules as a speculative draft are `sample --draft mtp`'s business.

The output folder holds `plan.json` (settings), `data/` (corpus tokenized once), `runs/<name>/`
(one pretraining run each, `result.json` when finished: never retrained), `results.json`,
`summary.md` and `arch.png`. An interrupted run resumes from its checkpoint; architectures and seeds
may be added on `--resume`, the recipe may not change.

Left out: a learning rate tuned per architecture (one lr for all favours whichever it suits; a
careful study sweeps it per model), more than one seed per architecture (the baseline's spread
stands in for theirs), kernels (everything runs as plain PyTorch, so wall time measures these
implementations on this device, not the architectures' best).
"""

from __future__ import annotations

import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm.checkpoint.folder import load_model_for_inference
from scratchlm.config import Config, ModelConfig, get_preset
from scratchlm.data.loader import TokenShards
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine
from scratchlm.io import write_json, write_text
from scratchlm.model import build_model, padded_vocab
from scratchlm.model.llama import ffn_hidden
from scratchlm.model.moe import expert_hidden
from scratchlm.rundir import check_plan, claim_outputs, claim_run_dir, read_result, reopen_run
from scratchlm.train.device import pick_device
from scratchlm.train.pretrain import prepare_run_data, pretrain

PRESETS = {"llama": "llama-tiny", "mla": "mla-tiny", "mtp": "mtp-tiny", "diff": "diff-tiny",
           "diff-nonorm": "diff-nonorm-tiny", "nsa": "nsa-tiny", "jamba": "jamba-tiny"}
BASELINE = "llama"
MOE = ("mla", "mtp", "jamba")  # matched twice: on total and on active parameters
TOLERANCE = 0.02  # |params - baseline's| / baseline's, at most
MIN_STEPS = 10
RESULT = "result.json"
ARTEFACTS = ("plan.json", "data", "runs", "results.json", "summary.md", "arch.png")


@dataclass(frozen=True)
class ArchSettings:
    """What every run shares. A resumed comparison keeps them, all but `archs` and `seeds` (which runs
    there are), `device` and `threads` (how they run)."""

    budget: int = 409_600  # training tokens per run: 400 steps of 16 x 64
    archs: tuple[str, ...] = tuple(PRESETS)
    seeds: int = 3  # of the baseline
    batch_size: int = 16
    block_size: int = 64
    vocab_size: int = 512  # the scaling verb's BPE: at 128 dims a 2,048-row table's matmul outweighs a block
    tokenizer_max_chars: int = 0  # 0 = the whole corpus
    lr: float = 2e-3
    evals: int = 8  # validations per run, evenly spaced, the last at the end
    eval_iters: int = 10  # validation batches, the same for every run
    seed: int = 1337  # the data order, and the initial draw of every run but the other baseline seeds
    prompt_tokens: int = 16  # decode speed: the prompt, then
    decode_tokens: int = 48  # new tokens (prompt + new = the context: no slide)
    device: str = "auto"
    threads: int = 1

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.block_size

    @property
    def steps(self) -> int:
        return self.budget // self.tokens_per_step


DEFAULT_SETTINGS = ArchSettings()
# --quick, for tests: the presets' shapes at block 32, 12 steps of 4 rows, a BPE on 100k characters
QUICK_SETTINGS = ArchSettings(budget=1_536, batch_size=4, block_size=32, tokenizer_max_chars=100_000, evals=3,
                              eval_iters=2, prompt_tokens=8, decode_tokens=8)


@dataclass(frozen=True)
class Counts:
    """Parameters of a model config, the token table left out (tied to the head in every preset here)."""

    total: int  # every weight the generating model holds
    active: int  # those one token uses (MoE: the routed experts it is not sent to left out)
    train_only: int  # mtp's prediction modules: trained, not run when generating
    with_embedding: int  # total + the token table


def param_counts(m: ModelConfig) -> Counts:
    """Counts of `m`'s model, built on the meta device (no memory, no init)."""
    with torch.device("meta"):
        model = build_model(m)
    everything = sum(p.numel() for p in model.parameters())
    tables = sum(x.weight.numel() for x in model.modules() if isinstance(x, nn.Embedding))
    head = model.unembedding
    untied = 0 if head is None or head.weight is model.embedding.weight else head.weight.numel()
    extra = sum(p.numel() for p in model.mtp.parameters()) if hasattr(model, "mtp") else 0
    total = everything - tables - untied - extra
    active = model.active_params() - tables - untied - extra if hasattr(model, "active_params") else total
    return Counts(total, active, extra, everything - extra)


def with_ffn(m: ModelConfig, hidden: int, base: ModelConfig) -> ModelConfig:
    """`m` with its dense FFN `hidden` wide and (MoE) its experts scaled by the same factor from `base`'s."""
    out = replace(m, ffn_hidden=hidden)
    if hasattr(m, "n_experts"):
        out.expert_hidden = max(1, round(hidden * expert_hidden(base) / ffn_hidden(base)))
    return out


def match_ffn(m: ModelConfig, target: int, key: str = "total") -> tuple[ModelConfig, Counts]:
    """`m` with the FFN width (`with_ffn`) whose `key` count ("total" or "active") is nearest `target`;
    refused beyond TOLERANCE. Every count is affine in the dense and the expert hidden widths (3 x C weights
    per unit of each, times the units of that kind), so three builds give its slopes and the best width is
    found in arithmetic, then built once to check."""
    f0, e0 = ffn_hidden(m), expert_hidden(m) if hasattr(m, "n_experts") else 0

    def count(f: int, e: int) -> int:
        return getattr(param_counts(replace(m, ffn_hidden=f, **({"expert_hidden": e} if e0 else {}))), key)

    c0 = count(f0, e0)
    per_f, per_e = count(f0 + 1, e0) - c0, count(f0, e0 + 1) - c0 if e0 else 0

    def predicted(h: int) -> int:
        e = with_ffn(m, h, m).expert_hidden if e0 else 0
        return c0 + per_f * (h - f0) + per_e * (e - e0)

    best = min(range(1, 32 * m.n_embd + 1), key=lambda h: abs(predicted(h) - target))
    out = with_ffn(m, best, m)
    counts = param_counts(out)
    got = getattr(counts, key)
    if got != predicted(best):  # a count that is not affine in the widths: a new kind of layer
        raise AssertionError(f"arch={m.arch}: {key} parameters at FFN width {best}: {got}, predicted {predicted(best)}")
    if abs(got - target) > TOLERANCE * target:
        raise UserError(f"arch={m.arch}: the nearest FFN width ({best}) gives {got:,} {key} parameters, "
                        f"{abs(got - target) / target:.1%} from the baseline's {target:,}",
                        fix="change the baseline's size or the architecture's preset")
    return out, counts


@dataclass(frozen=True)
class Variant:
    """One run, planned."""

    name: str  # its folder: llama_s0, diff, mla_total, mla_active, ...
    arch: str
    matched: str  # "baseline", "total" or "active"
    init_seed: int
    ffn_hidden: int
    expert_hidden: int  # 0: no experts
    params: Counts


def model_config(arch: str, s: ArchSettings, tokenizer_vocab: int) -> ModelConfig:
    """The architecture's preset model at the comparison's context and vocabulary."""
    m = get_preset(PRESETS[arch]).model
    m.block_size, m.dropout = s.block_size, 0.0
    m.vocab_size = padded_vocab(m, tokenizer_vocab)
    return m


def sized_config(v: Variant, s: ArchSettings, tokenizer_vocab: int) -> ModelConfig:
    m = replace(model_config(v.arch, s, tokenizer_vocab), ffn_hidden=v.ffn_hidden)
    if v.expert_hidden:
        m.expert_hidden = v.expert_hidden
    return m


def plan(s: ArchSettings, tokenizer_vocab: int) -> list[Variant]:
    """The runs: the baseline at each seed, then each architecture matched on total (and, MoE, active) parameters."""
    base = model_config(BASELINE, s, tokenizer_vocab)
    target = param_counts(base).total
    out = [Variant(f"{BASELINE}_s{i}", BASELINE, "baseline", s.seed + i, ffn_hidden(base), 0, param_counts(base))
           for i in range(s.seeds)]
    for arch in s.archs:
        if arch == BASELINE:
            continue
        for key in ("total", "active") if arch in MOE else ("total",):
            m, counts = match_ffn(model_config(arch, s, tokenizer_vocab), target, key)
            name = f"{arch}_{key}" if arch in MOE else arch
            out.append(Variant(name, arch, key, s.seed, m.ffn_hidden, getattr(m, "expert_hidden", 0), counts))
    return out


def check_settings(s: ArchSettings) -> None:
    """Refuse what cannot make a comparison, before any data is read."""
    unknown = [a for a in s.archs if a not in PRESETS]
    if unknown or not s.archs:
        raise UserError(f"--archs {','.join(s.archs)}: {'unknown ' + ', '.join(unknown) if unknown else 'empty'}",
                        fix=f"choose from {','.join(PRESETS)}")
    if len(set(s.archs)) != len(s.archs):
        raise UserError(f"--archs {','.join(s.archs)}: an architecture is named twice")
    if s.seeds < 1:
        raise UserError(f"--seeds {s.seeds}: the baseline needs at least one seed", fix="use --seeds 3, the default")
    if s.steps < MIN_STEPS:
        raise UserError(f"--budget {s.budget}: {s.steps} steps of {s.tokens_per_step:,} tokens (batch {s.batch_size} "
                        f"x block {s.block_size}), fewer than {MIN_STEPS}",
                        fix=f"use --budget >= {MIN_STEPS * s.tokens_per_step}")
    if s.prompt_tokens + s.decode_tokens > s.block_size:
        raise UserError(f"prompt {s.prompt_tokens} + {s.decode_tokens} new tokens exceed the context {s.block_size}")


def parse_budget(text: str) -> int:
    """--budget: a whole number of tokens, also written 3.2e5."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0 and value == int(value)):
        raise UserError(f"--budget {text}: not a whole, positive number of tokens", fix="e.g. --budget 327680")
    return int(value)


def parse_archs(text: str) -> tuple[str, ...]:
    """--archs: comma-separated names (checked by `check_settings`)."""
    return tuple(a.strip() for a in text.split(",") if a.strip())


def run_config(v: Variant, s: ArchSettings, run_dir: Path, tokenizer_vocab: int) -> Config:
    """The pretraining config of one run: its preset, sized, with the shared recipe."""
    cfg = get_preset(PRESETS[v.arch])
    cfg.name, cfg.out_dir = f"arch-{v.name}", str(run_dir)
    cfg.seed = cfg.data.seed = s.seed  # the data order: every run's
    cfg.tokenizer.vocab_size, cfg.tokenizer.max_chars = s.vocab_size, s.tokenizer_max_chars
    cfg.model = sized_config(v, s, tokenizer_vocab)
    t, steps = cfg.train, s.steps
    every = math.ceil(steps / s.evals)
    t.batch_size, t.grad_accum, t.lr, t.min_lr, t.schedule = s.batch_size, 1, s.lr, s.lr / 10, "cosine"
    t.max_steps, t.warmup_steps = steps, min(100, max(1, steps // 10))
    t.eval_interval, t.eval_iters, t.log_interval = every, s.eval_iters, every  # a log line at every validation
    t.ckpt_interval = every if steps >= 100 else 0  # and at the end, and on Ctrl-C / SIGTERM
    t.device, t.threads, t.keep_last, t.tensorboard = s.device, s.threads, 0, False
    t.precision = "bf16" if pick_device(s.device, flag="--device").type == "cuda" else "fp32"
    return cfg


def seeded_build(seed: int) -> Callable[[ModelConfig], nn.Module]:
    """build_model with the initial draw from `seed` (pretrain seeds the data order and the draw alike)."""
    def build(m: ModelConfig) -> nn.Module:
        torch.manual_seed(seed)
        return build_model(m)
    return build


def val_curve(run_dir: Path, tokens_per_step: int) -> list[dict[str, float]]:
    """(step, tokens, seconds, val_loss) at each validation. Seconds: the loop's clock, summed from its log
    lines' windows (tokens / tokens_per_s), so the evaluations before a log line are inside its window."""
    curve, clock, last = [], 0.0, 0
    for line in (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        if isinstance(r.get("tokens_per_s"), float) and r["tokens_per_s"] > 0:
            clock += (r["step"] - last) * tokens_per_step / r["tokens_per_s"]
            last = r["step"]
        if "val_loss" in r:
            curve.append({"step": r["step"], "tokens": r["step"] * tokens_per_step, "seconds": clock,
                          "val_loss": r["val_loss"]})
    return curve


def cache_bytes_per_token(engine: Engine, prompt: list[int], n: int) -> float:
    """Bytes the engine's cache for this model allocates for a prefill of `n` tokens, over n."""
    ids = (prompt * (n // len(prompt) + 1))[:n]
    _, cache = engine.prefill([ids], max_len=n)
    return cache.nbytes / n


def decode_tokens_per_s(engine: Engine, prompt: list[int], new_tokens: int, repeats: int = 5) -> float:
    """Greedy decoding, batch 1: new tokens over the seconds of the decode steps (prefill not timed),
    best of `repeats` passes after one untimed warm-up."""
    best = math.inf
    for i in range(repeats + 1):
        logits, cache = engine.prefill([prompt], max_len=len(prompt) + new_tokens)
        start = time.perf_counter()
        for _ in range(new_tokens):
            logits = engine.decode(logits.argmax(-1), cache)
        if i:
            best = min(best, time.perf_counter() - start)
    return new_tokens / best


def measure_inference(run_dir: Path, s: ArchSettings, prompt: list[int]) -> dict[str, Any]:
    """The trained model's cache bytes per token and decode speed."""
    model, _, cfg = load_model_for_inference(run_dir, device=str(pick_device(s.device, flag="--device")))
    engine = Engine(model)
    threads = torch.get_num_threads()
    if s.threads:
        torch.set_num_threads(s.threads)
    try:
        out = {"cache_bytes_per_token": cache_bytes_per_token(engine, prompt, s.block_size),
               "decode_tokens_per_s": decode_tokens_per_s(engine, prompt[: s.prompt_tokens], s.decode_tokens)}
        if model.recurrent:  # a constant state: per token it falls with the length
            out["cache_bytes_per_token_10x"] = cache_bytes_per_token(engine, prompt, 10 * s.block_size)
    finally:
        torch.set_num_threads(threads)
    return out


def run_variant(v: Variant, s: ArchSettings, run_dir: Path, data_dir: Path, tokenizer_vocab: int,
                prompt: list[int]) -> dict[str, Any]:
    """Train one run (resuming its checkpoint if it has one), measure it, record its result atomically.
    The run's own output goes to RUN/train.log."""
    resume = reopen_run(run_dir)
    cfg = run_config(v, s, run_dir, tokenizer_vocab)
    with open(run_dir / "train.log", "a", encoding="utf-8") as log, contextlib.redirect_stdout(log):
        pretrain(cfg, data_dir, resume=resume, progress=False, build=seeded_build(v.init_seed))
    curve = val_curve(run_dir, s.tokens_per_step)
    if not curve or curve[-1]["step"] != s.steps:
        raise UserError(f"{run_dir}: the run ended without its final validation", fix="delete the folder and --resume")
    record = {**asdict(v), "steps": s.steps, "tokens": s.steps * s.tokens_per_step, "curve": curve,
              "val_loss": curve[-1]["val_loss"], "seconds": curve[-1]["seconds"], "resumed": resume,
              **measure_inference(run_dir, s, prompt)}
    write_json(run_dir / RESULT, record)
    return record


# -- the summary ---------------------------------------------------------------------------------------

def baseline_spread(records: list[dict[str, Any]]) -> tuple[float, float]:
    """(mean, sample sd) of the baseline seeds' final validation loss; sd NaN with one seed."""
    losses = [r["val_loss"] for r in records if r["matched"] == "baseline"]
    return statistics.fmean(losses), statistics.stdev(losses) if len(losses) > 1 else math.nan


def verdict(loss: float, mean: float, sd: float) -> str:
    """Against the baseline's seeds: a difference within 2 sd of their mean is no difference measured."""
    if math.isnan(sd):
        return "not judged (one baseline seed: no spread measured)"
    diff = loss - mean
    if abs(diff) <= 2 * sd:
        return f"no difference measured ({diff:+.4f}, within 2 sd of the baseline's seeds)"
    return f"{'wins' if diff < 0 else 'loses'} ({diff:+.4f} = {diff / sd:+.1f} sd of the baseline's seeds)"


def si(x: float) -> str:
    for unit, scale in (("M", 1e6), ("k", 1e3)):
        if abs(x) >= scale:
            return f"{x / scale:.3g}{unit}"
    return f"{x:.3g}"


def size_table(variants: list[Variant]) -> str:
    rows = [f"| {v.name} | {v.matched} | {v.ffn_hidden} | {v.expert_hidden or '-'} | {v.params.total:,} | "
            f"{v.params.active:,} | {v.params.train_only or '-'} |" for v in variants]
    return "\n".join(["| run | matched on | FFN hidden | expert hidden | params (non-emb.) | active | train-only |",
                      "|---|---|---|---|---|---|---|", *rows])


def results_table(records: list[dict[str, Any]]) -> str:
    mean, sd = baseline_spread(records)
    base = [r for r in records if r["matched"] == "baseline"]
    b_secs, b_cache, b_tps = (statistics.fmean(r[k] for r in base)
                              for k in ("seconds", "cache_bytes_per_token", "decode_tokens_per_s"))
    spread = "" if math.isnan(sd) else f" ± {sd:.4f}"
    rows = [f"| {BASELINE} ({len(base)} seeds) | {base[0]['params']['total']:,} | {base[0]['params']['active']:,} | "
            f"{mean:.4f}{spread} | {b_secs:.1f} | {b_cache:,.0f} | {b_tps:.0f} |"]
    for r in records:
        if r["matched"] == "baseline":
            continue
        cache = f"{r['cache_bytes_per_token']:,.0f}"
        if "cache_bytes_per_token_10x" in r:
            cache += f" (10x context: {r['cache_bytes_per_token_10x']:,.0f})"
        rows.append(f"| {r['name']} | {r['params']['total']:,} | {r['params']['active']:,} | {r['val_loss']:.4f} | "
                    f"{r['seconds']:.1f} ({r['seconds'] / b_secs:.2f}x) | "
                    f"{cache} ({r['cache_bytes_per_token'] / b_cache:.2f}x) | "
                    f"{r['decode_tokens_per_s']:.0f} ({r['decode_tokens_per_s'] / b_tps:.2f}x) |")
    head = "| run | params (non-emb.) | active | final val loss | wall s | KV cache B/token | decode tok/s |"
    return "\n".join([head, "|---|---|---|---|---|---|---|", *rows])


def verdict_lines(records: list[dict[str, Any]]) -> list[str]:
    """Per architecture: its loss against the seed spread, then its costs as multiples of the baseline's."""
    mean, sd = baseline_spread(records)
    base = [r for r in records if r["matched"] == "baseline"]

    def times(r: dict[str, Any], key: str, base_key: str | None = None) -> float:
        return r[key] / statistics.fmean(b[base_key or key] for b in base)

    lines = []
    for r in records:
        if r["matched"] == "baseline":
            continue
        cache = f"{times(r, 'cache_bytes_per_token'):.2f}x its KV cache per token"
        if "cache_bytes_per_token_10x" in r:
            cache += f" ({times(r, 'cache_bytes_per_token_10x', 'cache_bytes_per_token'):.2f}x at 10x the context)"
        lines.append(f"{r['name']} (matched on {r['matched']} parameters): val loss: "
                     f"{verdict(r['val_loss'], mean, sd)}; "
                     f"{times(r, 'seconds'):.2f}x the baseline's training time, {cache}, "
                     f"{times(r, 'decode_tokens_per_s'):.2f}x its decode speed")
    return lines


def variant_of(record: dict[str, Any]) -> Variant:
    fields = {k: record[k] for k in Variant.__dataclass_fields__}
    return Variant(**{**fields, "params": Counts(**record["params"])})


def summary_markdown(results: dict[str, Any]) -> str:
    s, records = results["settings"], results["runs"]
    return "\n".join([
        "# Architectures against the Llama baseline, one token budget\n",
        f"Embedded corpus, BPE {s['vocab_size']}; every run {results['steps']} steps of {s['batch_size']}x"
        f"{s['block_size']} = {results['tokens']:,} tokens, lr {s['lr']} (cosine to lr/10), the same data order; "
        f"final validation over {s['eval_iters']} batches. Parameters leave out the token table; an architecture's "
        f"FFN widths are set so its count is within {TOLERANCE:.0%} of the baseline's. Wall time: the training loop "
        f"at {s['threads'] or 'auto'} thread(s) on {results['device']}; KV cache: bytes the engine's cache allocates "
        f"per token of a {s['block_size']}-token prefill; decode: greedy, batch 1, {s['decode_tokens']} tokens after "
        f"a {s['prompt_tokens']}-token prompt.\n",
        "## Sizes\n", size_table([variant_of(r) for r in records]) + "\n",
        "## Results\n", results_table(records) + "\n",
        "## At this scale\n", *[f"- {line}" for line in verdict_lines(records)], "",
        "One run per architecture at one learning rate: a loss difference says what these settings gave, "
        "not what the architecture can do at its best or at scale. Wall time and decode speed are these plain-"
        "PyTorch implementations on this device; on a shared CPU one model's decode speed, measured again, moved "
        "by up to a quarter, so ratios that close are no difference.\n",
        "![validation loss against tokens and wall time](arch.png)\n",
    ])


def plot(records: list[dict[str, Any]], png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    base = [r for r in records if r["matched"] == "baseline"]
    others = [r for r in records if r["matched"] != "baseline"]
    for ax, x in zip(axes, ("tokens", "seconds")):
        for i, r in enumerate(base):
            ax.plot([p[x] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], color="0.3", lw=0.8,
                    label=f"{BASELINE} ({len(base)} seeds)" if i == 0 else None)
        if len(base) > 1 and x == "tokens":  # the seeds' range: the same tokens at every validation
            ys = list(zip(*[[p["val_loss"] for p in r["curve"]] for r in base]))
            ax.fill_between([p[x] for p in base[0]["curve"]], [min(y) for y in ys], [max(y) for y in ys],
                            color="0.6", alpha=0.35, lw=0)
        for i, r in enumerate(others):
            ax.plot([p[x] for p in r["curve"]], [p["val_loss"] for p in r["curve"]], color=f"C{i}",
                    ls="--" if r["matched"] == "active" else "-", marker=".", label=r["name"])
        what = "training tokens" if x == "tokens" else "wall time (s)"
        ax.set(xlabel=what, title=f"validation loss vs {what}")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("validation loss")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    tmp = png.with_name(f".{png.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)


# -- the verb ------------------------------------------------------------------------------------------

def _check_record(v: Variant, rec: dict[str, Any], run_dir: Path) -> None:
    for key, want in (("arch", v.arch), ("ffn_hidden", v.ffn_hidden), ("expert_hidden", v.expert_hidden),
                      ("init_seed", v.init_seed), ("params", asdict(v.params))):
        if rec.get(key) != want:
            raise UserError(f"{run_dir / RESULT}: {key}={rec.get(key)}, the plan says {want}",
                            fix="pass --overwrite to retrain the comparison")


def run_arch(out: str | Path, s: ArchSettings, *, resume: bool = False, overwrite: bool = False,
             progress: bool = True) -> dict[str, Any]:
    """Train every run of the comparison not yet finished, measure, draw and summarise; returns results.json's
    content."""
    check_settings(s)
    if resume and overwrite:
        raise UserError("--resume and --overwrite contradict each other",
                        fix="--resume finishes the comparison in the folder, --overwrite replaces it")
    if BASELINE not in s.archs:
        s = replace(s, archs=(BASELINE, *s.archs))
    variants = plan(s, s.vocab_size)  # a size that cannot be matched is refused before any data
    out = Path(out)
    with claim_run_dir(out, resume=True):  # the folder's lock; what is kept or replaced is decided by ARTEFACTS
        claim_outputs(out, ARTEFACTS, resume=resume, overwrite=overwrite, holds="an architecture comparison",
                      kept="finished runs are kept")
        # a resumed comparison keeps its recipe: a run trained with another would not compare
        check_plan(out / "plan.json", s, ignore=("archs", "seeds", "device", "threads"), made="the comparison",
                   not_plan="an architecture comparison's plan", afresh="pass --overwrite to start afresh")
        write_json(out / "plan.json", {"settings": asdict(s)})
        data_dir = prepare_run_data(run_config(variants[0], s, out, s.vocab_size), out, None, progress, resume=resume)
        shards = TokenShards(data_dir)
        vocab = shards.tokenizer().vocab_size
        prompt = [int(t) for t in shards.read("val", 0, s.block_size)]  # every model decodes from this prompt
        if vocab != s.vocab_size:  # a corpus too small for the vocabulary asked: the tables shrink, nothing else
            variants = plan(s, vocab)
        print(f"architectures: {len(variants)} runs of {s.steps} steps x {s.tokens_per_step:,} tokens = "
              f"{s.steps * s.tokens_per_step:,} tokens each -> {out}\n{size_table(variants)}", flush=True)
        records = []
        for v in variants:
            run_dir = out / "runs" / v.name
            rec = read_result(run_dir / RESULT, "run")
            if rec is None:
                rec = run_variant(v, s, run_dir, data_dir, vocab, prompt)
                status = "resumed" if rec["resumed"] else "trained"
            else:
                _check_record(v, rec, run_dir)
                status = "kept (finished before)"
            records.append(rec)
            print(f"{v.name:>14}: val loss {rec['val_loss']:.4f}  {rec['seconds']:6.1f}s  "
                  f"cache {rec['cache_bytes_per_token']:,.0f} B/token  decode {rec['decode_tokens_per_s']:.0f} "
                  f"tok/s  {status}", flush=True)
        device = str(pick_device(s.device, flag="--device"))
        results = {"format": "scratchlm.arch", "version": 1, "settings": asdict(s), "steps": s.steps,
                   "tokens": s.steps * s.tokens_per_step, "device": device, "tolerance": TOLERANCE,
                   "baseline": dict(zip(("mean", "sd"), baseline_spread(records))), "runs": records,
                   "verdicts": verdict_lines(records)}
        plot(records, out / "arch.png")
        write_json(out / "results.json", json.loads(json.dumps(results).replace("NaN", "null")))
        write_text(out / "summary.md", summary_markdown(results))
    print("\n" + results_table(records) + "\n\n" + "\n".join(verdict_lines(records)))
    print(f"\n-> {out / 'arch.png'}, {out / 'results.json'}, {out / 'summary.md'}")
    return results


def demo_section(out: Path, progress: bool = False) -> str:
    """For the demo's report: the quick comparison in `out` (a folder of its own), as a markdown section."""
    results = run_arch(out, QUICK_SETTINGS, resume=True, progress=progress)
    return ("## Architectures (quick: a few steps each, so the losses say little)\n\n"
            + results_table(results["runs"]) + "\n\n" + "\n".join(f"- {v}" for v in results["verdicts"])
            + f"\n\nPicture: `{Path(out) / 'arch.png'}`.\n")
