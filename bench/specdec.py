"""Speculative decoding against plain decoding of the same target, batch 1, greedy.

    python bench/specdec.py [--size 9m|30m|100m] [--root runs/specdec-SIZE] [--threads 1] [--new 64] [--prompts 8]

Trains (once; reused from --root afterwards) a Llama target of --size on the embedded corpus (9m:
bytes, 6x384, 300 steps of 16x256 tokens; 30m: an 8,192 BPE, the llama-30m shape 8x512, 800 steps of
8x128; 100m: the same BPE, 14x768, 500 steps of 4x128; all in fp32, about 3, 24 and 30 minutes on a
2-core CPU), a smaller Llama draft the same way, and an EAGLE head on the target (`train_draft`, on the
target's training split only, drafting from the --draft-vocab most frequent ids); then, on held-out
prompts (the corpus's validation split), times `Engine.generate` against `SpeculativeDecoder` with
each draft kind and k, checks that the greedy tokens are identical, and prints tokens/s, the speed
ratio and the mean accepted length (tokens per target forward). Drafts run in bfloat16 (`load_draft`).
The rows are timed in --rounds interleaved rounds; the speed-up is the median over rounds of plain /
speculative time within a round (paired, so a drift in machine load cancels), with its range; tokens/s
is the best round. Absolute numbers are for this machine only.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.config import Config, LlamaConfig, SampleConfig
from scratchlm.data.loader import TokenShards
from scratchlm.data.prepare import prepare
from scratchlm.draft.train import DraftTrainSettings, train_draft
from scratchlm.eval.suite import heldout_texts
from scratchlm.infer.eagle import load_draft
from scratchlm.infer.engine import Engine
from scratchlm.infer.speculative import ModelDraft, SpeculativeDecoder
from scratchlm.io import atomic_open
from scratchlm.tokenizer import ByteTokenizer
from scratchlm.train.pretrain import prepare_run_data, pretrain

# BPE vocabulary (0 = bytes), target (layers, heads, kv heads, width), block size, steps, batch, lr, draft model
SIZES = {
    "9m": (0, (6, 6, 2, 384), 256, 300, 16, 3e-3, (1, 2, 1, 128)),
    "30m": (8192, (8, 8, 4, 512), 128, 800, 8, 1.5e-3, (2, 4, 2, 256)),
    "100m": (8192, (14, 12, 4, 768), 128, 500, 4, 1.5e-3, (2, 4, 2, 256)),
}


def llama(shape: tuple[int, int, int, int], block: int) -> LlamaConfig:
    n_layer, n_head, n_kv_head, n_embd = shape
    return LlamaConfig(block_size=block, n_layer=n_layer, n_head=n_head, n_kv_head=n_kv_head, n_embd=n_embd,
                       bias=False)


def train_lm(root: Path, name: str, model: LlamaConfig, steps: int, batch: int, lr: float) -> Path:
    out = root / name
    if (out / "metrics.jsonl").exists() and any(f'"step": {steps}, "val_loss"' in line for line in
                                                 (out / "metrics.jsonl").read_text().splitlines()):
        return out  # trained to the end; a run stopped part-way resumes from its last checkpoint below
    cfg = Config(name=name, out_dir=str(out))
    cfg.data.workers = 1
    cfg.model = model
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.min_lr, t.warmup_steps = steps, batch, lr, lr / 10, min(50, steps // 10)
    t.eval_interval, t.eval_iters, t.tensorboard, t.log_interval, t.precision = steps, 8, False, 50, "fp32"
    t.ckpt_interval, t.threads = 100, os.cpu_count() or 1  # all cores: auto would count a concurrent job's
    res = pretrain(cfg, root / "data", progress=True, resume=(out / "ckpt").exists())
    print(f"{name}: {steps} steps in {res.seconds / 60:.1f} min, held-out {res.val_bpb:.3f} bits/byte", flush=True)
    return out


def val_bpb(run: Path) -> float:
    """The run's last held-out bits per byte (its metrics.jsonl)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["val_bpb"] for r in records if "val_bpb" in r][-1]


