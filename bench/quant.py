"""Post-training quantization, measured: quality on a trained model, decode speed on Llama sizes, in one process.

    python bench/quant.py --ckpt RUN/pretrain --data RUN/data [--sizes 30m,125m] [--new 32] [--rounds 3] [--quick]

Quality (needs a trained checkpoint and its prepared data, e.g. a `scratchlm demo` run's `pretrain/` and
`data/`): every `scratchlm quantize` method (int8, fp8, int4, nf4 round-to-nearest; gptq and awq int4
fitted on the training split; bf16) through the verb's own function; bytes on disk of the weights file and held-out
bits per byte, with the change against fp32, and for int4 methods the share of the int4-RTN gap to fp32
each one closes. Bits per byte are scored on the first --val-bytes of the validation split (whole
documents; the same ones for every method) by each saved checkpoint loaded back as `sample` and `eval`
load it.

Speed (random weights, which decode at the same speed as trained ones): the `llama-30m` and `llama-125m`
presets (8,192 and 32,768 vocabularies) in fp32, bf16 (every weight in bf16, as `scratchlm quantize --method
bf16` stores and loads it: a 2-byte format) and each quantized format, with the reference matmul path
(dequantize, then an fp32 matmul) and with the fastest path this machine offers
(`scratchlm.model.qkernels.use_fastest_kernels`, measured here); greedy decoding through the one Engine of a
32-token prompt at batch 1 and 8, `--new` tokens. The formats alternate in rounds after a warm-up, best round
counts. Printed: tokens/s and the ratio to fp32 (above 1 = faster). Absolute numbers are for this machine
only.
"""

from __future__ import annotations

import argparse
import itertools
import platform
import tempfile
import time
from pathlib import Path

import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.config import SampleConfig, get_preset
from scratchlm.eval.suite import heldout_texts
from scratchlm.infer.engine import Engine
from scratchlm.model import build_model
from scratchlm.model.qkernels import use_fastest_kernels
from scratchlm.model.quant import quantize_model
from scratchlm.quantize.stage import METHODS, heldout_bpb, quantize_checkpoint

SIZES = {"30m": "llama-30m", "125m": "llama-125m"}


def weights_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*.safetensors"))


def quality(ckpt: str, data: str, val_bytes: int, quiet: bool, methods: list[str]) -> None:
    val = heldout_texts(data)[0]
    before = [0, *itertools.accumulate(len(t.encode()) for t in val)]  # bytes ahead of each document
    texts = [t for t, b in zip(val, before) if b < val_bytes]
    n_bytes = sum(len(t.encode()) for t in texts)
    model, tok, _ = load_model_for_inference(ckpt)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"\n## Quality: {ckpt} ({n_params / 1e6:.1f}M parameters), the first {len(texts)} held-out documents "
          f"({n_bytes:,} bytes) of {data}\n")
    fp32_bpb = heldout_bpb(model, tok, texts)
    print(f"  fp32: {fp32_bpb:.4f} bits/byte", flush=True)  # each row as it comes: a 100M model takes a while
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in methods:
            out = Path(tmp) / method
            res = quantize_checkpoint(ckpt, out, method, calib=data, measure=False,
                                      log=(lambda s: None) if quiet else print)
            qmodel, qtok, _ = load_model_for_inference(out)  # the saved checkpoint, as sample/eval load it
            rows.append((method, weights_bytes(out), res.bytes_before, heldout_bpb(qmodel, qtok, texts)))
            print(f"  {method}: {rows[-1][3]:.4f} bits/byte", flush=True)
    fp32_bytes = rows[0][2]
    rtn_gap = next((r[3] for r in rows if r[0] == "int4"), fp32_bpb) - fp32_bpb
    print("| method | weights on disk | vs fp32 | bits/byte | change vs fp32 | int4-RTN gap closed |")
    print("|---|---|---|---|---|---|")
    print(f"| fp32 | {fp32_bytes / 1e6:.2f} MB | 1.00 | {fp32_bpb:.4f} | | |")
    for method, nbytes, _, bpb in rows:
        closed = f"{1 - (bpb - fp32_bpb) / rtn_gap:.0%}" if method in ("gptq", "awq") and rtn_gap > 0 else ""
        print(f"| {method} | {nbytes / 1e6:.2f} MB | {nbytes / fp32_bytes:.2f} | {bpb:.4f} | "
              f"{(bpb - fp32_bpb) / fp32_bpb:+.2%} | {closed} |")


