"""The server under concurrent streaming clients: aggregate tokens/s, time to first token, inter-token latency.

    python bench/serve.py [--ckpt RUN] [--clients 1,4,16,64] [--tokens 64] [--threads 1]

Starts `scratchlm serve`'s app on a free loopback port in this process (uvicorn in a thread) over --ckpt,
or over a random byte-level Llama (--embd 256, --layers 4 by default; no EOS, so every reply runs to --tokens), then for
each client count C sends C streaming completions at once from C threads with the official `openai` client
and reports aggregate tokens/s, p50/p95 time to first token and inter-token gap, and errors; last, the same
16 requests one after another, for the continuous-batching speed-up (16 concurrent / 16 sequential); and with
--memory N, N more short requests in waves of 16, printing this process's resident memory (server and clients)
after the first 100 and after all N: it should stay flat.
Numbers are for this machine only; the client threads share its cores with the server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import openai
import torch

from scratchlm.checkpoint import save_checkpoint
from scratchlm.config import Config, LlamaConfig, TokenizerConfig
from scratchlm.model import build_model, padded_vocab
from scratchlm.serve.api import Settings
from scratchlm.serve.stage import build_app, serve_in_thread
from scratchlm.tokenizer import ByteTokenizer

PROMPTS = ["In the beginning ", "And the earth was ", "Let there be ", "And God called the light ",
           "The quick brown fox ", "Once upon a time ", "It was a dark and ", "Call me "]


def random_checkpoint(root: Path, n_embd: int, n_layer: int) -> Path:
    tok = ByteTokenizer({"<|endoftext|>": 256})
    cfg = Config(name="bench", out_dir=str(root))
    cfg.tokenizer = TokenizerConfig(kind=tok.kind, vocab_size=tok.vocab_size, special_tokens=list(tok.special_tokens))
    cfg.model = LlamaConfig(block_size=512, n_layer=n_layer, n_head=8, n_kv_head=2, n_embd=n_embd, bias=False)
    cfg.model.vocab_size = padded_vocab(cfg.model, tok.vocab_size)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    with torch.no_grad():
        model.output.weight[tok.eot_id] = 0.0
        model.output.weight.mul_(50.0)  # spread logits: EOS (logit 0) is never the most likely
    save_checkpoint(root, 0, model, torch.optim.AdamW(model.parameters()), cfg, tok, {"best_val_loss": None})
    return root


def one(client: openai.OpenAI, prompt: str, tokens: int, out: list) -> None:
    start = time.perf_counter()
    stamps = []
    try:
        for chunk in client.completions.create(model="bench", prompt=prompt, max_tokens=tokens, temperature=0,
                                               stream=True, stream_options={"include_usage": True}):
            if chunk.choices and chunk.choices[0].text:
                stamps.append(time.perf_counter())
            if chunk.usage is not None:
                n = chunk.usage.completion_tokens
        out.append((start, stamps, n, None))
    except Exception as e:  # noqa: BLE001 - counted and reported
        out.append((start, stamps, 0, f"{type(e).__name__}: {e}"))


def pct(xs: list[float], q: float) -> float:
    return statistics.quantiles(xs, n=100)[q - 1] if len(xs) > 1 else (xs[0] if xs else float("nan"))


def run(client: openai.OpenAI, clients: int, tokens: int, sequential: bool = False) -> dict:
    results: list = []
    t0 = time.perf_counter()
    if sequential:
        for i in range(clients):
            one(client, PROMPTS[i % len(PROMPTS)], tokens, results)
    else:
        threads = [threading.Thread(target=one, args=(client, PROMPTS[i % len(PROMPTS)], tokens, results))
                   for i in range(clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    wall = time.perf_counter() - t0
    ttft = [s[0] - start for start, s, _, err in results if s and not err]
    gaps = [b - a for _, s, _, err in results if not err for a, b in zip(s, s[1:])]
    total = sum(n for *_, n, err in results if not err)
    return {"clients": clients, "mode": "sequential" if sequential else "concurrent", "tokens": total,
            "tok_s": total / wall, "ttft_p50": pct(ttft, 50), "ttft_p95": pct(ttft, 95),
            "itl_p50": pct(gaps, 50), "itl_p95": pct(gaps, 95), "errors": sum(1 for *_, err in results if err),
            "wall": wall}


def rss_mb() -> float:
    """This process's resident memory (Linux /proc), MB."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--ckpt", help="a run or checkpoint folder (default: a random byte-level Llama)")
    ap.add_argument("--clients", default="1,4,16,64")
    ap.add_argument("--tokens", type=int, default=64, help="tokens per reply")
    ap.add_argument("--memory", type=int, default=0, help="then N more 8-token requests, 16 at a time: memory")
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--max-batch", type=int, default=16)
    ap.add_argument("--embd", type=int, default=256, help="the random model's width (without --ckpt)")
    ap.add_argument("--layers", type=int, default=4, help="the random model's depth (without --ckpt)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    tmp = tempfile.TemporaryDirectory()
    ckpt = args.ckpt or random_checkpoint(Path(tmp.name) / "run", args.embd, args.layers)
    app = build_app(ckpt, Settings(model_name="bench"), max_batch=args.max_batch, max_queue=256)
    with serve_in_thread(app) as url:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="x", max_retries=0, timeout=600)
        run(client, 2, 4)  # warm-up
        rows = [run(client, int(c), args.tokens) for c in args.clients.split(",")]
        rows.append(run(client, 16, args.tokens, sequential=True))
        memory, errors = [], 0
        for done in range(0, args.memory, 16):
            errors += run(client, min(16, args.memory - done), 8)["errors"]
            if done + 16 >= 100 and not memory or done + 16 >= args.memory:
                memory.append((min(done + 16, args.memory), rss_mb()))
    print(f"{'clients':>7} {'mode':>10} {'tokens':>6} {'tok/s':>8} {'ttft p50':>9} {'ttft p95':>9} {'itl p50':>8} "
          f"{'itl p95':>8} {'errors':>6} {'wall s':>7}")
    for r in rows:
        print(f"{r['clients']:>7} {r['mode']:>10} {r['tokens']:>6} {r['tok_s']:>8.1f} {r['ttft_p50']:>9.3f} "
              f"{r['ttft_p95']:>9.3f} {r['itl_p50']:>8.4f} {r['itl_p95']:>8.4f} {r['errors']:>6} {r['wall']:>7.1f}")
    conc = next((r for r in rows if r["clients"] == 16 and r["mode"] == "concurrent"), None)
    if conc is not None:
        print(f"16 concurrent / 16 sequential: {conc['tok_s'] / rows[-1]['tok_s']:.2f}x aggregate tokens/s")
    if memory:
        print("resident memory: " + ", ".join(f"{mb:.0f} MB after {n} requests" for n, mb in memory)
              + f" ({errors} errors)")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