def held_out_prompts(root: Path, n: int, length: int) -> list[list[int]]:
    shards = TokenShards(root / "data")
    step = max(1, (shards.tokens("val") - length) // n)
    return [shards.read("val", i * step, length).tolist() for i in range(n)]


def train_split_text(root: Path) -> Path:
    """The target's training split as JSONL, one document per line: the head trains on what the target
    trained on, never on the held-out documents the prompts come from (`heldout_texts` asserts the two
    splits share no document)."""
    out = root / "train-split.jsonl"
    if not out.exists():
        with atomic_open(out, "w", encoding="utf-8") as f:
            f.writelines(json.dumps({"text": d}) + "\n" for d in heldout_texts(root / "data")[1])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="9m", help="the target's size")
    ap.add_argument("--root", default="", help="default runs/specdec-SIZE")
    ap.add_argument("--steps", type=int, default=0, help="pretraining steps of the target and the draft model "
                                                            "(0 = the size's own)")
    ap.add_argument("--head-steps", type=int, default=800, help="the EAGLE head's training steps (8 x 128 tokens)")
    ap.add_argument("--draft-vocab", type=int, default=1024, help="the ids the head drafts from (0 = all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--new", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--repetition-penalty", type=float, default=1.3,
                    help="applied by plain and speculative decoding alike (1 = none): a small target's plain greedy "
                         "text loops, and a loop is easy to draft, which would inflate the accepted length")
    ap.add_argument("--ks", default="4,6,8")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    root = Path(args.root or f"runs/specdec-{args.size}")
    vocab, shape, block, steps, batch, lr, draft_shape = SIZES[args.size]
    steps = args.steps or steps
    if not (root / "data").exists():
        cfg = Config()
        cfg.data.workers = 1
        if vocab:  # the tokenizer trained on the corpus, as `scratchlm pretrain` does
            cfg.tokenizer.vocab_size = vocab
            prepare_run_data(cfg, root, None, progress=False)
        else:
            prepare(None, ByteTokenizer({"<|endoftext|>": 256}), cfg, root / "data", progress=False)
    target_dir = train_lm(root, "target", llama(shape, block), steps, batch, lr)
    draft_dir = train_lm(root, "draft", llama(draft_shape, block), 600, 16, 3e-3)
    target, tok, _ = load_model_for_inference(target_dir)
    head_dir = root / f"head-{args.head_steps}-v{args.draft_vocab}"
    if not (head_dir / "draft.json").exists():
        train_draft(target_dir, [str(train_split_text(root))], head_dir,
                    DraftTrainSettings(steps=args.head_steps, batch_size=8, seq_len=128, max_chars=0,
                                       draft_vocab=args.draft_vocab))
    head = json.loads((head_dir / "draft.json").read_text())
    draft_model, _, _ = load_model_for_inference(draft_dir)
    prompts = held_out_prompts(root, args.prompts, 32)
    cfg = SampleConfig(temperature=0.0, max_new_tokens=args.new, repetition_penalty=args.repetition_penalty)
    engine = Engine(target, tok)
    n_target = sum(p.numel() for p in target.parameters())
    n_draft = sum(p.numel() for p in draft_model.parameters())
    print(f"target {n_target / 1e6:.1f}M params ({val_bpb(target_dir):.3f} held-out bits/byte), draft model "
          f"{n_draft / 1e6:.2f}M ({val_bpb(draft_dir):.3f}), "
          f"{len(prompts)} held-out prompts x {args.new} new tokens, batch 1, greedy (repetition penalty "
          f"{args.repetition_penalty:g}), {args.threads} thread(s)")
    print(f"EAGLE head: {args.head_steps} steps on the target's training split, held-out top-1 agreement "
          f"{head['val_top1_agreement']:.3f}, drafting from {head['head']['draft_vocab'] or 'all'} ids "
          f"({head.get('draft_vocab_coverage', 1.0):.1%} of the training tokens)")

    runs = {("(none)", 0): lambda: [engine.generate([p], cfg)[0] for p in prompts]}
    specs = {}
    for kind in ("model", "eagle"):
        for k in (int(x) for x in args.ks.split(",")):
            draft = ModelDraft(draft_model.to(torch.bfloat16)) if kind == "model" else load_draft(head_dir, target, tok)
            specs[kind, k] = spec = SpeculativeDecoder(engine, draft, k)
            runs[kind, k] = lambda spec=spec: [spec.generate([p], cfg)[0] for p in prompts]
    times, same = {key: [] for key in runs}, dict.fromkeys(runs, True)
    for _ in range(args.rounds):  # interleaved, so a drift in machine load hits every row of a round alike
        for key, run in runs.items():
            t0 = time.perf_counter()
            out = run()
            times[key].append(time.perf_counter() - t0)
            if key == ("(none)", 0):
                ref = out
            same[key] &= out == ref
    n_tok = sum(map(len, ref))
    # the speed-up: plain / speculative time within each round (paired, so drift cancels), its median over rounds
    per_round = {key: [p / t for p, t in zip(times["(none)", 0], ts)] for key, ts in times.items()}
    ratio = {key: statistics.median(rs) for key, rs in per_round.items()}
    print(f"{'draft':<12}{'k':>3}{'tok/s':>9}{'x plain':>9}{'(min-max)':>12}{'accepted/fwd':>14}{'acceptance':>12}"
          f"{'identical':>11}")
    for (kind, k), ts in times.items():
        s = specs[kind, k].stats if k else None
        spread = f"{min(per_round[kind, k]):.2f}-{max(per_round[kind, k]):.2f}" if s else ""
        print(f"{kind:<12}{k or '':>3}{n_tok / min(ts):>9.1f}{ratio[kind, k]:>9.2f}{spread:>12}"
              f"{s.mean_accepted if s else 1.0:>14.2f}{f'{s.acceptance:.2f}' if s else '':>12}"
              f"{str(same[kind, k]) if s else '':>11}")
    plot(root / "specdec.png", ratio, specs, args.size)
    print(f"wrote {root / 'specdec.png'}")


def plot(png: Path, ratio: dict, specs: dict, size: str) -> None:
    """Speed-up over plain decoding and tokens per target forward, against k, one line per draft kind."""
    from matplotlib.figure import Figure

    from scratchlm.viz.attention import save_png

    fig = Figure(figsize=(10, 3.8), layout="constrained")
    ax, bx = fig.subplots(1, 2)
    for kind, colour in (("model", "tab:blue"), ("eagle", "tab:orange")):
        ks = sorted(k for (name, k) in specs if name == kind)
        label = "draft model" if kind == "model" else "EAGLE head"
        ax.plot(ks, [ratio[kind, k] for k in ks], "o-", color=colour, label=label)
        bx.plot(ks, [specs[kind, k].stats.mean_accepted for k in ks], "o-", color=colour, label=label)
    ks = sorted({k for (_, k) in specs})
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=0.8)
    bx.plot(ks, [k + 1 for k in ks], ":", color="grey", label="k + 1 (every draft accepted)")
    ax.set(xlabel="k (tokens drafted per target forward)", ylabel="tokens/s over plain decoding",
           title=f"speculative decoding, {size} target, batch 1, greedy")
    bx.set(xlabel="k", ylabel="tokens per target forward", title="mean accepted length")
    for a in (ax, bx):
        a.set_xticks(ks)
        a.grid(alpha=0.3)
        a.legend(fontsize=8)
    save_png(fig, png)


if __name__ == "__main__":
    main()