def speed(size: str, new: int, rounds: int) -> None:
    cfg = get_preset(SIZES[size])
    mcfg = cfg.model
    mcfg.vocab_size = cfg.tokenizer.vocab_size
    torch.manual_seed(0)
    base = build_model(mcfg).eval()
    n_params = sum(p.numel() for p in base.parameters())
    variants: dict[str, torch.nn.Module] = {"fp32": base, "bf16": build_model(mcfg).eval().to(torch.bfloat16)}
    variants["bf16"].load_state_dict({k: v.to(torch.bfloat16) for k, v in base.state_dict().items()})
    for fmt in ("int8", "fp8", "int4", "nf4"):
        for fast in (False, True):
            m = build_model(mcfg).eval()
            m.load_state_dict(base.state_dict())
            quantize_model(m, fmt=fmt)
            name = f"{fmt} reference"
            if fast:
                counts = use_fastest_kernels(m)
                name = f"{fmt} fastest ({', '.join(sorted(counts))})"
            variants[name] = m
    gen = torch.Generator().manual_seed(0)
    prompts = {b: torch.randint(0, mcfg.vocab_size, (b, 32), generator=gen).tolist() for b in (1, 8)}
    sample = SampleConfig(max_new_tokens=new, temperature=0.0, stream=False)

    def run(model, b):
        Engine(model).generate(prompts[b], sample, valid_vocab=mcfg.vocab_size)

    best = {(name, b): float("inf") for name in variants for b in (1, 8)}
    for m in variants.values():  # warm-up
        for b in (1, 8):
            run(m, b)
    for _ in range(rounds):
        for name, m in variants.items():
            for b in (1, 8):
                t0 = time.perf_counter()
                run(m, b)
                best[name, b] = min(best[name, b], time.perf_counter() - t0)
    print(f"\n## Decode speed: {SIZES[size]} ({n_params / 1e6:.0f}M parameters, random weights), greedy, 32-token "
          f"prompt, {new} new tokens\n")
    print("| format | batch 1 tokens/s | vs fp32 | batch 8 tokens/s | vs fp32 |")
    print("|---|---|---|---|---|")
    for name in variants:
        cells = []
        for b in (1, 8):
            tps = b * new / best[name, b]
            cells += [f"{tps:,.1f}", f"{best['fp32', b] / best[name, b]:.2f}"]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", help="a trained checkpoint for the quality table")
    p.add_argument("--data", help="its prepared data folder (calibration: training split; held-out: validation)")
    p.add_argument("--val-bytes", type=int, default=40_000,
                   help="held-out bytes scored per method (whole documents from the start of the split; 0 = all)")
    p.add_argument("--sizes", default="30m,125m", help="speed-table presets; '' = none")
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="30m only, 8 new tokens, 1 round")
    p.add_argument("--methods", default=",".join(METHODS), help="the quality table's methods (default: all)")
    args = p.parse_args()
    methods = [m for m in args.methods.split(",") if m]
    if bad := sorted(set(methods) - set(METHODS)):
        p.error(f"--methods: {', '.join(bad)} unknown; choose from {', '.join(METHODS)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    if args.ckpt and args.data:
        quality(args.ckpt, args.data, args.val_bytes or 1 << 62, quiet=True, methods=methods)
    else:
        print("quality: skipped (pass --ckpt RUN and --data DIR, e.g. a demo run's pretrain/ and data/)")
    sizes = ["30m"] if args.quick else [s for s in args.sizes.split(",") if s]
    for size in sizes:
        speed(size, 8 if args.quick else args.new, 1 if args.quick else args.rounds)


if __name__ == "__main__":
    main()
