"""Our MoE against the dense Llama it matches, and against HF transformers' Mixtral, in one process.

    python bench/moe.py [--quick] [--sizes demo-tiny,medium] [--threads N] [--quality-steps 600]

Three parts, each a markdown table:

a. Throughput, MoE vs dense: an 8-expert top-2 MoE (`arch=moe`; each expert's hidden size is the
   dense FFN's / k, so the parameters a token passes through equal the dense model's; both counts
   are printed) against the dense Llama of the same shape. A step is forward + backward + fused
   AdamW (`make_optimizer`), fp32, on the same batch. Sparse compute is not free: routing, the
   sort/gather/scatter around the experts, smaller matrix products, and an optimizer over all E
   experts' weights; the ratio MoE / dense says what that costs (1.0 = free).
b. Throughput, ours vs HF `MixtralForCausalLM` built from a config with the same sizes (hidden,
   layers, heads, key/value heads, intermediate = our expert hidden, 8 experts, top-2, vocab,
   RMSNorm eps, RoPE theta, tied embeddings), `attn_implementation="sdpa"`, once per HF experts
   implementation available (transformers 5 has "grouped_mm", its default, and "eager", a loop
   over experts). HF only computes its load-balancing loss with `output_router_logits=True`; it
   is set, with `router_aux_loss_coef` = our `aux_loss_coef` (0.01), so both models do the
   auxiliary work: HF's loss is cross-entropy(logits) + 0.01 * aux_loss, computed outside its
   model the way ours computes it inside (ours also adds its router z-loss at 0.001; HF has
   none). Same optimizer (`make_optimizer` on both). Ratio ours / HF, above 1 = ours faster.
c. Quality at the same token budget (600 steps; 40 with --quick, a smoke test; --quality-steps 0
   skips it): llama-tiny and moe-tiny trained by `pretrain` on the embedded corpus (the demo's
   `tiny` tokenizer: BPE 2,048) for the same steps, seed and batches; both loss curves in one PNG,
   bench/out/moe_vs_dense.png, next to the MoE's routing heatmaps (bench/out/moe_routing.png);
   final validation losses and the MoE's final max/mean expert load per layer printed.

Timing: all models of a size alternate in rounds after a warm-up, so drifts in machine speed hit
them alike; the best round per model counts. MFU = training FLOPs per token (`flops_per_token`,
6 x active params + attention; the MoE's figure for HF too, as the work is the same) x tokens/s
over the fp32 matmul peak `scratchlm env` measures. Absolute numbers hold for this machine only.
Left out: bf16, capacity-limited (dropping) routing, the sigmoid router, shared experts.
"""

from __future__ import annotations

import os
import sys

# bench/tokenizers.py would shadow HF's `tokenizers` package (imported by transformers): take this
# folder off the import path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import LlamaConfig, MoEConfig, TrainConfig
from scratchlm.io import atomic_open
from scratchlm.model.llama import Llama
from scratchlm.model.moe import MoE, balance_loss_coef, expert_hidden
from scratchlm.train.optim import make_optimizer

OUT = Path(__file__).resolve().parent / "out"
N_EXPERTS, TOP_K = 8, 2


@dataclass(frozen=True)
class Size:
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    block: int
    batch: int
    vocab: int


SIZES = {
    "demo-tiny": Size(4, 4, 2, 128, 64, 16, 2048),  # llama-tiny / moe-tiny, the demo's models
    "medium": Size(6, 6, 2, 384, 256, 8, 8192),  # large enough that the matrix products dominate
}


def model_config(s: Size, arch: str) -> LlamaConfig:
    dense = dict(vocab_size=s.vocab, block_size=s.block, n_layer=s.n_layer, n_head=s.n_head, n_kv_head=s.n_kv_head,
                 n_embd=s.n_embd, bias=False, dropout=0.0)
    return LlamaConfig(**dense) if arch == "llama" else MoEConfig(**dense, n_experts=N_EXPERTS, n_active_experts=TOP_K)


# ------------------------------------------------------------------------------------------------
# HF Mixtral


