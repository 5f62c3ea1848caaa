"""The real check of the GGUF export: llama.cpp itself runs our model and continues like we do.

    pip install llama-cpp-python        # builds llama.cpp from source (about 10 minutes on 2 cores)
    python bench/gguf_llamacpp.py [--ckpt RUN | --arch llama|gpt] [--root runs/gguf_llamacpp] [--steps 300]
                                  [--new 32] [--kv-cache f32|f16]

Without --ckpt it trains (once; reused from --root afterwards) a small Llama (or GPT) with a BPE tokenizer
(GPT-4's split regex, 1,000 tokens, so the embedding's 24 padding rows become placeholder tokens)
on the embedded corpus. The model is exported to an F32 GGUF file with `scratchlm convert`'s
exporter and loaded by llama.cpp (`llama_cpp.Llama`, CPU). Then:

- tokenization: llama.cpp's tokenizer (reading our vocabulary, merges and pre-tokenizer name from
  the file) against ours on the prompts and a few harder strings;
- greedy continuation of three prompts: llama.cpp's argmax over its logits, token by token,
  against `Engine.generate` (temperature 0); both choose among the tokenizer's ids only;
- log-probabilities: log-softmax of both logits at every step, the largest difference over
  the chosen tokens and over the whole vocabulary. llama.cpp keeps its KV cache in f16 by default,
  which alone moves them by ~1e-3; this script asks for an f32 cache unless --kv-cache f16.

It exits 1 if any token differs or a log-probability differs by more than --tol. llama-cpp-python
is not a dependency of scratchlm and the test suite never needs it; without it this script
prints the install command and exits 2.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from gguf import GGMLQuantizationType

from scratchlm.checkpoint import find_checkpoint, load_model_for_inference
from scratchlm.config import Config, GPTConfig, LlamaConfig, SampleConfig
from scratchlm.convert import export_gguf
from scratchlm.data.prepare import prepare
from scratchlm.data.sources import kjv_chapters
from scratchlm.infer.engine import Engine
from scratchlm.tokenizer import train_bpe
from scratchlm.train.pretrain import pretrain

PROMPTS = ["In the beginning God created", "And the LORD spake unto Moses, saying,", "Blessed are the"]
HARD = ["It can't be 32.5 feet, naïvely!\n\n  spaces\tand ünïcödé 🙂", "x = [1, 22, 333, 4444];\r\n",
        "WHEREFORE 'tis  done'S"]


def train_model(root: Path, steps: int, arch: str) -> Path:
    out = root / ("model" if arch == "llama" else f"model-{arch}")
    if (out / "ckpt").exists():
        return out
    t0 = time.perf_counter()
    cfg = Config(name="gguf-bench", out_dir=str(out))
    cfg.data.workers = 1
    if not (root / "data").exists():
        tok = train_bpe(kjv_chapters()[:300], 1000, "gpt4", ["<|endoftext|>"], progress=False)
        prepare(None, tok, cfg, root / "data", progress=False)
    if arch == "llama":
        cfg.model = LlamaConfig(block_size=128, n_layer=4, n_head=4, n_kv_head=2, n_embd=128, bias=False,
                                tie_embeddings=False)
    else:
        cfg.model = GPTConfig(block_size=128, n_layer=4, n_head=4, n_embd=128)
    t = cfg.train
    t.max_steps, t.batch_size, t.lr, t.warmup_steps = steps, 16, 3e-3, 20
    t.eval_interval, t.eval_iters, t.tensorboard, t.log_interval, t.precision = steps, 4, False, 100, "fp32"
    pretrain(cfg, root / "data", progress=False)
    print(f"trained {out} ({steps} steps) in {time.perf_counter() - t0:.0f} s")
    return out


def llama_greedy(llm, prompt: list[int], n: int, valid: int, eos: int | None) -> tuple[list[int], torch.Tensor]:
    """llama.cpp's greedy continuation (argmax over the tokenizer's ids) and its logits at each step (n, V)."""
    llm.reset()
    llm.eval(prompt)
    out, steps = [], []
    for _ in range(n):
        logits = torch.tensor(llm.scores[llm.n_tokens - 1], dtype=torch.float64)
        steps.append(logits)
        nxt = int(logits[:valid].argmax())
        if nxt == eos:
            break
        out.append(nxt)
        llm.eval([nxt])
    return out, torch.stack(steps)


def recorder(seen: list[torch.Tensor]):
    """An `on_logits` callback keeping row 0's logits of every step, in float64."""
    return lambda rows, logits: seen.append(logits[0].double().clone())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ckpt", help="a trained Llama run or checkpoint (default: train one into --root)")
    ap.add_argument("--root", default="runs/gguf_llamacpp")
    ap.add_argument("--steps", type=int, default=300, help="pretraining steps when no --ckpt is given")
    ap.add_argument("--new", type=int, default=32, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--arch", choices=["llama", "gpt"], default="llama", help="the model trained without --ckpt")
    ap.add_argument("--kv-cache", choices=["f32", "f16"], default="f32",
                    help="llama.cpp's KV cache type (its own default, f16, alone moves log-probs by ~1e-3)")
    ap.add_argument("--tol", type=float, default=1e-3, help="largest log-probability difference allowed")
    args = ap.parse_args()
    try:
        import llama_cpp
    except ImportError:
        print("llama-cpp-python is not installed; build it (from source, CPU) with:\n"
              "    pip install llama-cpp-python", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    root = Path(args.root)
    run = Path(args.ckpt) if args.ckpt else train_model(root, args.steps, args.arch)
    gguf = export_gguf(run, root / f"{run.name}.gguf", dtype="f32")
    cache_type = int(GGMLQuantizationType.F32 if args.kv_cache == "f32" else GGMLQuantizationType.F16)

    model, tok, cfg = load_model_for_inference(find_checkpoint(run))
    model.eval()
    llm = llama_cpp.Llama(model_path=str(gguf), n_ctx=cfg.model.block_size, n_threads=args.threads,
                          n_batch=cfg.model.block_size, logits_all=True, verbose=False,
                          type_k=cache_type, type_v=cache_type)
    print(f"llama.cpp {getattr(llama_cpp, '__version__', '?')} loaded {gguf}: n_vocab {llm.n_vocab()}, "
          f"n_ctx {llm.n_ctx()}")

    tok_ok = True
    for text in PROMPTS + HARD:
        ours, theirs = tok.encode(text), llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
        tok_ok &= ours == theirs
        print(f"tokens {'same' if ours == theirs else 'DIFFER'}: {text!r} ({len(ours)} ours, {len(theirs)} llama.cpp)")

    engine = Engine(model, tok)
    sc = SampleConfig(temperature=0.0, max_new_tokens=args.new)
    worst_chosen = worst_all = 0.0
    same_all = True
    for text in PROMPTS:
        prompt = tok.encode(text)
        seen: list[torch.Tensor] = []
        ours = engine.generate([prompt], sc, on_logits=recorder(seen))[0]
        theirs, their_logits = llama_greedy(llm, prompt, args.new, tok.vocab_size, tok.eot_id)
        n = min(len(seen), len(their_logits))
        lp_ours = torch.log_softmax(torch.stack(seen[:n]), -1)
        lp_theirs = torch.log_softmax(their_logits[:n], -1)
        chosen = torch.tensor((ours + [tok.eot_id or 0])[:n])
        d_chosen = (lp_ours.gather(1, chosen[:, None]) - lp_theirs.gather(1, chosen[:, None])).abs().max().item()
        d_all = (lp_ours - lp_theirs).abs().max().item()
        worst_chosen, worst_all = max(worst_chosen, d_chosen), max(worst_all, d_all)
        same = ours == theirs
        same_all &= same
        first = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        print(f"{text!r}: {len(ours)} tokens, {'identical' if same else f'DIFFER from token {first}'}; "
              f"max |dlogp| chosen {d_chosen:.2e}, all {d_all:.2e}")
        print(f"    ours:      {tok.decode(ours)!r}")
        if not same:
            print(f"    llama.cpp: {tok.decode(theirs)!r}")
    ok = same_all and tok_ok and worst_chosen <= args.tol
    print(f"{'PASS' if ok else 'FAIL'}: greedy tokens {'identical' if same_all else 'differ'} on {len(PROMPTS)} "
          f"prompts, tokenization {'identical' if tok_ok else 'differs'}, max |dlogp| {worst_chosen:.2e} on chosen "
          f"tokens ({worst_all:.2e} over the vocabulary; tolerance {args.tol:g})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
