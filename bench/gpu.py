"""GPT-2 124M training steps on a GPU: tokens/s and MFU against the GPU's datasheet bf16 peak.

    python bench/gpu.py [--steps 30] [--batch 16] [--no-compile] [--device cuda]
    python bench/gpu.py --device cpu --quick      # the same code path on a CPU, a tiny model (a smoke run)

The `gpt2-124m` preset (12 layers, 12 heads, 768 dims, context 1024, vocabulary 50,304) trains on
synthetic tokens (uniform random ids: the speed does not depend on the text, and a machine lent
for a few minutes has no corpus), with what a run on CUDA uses: bf16 autocast
(`train.precision=auto` picks it), fused AdamW (`train/optim.py`), SDPA's flash kernels (causal,
no mask), and `torch.compile` of each block (`train.compile`, applied from outside as the loop
does). A step is forward + backward + AdamW over one micro-batch; the first steps (compilation,
allocator warm-up) are not timed.

MFU = 6N-style training FLOPs per token (`GPT.flops_per_token`, attention included) x tokens/s,
over the GPU's dense bf16 datasheet peak (`scratchlm.env`'s `DATASHEET_PEAKS`; `--peak` overrides).
On a CPU the peak is the one `scratchlm env` measures. For scale: nanoGPT reports about 37% on an
A100 for this model, nanochat about 40% on an H100.
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # bench/tokenizers.py would shadow HF's `tokenizers` package

import argparse
import time

import torch

from scratchlm import env
from scratchlm.config import GPTConfig, get_preset
from scratchlm.model.gpt import GPT
from scratchlm.train.device import autocast_ctx, linear_shapes, pick_precision
from scratchlm.train.distributed import prepare_blocks
from scratchlm.train.optim import make_optimizer


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--steps", type=int, default=30, help="timed steps")
    ap.add_argument("--warmup", type=int, default=5, help="untimed steps first (compilation)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step")
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--peak", type=float, help="the peak FLOP/s to measure MFU against")
    ap.add_argument("--quick", action="store_true", help="a tiny model, 3 steps (CPU smoke run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit("bench/gpu.py: no CUDA GPU here (use --device cpu --quick for the CPU path)")
    cfg = get_preset("gpt2-124m")
    if args.quick:
        cfg.model = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512)
        args.steps, args.warmup, args.batch = 3, 1, 4
    cfg.model.dropout = 0.0
    cfg.train.compile = not args.no_compile and device.type == "cuda"
    torch.manual_seed(0)
    model = GPT(cfg.model).to(device)
    precision, why = pick_precision("auto", device, linear_shapes(model, args.batch * cfg.model.block_size))
    prepare_blocks(model, cfg.train)
    optimizer = make_optimizer(model, cfg.train)
    amp = autocast_ctx(precision, device)
    T, V = cfg.model.block_size, cfg.model.vocab_size
    g = torch.Generator(device).manual_seed(1)
    x = torch.randint(V, (args.batch, T + 1), device=device, generator=g)
    inputs, targets = x[:, :-1], x[:, 1:]

    def step() -> float:
        with amp:
            _, loss = model(inputs, targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(args.warmup):
        step()
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step().detach()
    sync()
    seconds = time.perf_counter() - t0
    tps = args.steps * args.batch * T / seconds
    flops = model.flops_per_token() * tps
    if args.peak:
        peak, source = args.peak, "--peak"
    else:  # CUDA: the datasheet's dense bf16 peak where known, else measured; a CPU: measured fp32
        peak, source = env.peak_with_source(str(device), torch.bfloat16 if device.type == "cuda" else torch.float32)
    print(f"model: {model.num_params() / 1e6:.1f}M params (non-embedding), context {T}, batch {args.batch}; "
          f"device {device}, precision {precision} ({why}), compile {cfg.train.compile}, fused AdamW")
    print(f"{args.steps} steps in {seconds:.2f}s: {tps:,.0f} tokens/s, {flops / 1e12:,.3f} TFLOP/s of model FLOPs, "
          f"loss {float(loss):.3f}")
    print(f"MFU {flops / peak:.1%} of {peak / 1e12:.1f} TFLOP/s ({source})")
    if device.type == "cuda":
        print(f"peak GPU memory {torch.cuda.max_memory_allocated(device) / 2**30:.1f} GiB")


if __name__ == "__main__":
    main()