def hf_experts_impls() -> list[str]:
    """HF's experts implementations to time: transformers 5 can switch them; older ones loop."""
    from transformers import PreTrainedModel

    return ["grouped_mm", "eager"] if hasattr(PreTrainedModel, "set_experts_implementation") else ["eager"]


def hf_mixtral(c: MoEConfig, experts_impl: str) -> nn.Module:
    """`MixtralForCausalLM` from a config mirroring `c` (no download); checks the settings took."""
    from transformers import AutoModelForCausalLM, MixtralConfig

    kw = dict(vocab_size=c.vocab_size, hidden_size=c.n_embd, intermediate_size=expert_hidden(c),
              num_hidden_layers=c.n_layer, num_attention_heads=c.n_head, num_key_value_heads=c.n_kv_head,
              head_dim=c.n_embd // c.n_head, max_position_embeddings=c.block_size, rms_norm_eps=c.norm_eps,
              tie_word_embeddings=c.tie_embeddings, num_local_experts=c.n_experts,
              num_experts_per_tok=c.n_active_experts, output_router_logits=True,
              router_aux_loss_coef=balance_loss_coef(c), router_jitter_noise=0.0, sliding_window=None,
              attention_dropout=0.0, bos_token_id=0, eos_token_id=0, use_cache=False,
              rope_theta=c.rope.theta)  # transformers 5 folds rope_theta into rope_parameters
    cfg = MixtralConfig(**kw)
    theta = (getattr(cfg, "rope_parameters", None) or {}).get("rope_theta", getattr(cfg, "rope_theta", None))
    if theta != c.rope.theta:
        raise RuntimeError(f"HF Mixtral took rope theta {theta}, not {c.rope.theta}")
    if not c.router_norm_topk:
        raise RuntimeError("HF Mixtral always renormalises the top-k weights; ours must too")
    extra = {"experts_implementation": experts_impl} if len(hf_experts_impls()) > 1 else {}
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", **extra)


# ------------------------------------------------------------------------------------------------
# throughput


def make_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, is_hf: bool) -> Callable[[], float]:
    """One training step (forward, loss, backward, AdamW, zero grads) on a fixed batch."""
    opt = make_optimizer(model, TrainConfig(lr=1e-4))
    coef = getattr(getattr(model, "config", None), "router_aux_loss_coef", 0.0)

    def step() -> float:
        if is_hf:
            out = model(input_ids=x)  # (B, T, V) logits, aux_loss from the router logits of every layer
            loss = F.cross_entropy(out.logits.flatten(0, 1).float(), y.flatten()) + coef * out.aux_loss
        else:
            _, loss = model(x, y)  # cross-entropy + aux_loss_coef * balance + z_loss_coef * z, per MoE layer
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def time_models(steps: dict[str, Callable[[], float]], rounds: int, per_round: int, warmup: int) -> dict[str, float]:
    """Best seconds per step of each, the models alternating round by round."""
    for fn in steps.values():
        for _ in range(warmup):
            fn()
    best = dict.fromkeys(steps, float("inf"))
    for _ in range(rounds):
        for name, fn in steps.items():
            t0 = time.perf_counter()
            for _ in range(per_round):
                fn()
            best[name] = min(best[name], (time.perf_counter() - t0) / per_round)
    return best


def bench_size(name: str, rounds: int, per_round: int, warmup: int, peak: float | None) -> dict:
    s = SIZES[name]
    torch.manual_seed(0)
    dense, moe = Llama(model_config(s, "llama")), MoE(model_config(s, "moe"))
    x, y = torch.randint(0, s.vocab, (2, s.batch, s.block))
    models: dict[str, tuple[nn.Module, bool]] = {"dense": (dense, False), "moe": (moe, False)}
    for impl in hf_experts_impls():
        models[f"hf-{impl}"] = (hf_mixtral(moe.config, impl), True)
    best = time_models({k: make_step(m, x, y, hf) for k, (m, hf) in models.items()}, rounds, per_round, warmup)
    tokens = s.batch * s.block
    flops = {"dense": dense.flops_per_token()} | {k: moe.flops_per_token() for k in models if k != "dense"}
    return {
        "size": name, "shape": s, "tokens": tokens,
        "active": {"dense": dense.num_params(), "moe": moe.active_params()},
        "total": {k: sum(p.numel() for p in m.parameters()) for k, (m, _) in models.items()},
        "tok_s": {k: tokens / v for k, v in best.items()},
        "mfu": {k: flops[k] * tokens / v / peak if peak else None for k, v in best.items()},
    }


