"""Our GPT's training step against HF transformers' GPT2LMHeadModel, side by side in one process.

    python bench/gpt_train.py [--quick] [--sizes char-tiny,30m] [--precision fp32,bf16]

Both models get the same configuration (layers, heads, width, context, vocabulary, dropout 0,
tied head), the same batch, the same loss (cross-entropy over every position: HF's from its
logits, outside its model; ours inside, fused with the output head so the (B, T, V) logits are
never built, `scratchlm.losses.linear_cross_entropy`), and the same optimizer: fused `torch.optim.AdamW` with
weight decay on matrices only. HF runs with `attn_implementation="sdpa"`, its fastest CPU
attention. A step is forward + backward + AdamW. The two models alternate in rounds (warm-up
first) so drifts in machine speed hit both alike; the best round per model counts.

Printed: tokens/s for each, the ratio ours / HF (above 1 = ours faster), and MFU for each
(training FLOPs from `GPT.flops_per_token`, for both models since the work is the same, over
the matmul peak `scratchlm env` measures for the dtype). Absolute numbers are for this machine
only; the ratio is the claim.
"""

from __future__ import annotations

import os
import sys

# bench/tokenizers.py would shadow HF's `tokenizers` package (imported by transformers): take this
# folder off the import path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import contextlib
import platform
import time

import torch
import torch.nn.functional as F

from scratchlm.config import GPTConfig, TrainConfig
from scratchlm.model.gpt import GPT
from scratchlm.train.optim import make_optimizer

SIZES = {
    # name: (n_layer, n_head, n_embd, block_size, vocab, batch)
    "char-tiny": (4, 4, 128, 64, 128, 12),
    "30m": (8, 8, 512, 256, 8192, 8),
}


def hf_model(n_layer: int, n_head: int, n_embd: int, block: int, vocab: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=vocab, n_positions=block, n_embd=n_embd, n_layer=n_layer, n_head=n_head,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, tie_word_embeddings=True,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg, attn_implementation="sdpa") if _accepts_attn_kw() else GPT2LMHeadModel(cfg)


def _accepts_attn_kw() -> bool:
    import inspect

    from transformers import GPT2LMHeadModel

    return "attn_implementation" in inspect.signature(GPT2LMHeadModel.__init__).parameters


def make_step(model, opt, x, y, amp, is_hf: bool):
    def step() -> float:
        with amp:
            if is_hf:
                logits = model(input_ids=x).logits
                loss = F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())
            else:
                _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return step


def bench_size(name: str, precision: str, rounds: int, steps: int, peak: float | None) -> dict:
    L, H, C, T, V, B = SIZES[name]
    torch.manual_seed(0)
    ours = GPT(GPTConfig(vocab_size=V, block_size=T, n_layer=L, n_head=H, n_embd=C, dropout=0.0))
    hf = hf_model(L, H, C, T, V)
    tcfg = TrainConfig(lr=1e-4)
    x, y = torch.randint(0, V, (2, B, T))
    amp = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    steps_fn = {"ours": make_step(ours, make_optimizer(ours, tcfg), x, y, amp, False),
                "hf": make_step(hf, make_optimizer(hf, tcfg), x, y, amp, True)}
    for fn in steps_fn.values():  # warm-up
        for _ in range(3):
            fn()
    best = {k: float("inf") for k in steps_fn}
    for _ in range(rounds):
        for k, fn in steps_fn.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                fn()
            best[k] = min(best[k], (time.perf_counter() - t0) / steps)
    tokens = B * T
    flops = ours.flops_per_token() * tokens
    n_ours = ours.num_params(non_embedding=False)
    n_hf = sum(p.numel() for p in hf.parameters())
    row = {"size": name, "precision": precision, "params_ours": n_ours, "params_hf": n_hf, "batch": f"{B}x{T}"}
    for k in steps_fn:
        row[f"{k}_tok_s"] = tokens / best[k]
        row[f"{k}_mfu"] = flops / best[k] / peak if peak else None
    row["ratio"] = row["ours_tok_s"] / row["hf_tok_s"]
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--sizes", default="char-tiny,30m")
    p.add_argument("--precision", default="fp32,bf16")
    args = p.parse_args()
    torch.set_flush_denormal(True)
    import transformers

    from scratchlm.env import peak_flops

    print("# GPT training step: scratchlm vs HF transformers GPT2LMHeadModel\n")
    print(f"- {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads; torch "
          f"{torch.__version__}, transformers {transformers.__version__}")
    rounds, steps = (2, 3) if args.quick else (5, 10)
    rows = []
    for precision in args.precision.split(","):
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        peak = peak_flops("cpu", dtype)
        print(f"- measured {precision} matmul peak: {peak / 1e12:.2f} TFLOP/s")
        for name in args.sizes.split(","):
            rows.append(bench_size(name, precision, rounds, steps, peak))
    print(f"\nbest of {rounds} rounds x {steps} steps, after warm-up; ratio = ours / HF tokens per second "
          "(above 1: ours faster)\n")
    print("| size | precision | params (ours / HF) | batch | ours tok/s | HF tok/s | ratio | ours MFU | HF MFU |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mfu = lambda v: f"{v:.0%}" if v is not None else "n/a"  # noqa: E731
        print(f"| {r['size']} | {r['precision']} | {r['params_ours'] / 1e6:.2f}M / {r['params_hf'] / 1e6:.2f}M | "
              f"{r['batch']} | {r['ours_tok_s']:,.0f} | {r['hf_tok_s']:,.0f} | **{r['ratio']:.2f}x** | "
              f"{mfu(r['ours_mfu'])} | {mfu(r['hf_mfu'])} |")


if __name__ == "__main__":
    main()
