"""Data-parallel training on this machine: one process against two (DDP, FSDP2), side by side.

    python bench/scale.py [--steps 40] [--quick]

Each configuration trains the same model on the same data for the same steps with the same global
batch (`train.grad_accum` counts micro-batches over all ranks), launched as a user would, with
torchrun (`--standalone`), on the CPU with the gloo backend:

- 1 process x all cores (the plain run), 1 process x 1 thread (one rank's share of the cores),
- 2 processes x 1 thread, DDP and FSDP2.

Printed per configuration: tokens/s (global, the median of the logged windows after the first),
the ratio to the 1-process run on all cores, MFU against the matmul peak `scratchlm env` measured
for all the cores, the peak resident memory of each process (its VmHWM), and the final loss (the
same for every configuration: the runs are the same computation). On 2 cores there is little to
gain: a process per core does what one process's two threads did, plus the gradient all-reduce;
the point here is correctness and memory (FSDP keeps half the weights, gradients and AdamW moments
per process). GPUs are where the speed is (bench/gpu.py).
"""

from __future__ import annotations

import os
import sys

if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)  # bench/tokenizers.py would shadow HF's `tokenizers` package

import argparse
import json
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

MODEL = ["--model.n_layer=4", "--model.n_head=4", "--model.n_embd=256", "--model.block_size=128",
         "--model.dropout=0", "--tokenizer.vocab_size=2048"]
QUICK_MODEL = ["--model.n_layer=2", "--model.n_head=2", "--model.n_embd=64", "--model.block_size=32",
               "--model.dropout=0", "--tokenizer.vocab_size=512"]


def worker(out: str, argv: list[str]) -> int:
    """One rank: run the scratchlm command, then write this process's peak resident memory."""
    from scratchlm.cli import main

    code = main(argv)
    hwm = re.search(r"VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text())
    Path(f"{out}.{os.environ.get('RANK', '0')}").write_text(str(int(hwm.group(1)) * 1024 if hwm else 0))
    return code


def run(tmp: Path, name: str, nproc: int, threads: int, parallel: str, data: Path, common: list[str]) -> dict:
    out = tmp / name
    peak_file = tmp / f"{name}.peak"
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           os.path.abspath(__file__), "--worker", str(peak_file), "--",
           "pretrain", "--data", str(data), "--out", str(out), *common, f"--train.threads={threads}",
           f"--train.parallel={parallel}"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode:
        sys.exit(f"{name} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    windows = [r for r in records if "tokens_per_s" in r][1:]  # the first window holds the warm-up
    peaks = [int(Path(f"{peak_file}.{r}").read_text()) for r in range(nproc)]
    return {"name": name, "tps": statistics.median(r["tokens_per_s"] for r in windows),
            "mfu": statistics.median(r.get("mfu", float("nan")) for r in windows),
            "peak_mb": max(peaks) / 2**20, "loss": [r["loss"] for r in records if "loss" in r][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--quick", action="store_true", help="a tiny model and 10 steps (a smoke run)")
    args = ap.parse_args()
    steps = 10 if args.quick else args.steps
    cores = len(os.sched_getaffinity(0))
    common = ["--quiet", "--preset", "tiny", *(QUICK_MODEL if args.quick else MODEL), "--train.batch_size=8",
              "--train.grad_accum=2", f"--train.max_steps={steps}", "--train.warmup_steps=2",
              f"--train.log_interval={max(1, steps // 8)}", f"--train.eval_interval={steps}", "--train.eval_iters=1",
              "--train.ckpt_interval=0", "--train.precision=fp32", "--train.tensorboard=false", "--data.workers=1"]
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        from scratchlm.cli import main as cli

        # the data and tokenizer once (the embedded corpus), shared by every configuration
        prep = [a for a in common if not a.startswith("--train.")] + ["--train.max_steps=1",
                                                                      "--train.tensorboard=false"]
        assert cli(["pretrain", "--out", str(tmp / "prep"), *prep]) == 0
        data = tmp / "prep" / "data"
        rows = [run(tmp, f"1 process x {cores} threads", 1, cores, "none", data, common),
                run(tmp, "1 process x 1 thread", 1, 1, "none", data, common),
                run(tmp, "2 processes x 1 thread, DDP", 2, 1, "ddp", data, common),
                run(tmp, "2 processes x 1 thread, FSDP2", 2, 1, "fsdp", data, common)]
    base = rows[0]["tps"]
    print(f"\n{steps} steps of 16 sequences (8 per micro-batch, 2 micro-batches over all ranks); fp32; "
          f"{cores} cores; gloo\n")
    print("| configuration | tokens/s | vs 1 process | MFU | peak RSS per process | final loss |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['name']} | {r['tps']:,.0f} | {r['tps'] / base:.2f}x | {r['mfu']:.1%} | {r['peak_mb']:,.0f} MB "
              f"| {r['loss']:.6f} |")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        split = sys.argv.index("--")
        sys.exit(worker(sys.argv[2], sys.argv[split + 1:]))
    main()