def _mfu(v: float | None) -> str:
    return f"{v:.1%}" if v is not None else "n/a"


def print_throughput(rows: list[dict]) -> None:
    print("\n## a. MoE vs dense (same active parameters)\n")
    print("| size | layers x dims, block, batch, vocab | active params dense / MoE | total MoE | dense tok/s | "
          "MoE tok/s | MoE / dense | dense MFU | MoE MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        s, a, t = r["shape"], r["active"], r["tok_s"]
        print(f"| {r['size']} | {s.n_layer} x {s.n_embd}, {s.block}, {s.batch}, {s.vocab} | "
              f"{a['dense'] / 1e6:.3f}M / {a['moe'] / 1e6:.3f}M | {r['total']['moe'] / 1e6:.2f}M | "
              f"{t['dense']:,.0f} | {t['moe']:,.0f} | **{t['moe'] / t['dense']:.2f}x** | "
              f"{_mfu(r['mfu']['dense'])} | {_mfu(r['mfu']['moe'])} |")
    print("\n(active MoE = dense + the routers' C x E per layer; target MoE / dense >= 0.7)")

    print("\n## b. ours vs HF MixtralForCausalLM (same config, loss, optimizer)\n")
    print("| size | HF experts impl | params ours / HF | ours tok/s | HF tok/s | ours / HF | ours MFU | HF MFU |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        t = r["tok_s"]
        for k in (k for k in t if k.startswith("hf-")):
            print(f"| {r['size']} | {k[3:]} | {r['total']['moe'] / 1e6:.2f}M / {r['total'][k] / 1e6:.2f}M | "
                  f"{t['moe']:,.0f} | {t[k]:,.0f} | **{t['moe'] / t[k]:.2f}x** | {_mfu(r['mfu']['moe'])} | "
                  f"{_mfu(r['mfu'][k])} |")
    print("\n(target ours / HF >= 1.5)")


# ------------------------------------------------------------------------------------------------
# quality


def quality(steps: int, out: Path, quick: bool) -> None:
    from scratchlm.config import get_preset
    from scratchlm.train.pretrain import prepare_run_data, pretrain
    from scratchlm.viz.routing import balance, draw, load_history

    root = out / "moe_vs_dense"
    runs: dict[str, Path] = {}
    results, tokens = {}, {}
    data_dir = None
    for label, preset in (("dense", "llama-tiny"), ("moe", "moe-tiny")):
        cfg = get_preset(preset)
        t = cfg.train
        t.max_steps, t.tensorboard, t.ckpt_interval = steps, False, 0
        t.eval_interval = max(steps // 12, 5)  # about a dozen validation points per curve
        t.log_interval = max(min(10, steps // 20), 1)
        t.warmup_steps = min(t.warmup_steps, max(steps // 10, 1))
        if quick:
            t.eval_iters = 4
        cfg.out_dir = str(root / label)
        if data_dir is None:  # one tokenizer and one set of shards for both: the same batches
            data_dir = prepare_run_data(cfg, root, None, progress=False)
        shutil.rmtree(cfg.out_dir, ignore_errors=True)  # a fresh run, never a resumed or appended one
        print(f"\n### training {preset} for {steps} steps", flush=True)
        results[label] = pretrain(cfg, data_dir, progress=False)
        runs[label] = Path(cfg.out_dir)
        tokens[label] = steps * t.batch_size * t.grad_accum * cfg.model.block_size

    png = out / "moe_vs_dense.png"
    plot_quality(runs, png)
    history = load_history(runs["moe"])
    draw(history, out / "moe_routing.png", title=f"moe-tiny, {steps} steps: share of each layer's assignments")
    print("\n## c. quality at the same token budget\n")
    print("| model | steps | tokens | final train loss | final val loss | val bits/byte | s |")
    print("|---|---|---|---|---|---|---|")
    for label, r in results.items():
        print(f"| {label} | {r.steps} | {tokens[label]:,} | {r.train_loss:.4f} | **{r.val_loss:.4f}** | "
              f"{r.val_bpb:.3f} | {r.seconds:.0f} |")
    print("\nMoE final balance (max / mean expert load; 1 = even, 8 = one expert takes all):\n")
    print("| layer | " + " | ".join(str(i) for i in history) + " |")
    print("|---|" + "---|" * len(history))
    print("| balance | " + " | ".join(f"{balance(loads)[-1]:.2f}" for _, loads in history.values()) + " |")
    print(f"\nwrote {png} and {out / 'moe_routing.png'}")


def _read(metrics: Path, key: str) -> tuple[list[int], list[float]]:
    import json

    pts = [(r["step"], r[key]) for r in map(json.loads, metrics.read_text(encoding="utf-8").splitlines())
           if isinstance(r.get(key), float)]
    return [p[0] for p in pts], [p[1] for p in pts]


def plot_quality(runs: dict[str, Path], png: Path) -> None:
    """Train (thin) and validation (markers) loss of both runs on one axis; the MoE balance beside."""
    from matplotlib.figure import Figure

    from scratchlm.viz.routing import balance, load_history

    fig = Figure(figsize=(11, 4), layout="constrained")
    ax, bx = fig.subplots(1, 2, width_ratios=[3, 2])
    colours = {"dense": "tab:blue", "moe": "tab:orange"}
    for label, run in runs.items():
        steps, loss = _read(run / "metrics.jsonl", "loss")
        ax.plot(steps, loss, color=colours[label], alpha=0.35, linewidth=1, label=f"{label} train")
        steps, val = _read(run / "metrics.jsonl", "val_loss")
        ax.plot(steps, val, "o-", color=colours[label], markersize=4, label=f"{label} validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.set_title("llama-tiny (dense) vs moe-tiny (8 experts, top-2), same active params", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    for layer, (steps, loads) in load_history(runs["moe"]).items():
        bx.plot(steps, balance(loads), linewidth=1, label=f"layer {layer}")
    bx.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    bx.set_xlabel("step")
    bx.set_ylabel("max / mean expert load")
    bx.set_title("MoE routing balance", fontsize=9)
    bx.legend(fontsize=8)
    bx.grid(alpha=0.3)
    with atomic_open(png, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


# ------------------------------------------------------------------------------------------------


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer timing rounds, 40 quality steps: a smoke test")
    p.add_argument("--sizes", default="demo-tiny,medium", help=f"comma-separated, of {', '.join(SIZES)}")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--quality-steps", type=int, default=None, help="steps per quality run (600; --quick: 40; 0: skip)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    import transformers

    from scratchlm.env import peak_flops

    peak = peak_flops("cpu", torch.float32)
    print("# MoE: vs dense at equal active parameters, vs HF Mixtral, and quality\n")
    print(f"- {cpu_name()}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads; python "
          f"{platform.python_version()}, torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"- measured fp32 matmul peak: {peak / 1e12:.3f} TFLOP/s; {N_EXPERTS} experts, top-{TOP_K}, dropless, "
          "softmax router, fp32")
    rounds, per_round, warmup = (2, 2, 1) if args.quick else (5, 5, 3)
    print(f"- best of {rounds} rounds x {per_round} steps after {warmup} warm-up steps, models alternating")
    rows = []
    for name in args.sizes.split(","):
        if name not in SIZES:
            p.error(f"unknown size {name!r}; known: {', '.join(SIZES)}")
        print(f"\n(timing {name} ...)", flush=True)
        rows.append(bench_size(name, rounds, per_round, warmup, peak))
    print_throughput(rows)

    steps = args.quality_steps if args.quality_steps is not None else (40 if args.quick else 600)
    if steps > 0:
        OUT.mkdir(parents=True, exist_ok=True)
        quality(steps, OUT, quick=args.quick)


if __name__ == "__main__":
    main()
