"""`scratchlm eval`'s bits per byte against lm-evaluation-harness on the same model, side by side in one process.

    python bench/eval.py [--quick] [--docs 12] [--rounds 3] [--threads N]

One GPT with random weights (6 layers, width 384, context 256, a BPE of 8,192 trained here on the
embedded corpus; `--quick`: 2 layers, width 128, context 128, 20 documents' worth less) is saved as a
run and exported to HF transformers (`scratchlm convert`). The documents are KJV chapters the
tokenizer did not train on. Three ways score them, each token once with lm-eval's rolling windows:
- ours: `scratchlm.eval.perplexity.score_documents` (our windows, batched by `loglik.score_tails`);
- lm-eval + our adapter: `ScratchLM.loglikelihood_rolling` (lm-eval's own windows, the same forward);
- lm-eval + HF: `HFLM.loglikelihood_rolling` on the export (fp32, batch size 8, HF's SDPA attention).
Each way runs once to warm up, then they alternate for `--rounds` rounds, best round counts, so drifts in
machine load hit all alike. Printed: bits per byte for each (they must agree to 1e-4), tokens scored per
second, the ratios ours / HF and adapter / HF (above 1 = ours faster), and MFU: forward FLOPs (counted by
`torch.utils.flop_counter` on one full window, times the windows run) over the fp32 matmul peak `scratchlm
env` measures. Absolute numbers are for this machine only; the ratio is the claim.
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
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.flop_counter import FlopCounterMode

from scratchlm.checkpoint import save_checkpoint
from scratchlm.config import Config, GPTConfig, TokenizerConfig
from scratchlm.convert.hf import export_hf
from scratchlm.data.sources import kjv_chapters
from scratchlm.env import peak_flops
from scratchlm.eval.loglik import rolling_windows
from scratchlm.eval.perplexity import overall, score_documents
from scratchlm.model import build_model, padded_vocab
from scratchlm.tokenizer.bpe import train_bpe


def build(root: Path, quick: bool) -> tuple[torch.nn.Module, object, Path]:
    chapters = kjv_chapters()
    tok = train_bpe(chapters[:300], 2048 if quick else 8192, "gpt4", ["<|endoftext|>"], progress=False)
    cfg = Config(name="bench-eval", out_dir=str(root / "run"))
    cfg.tokenizer = TokenizerConfig(kind=tok.kind, vocab_size=tok.vocab_size, special_tokens=list(tok.special_tokens))
    cfg.model = (GPTConfig(block_size=128, n_layer=2, n_head=4, n_embd=128) if quick else
                 GPTConfig(block_size=256, n_layer=6, n_head=6, n_embd=384))
    cfg.model.vocab_size = padded_vocab(cfg.model, tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    save_checkpoint(root / "run", 0, model, torch.optim.AdamW(model.parameters()), cfg, tok, {"best_val_loss": None})
    return model, tok, export_hf(root / "run", root / "hf")


def forward_flops(model: torch.nn.Module, T: int) -> float:
    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, T, dtype=torch.long))
    return float(counter.get_total_flops())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="a smaller model and fewer documents")
    p.add_argument("--docs", type=int, default=12, help="KJV chapters to score")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from scratchlm.eval.lm_eval import ScratchLM

    with tempfile.TemporaryDirectory() as tmp:
        model, tok, hf_dir = build(Path(tmp), args.quick)
        L = model.config.block_size
        docs = kjv_chapters()[-(4 if args.quick else args.docs):]  # chapters the tokenizer never saw
        requests = [Instance(request_type="loglikelihood_rolling", doc={}, arguments=(d,), idx=i)
                    for i, d in enumerate(docs)]
        lengths = [len(tok.encode_ordinary(d)) for d in docs]
        windows = [w for n in lengths for w in rolling_windows(n, L)]
        positions = sum(end - start for start, end, _ in windows)
        per_window = forward_flops(model, L) / L  # FLOPs per position of a full window (attention included)
        flops = per_window * positions
        hf = HFLM(pretrained=str(hf_dir), dtype="float32", device="cpu", batch_size=8)
        adapter = ScratchLM(model=model, tokenizer=tok, device="cpu")

        def ours() -> float:
            return overall(score_documents(model, tok, [(str(i), d) for i, d in enumerate(docs)]))["bits_per_byte"]

        def via(lm) -> float:
            nll = -sum(lm.loglikelihood_rolling(requests, disable_tqdm=True))
            return nll / torch.log(torch.tensor(2.0)).item() / sum(len(d.encode("utf-8")) for d in docs)

        ways = {"ours": ours, "lm-eval + adapter": lambda: via(adapter), "lm-eval + HF": lambda: via(hf)}
        bpb = {name: fn() for name, fn in ways.items()}  # warm-up, and the numbers compared
        best = {name: float("inf") for name in ways}
        for _ in range(args.rounds):
            for name, fn in ways.items():
                t0 = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - t0)
        peak = peak_flops("cpu", torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
              f"{torch.get_num_threads()} threads; fp32 matmul peak {peak / 1e9:.1f} GFLOP/s")
        print(f"model: GPT {model.config.n_layer}x{model.config.n_embd}, context {L}, vocab {model.config.vocab_size}, "
              f"{n_params / 1e6:.1f}M parameters; {len(docs)} documents, {sum(lengths):,} tokens, "
              f"{len(windows)} windows ({positions:,} positions run)")
        print("| way | bits/byte | |diff| to ours | tokens/s | speed / lm-eval + HF | MFU |")
        print("|---|---|---|---|---|---|")
        for name in ways:
            tps = sum(lengths) / best[name]
            ratio = best["lm-eval + HF"] / best[name]
            print(f"| {name} | {bpb[name]:.6f} | {abs(bpb[name] - bpb['ours']):.1e} | {tps:,.0f} | {ratio:.2f} | "
                  f"{flops / best[name] / peak:.1%} |")
        assert all(abs(v - bpb["ours"]) < 1e-4 for v in bpb.values()), "the three ways disagree"


if __name__ == "__main__":
    main()
