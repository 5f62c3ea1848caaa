"""nanoGPT's CPU "baby" result, reproduced: `python bench/shakespeare_char.py [--section.key=value ...]`.

nanoGPT's README trains on tinyshakespeare at the character level on a CPU with 4 layers, 4 heads,
128 dims, block 64, batch 12, 2,000 iterations, lr 1e-3 decaying to 1e-4, dropout 0, and the last
10% of the text as validation, and reports a validation loss of about 1.88. This script runs our
`char-tiny` preset (the same data split, model size, batch and iteration count) through our own
loop, then reports
- the loop's validation estimate (20 random batches, as nanoGPT measures it), and
- the loss over the whole validation split (every non-overlapping window), which is not noisy,
with the wall time on this machine. Overrides (e.g. `--train.lr=2e-3`) go to the config.
"""

from __future__ import annotations

import os
import sys

# bench/tokenizers.py would shadow HF's `tokenizers` package (imported by transformers): take this
# folder off the import path.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import sys
import tempfile
import time
from pathlib import Path

import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.config import apply_overrides, get_preset
from scratchlm.data.loader import BatchLoader, TokenShards
from scratchlm.train.loop import evaluate, token_bytes
from scratchlm.train.pretrain import pretrain

NANOGPT_VAL_LOSS = 1.88
DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "tinyshakespeare.txt"


def full_val_loss(run_dir: Path, data_dir: Path) -> tuple[float, float]:
    model, tok, cfg = load_model_for_inference(run_dir)
    shards = TokenShards(data_dir)
    loader = BatchLoader(shards, "val", 64, cfg.model.block_size, mode="sequential")
    iters = loader.windows_per_epoch() // 64
    return evaluate(model, loader, iters, torch.autocast("cpu", enabled=False), token_bytes(tok, cfg.model.vocab_size))


def main() -> None:
    if not DATA.exists():
        sys.exit(f"{DATA} is absent: this benchmark needs ../shared/data/tinyshakespeare.txt")
    cfg = apply_overrides(get_preset("char-tiny"), sys.argv[1:])
    with tempfile.TemporaryDirectory() as tmp:
        cfg.out_dir = str(Path(tmp) / "run")
        t0 = time.perf_counter()
        result = pretrain(cfg, inputs=[str(DATA)], progress=False)
        wall = time.perf_counter() - t0
        val, bpb = full_val_loss(Path(cfg.out_dir), Path(cfg.out_dir) / "data")
    t = cfg.train
    print("\n# shakespeare_char, nanoGPT's CPU configuration\n")
    print(f"model {cfg.model.n_layer}L/{cfg.model.n_head}H/{cfg.model.n_embd}d, block {cfg.model.block_size}, batch "
          f"{t.batch_size}, {t.max_steps} steps, lr {t.lr:g} -> {t.min_lr:g} ({t.schedule}), warmup {t.warmup_steps}\n")
    print("| measure | ours | nanoGPT |\n|---|---|---|")
    print(f"| val loss, 20 random batches (nanoGPT's estimate) | {result.val_loss:.4f} | ~{NANOGPT_VAL_LOSS} |")
    print(f"| val loss, whole validation split | {val:.4f} ({bpb:.3f} bits/byte) | |")
    print(f"| train loss at the end | {result.train_loss:.4f} | |")
    print(f"| wall time (data prep + training + evals) | {wall:.0f} s | |")
    print(f"| training throughput | {result.tokens_per_s / 1e3:.1f}k tokens/s | |")
    verdict = "meets" if val <= NANOGPT_VAL_LOSS else "misses"
    print(f"\nwhole-split validation loss {val:.4f} {verdict} the <= {NANOGPT_VAL_LOSS} target")


if __name__ == "__main__":
    main()
