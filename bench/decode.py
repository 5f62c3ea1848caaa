"""Our inference engine against HF transformers' `generate`, side by side in one process.

    python bench/decode.py [--quick] [--sizes 30m,125m] [--threads N] [--cpu-time] [--rounds R]

Two Llama models with random weights, the `llama-30m` and `llama-125m` presets (fp32). HF's
`LlamaForCausalLM` is built from a `LlamaConfig` matching ours (nothing is downloaded) and our
weights are copied into it by name, so both hold the same numbers; a forward checks that they
give the same logits, and greedy generation must give the same tokens (reported per run).

Each run: B rows (1 and 8) of a 64-token prompt, 128 new tokens, greedy, KV cache on both sides
(HF: `generate(do_sample=False, use_cache=True)` with its default SDPA attention). Timing is the
same for both: a generate of 1 new token (= prefill + one pick) and a generate of N new tokens;
prefill = the first, decode tokens/s = B·(N-1) / (difference). Ours is also timed through
`Engine.prefill` / `Engine.decode` directly (no sampling loop), and the "matmul floor" is every
weight matmul of one step alone: at small batch, reading the weights is most of a step and both
implementations pay it alike, so it bounds the ratio. The two alternate in rounds after a
warm-up, best round counts, so drifts in machine load hit both alike; absolute numbers are for
this machine only, the ratio ours / HF is the claim. On a shared machine, `--threads 1
--cpu-time` times each process's own CPU work, which other processes' load does not inflate.

Then streaming: a small Llama generates 10x its context through the attention-sink cache, with
tokens/s and cache memory reported per window of the run (both should stay flat).
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
import time

import torch

from scratchlm.config import SampleConfig, get_preset
from scratchlm.infer.engine import Engine
from scratchlm.model.llama import Llama, ffn_hidden

SIZES = {"30m": ("llama-30m", 8192), "125m": ("llama-125m", 32768)}  # preset, vocabulary
PROMPT_LEN = 64

# Our parameter names -> HF LlamaForCausalLM's (RoPE layouts match: both rotate halves).
NAME_MAP = [
    ("tok_embeddings.", "model.embed_tokens."),
    ("attention.wq.", "self_attn.q_proj."), ("attention.wk.", "self_attn.k_proj."),
    ("attention.wv.", "self_attn.v_proj."), ("attention.wo.", "self_attn.o_proj."),
    ("feed_forward.w1.", "mlp.gate_proj."), ("feed_forward.w3.", "mlp.up_proj."),
    ("feed_forward.w2.", "mlp.down_proj."),
    ("attention_norm.", "input_layernorm."), ("ffn_norm.", "post_attention_layernorm."),
]


def hf_name(ours: str) -> str:
    if ours == "norm.weight":
        return "model.norm.weight"
    if ours == "output.weight":
        return "lm_head.weight"
    name = ours
    for a, b in NAME_MAP:
        name = name.replace(a, b)
    return "model." + name if name.startswith("layers.") else name


def machine_header(threads: int) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    load = ", load average {:.1f} / {:.1f} / {:.1f}".format(*os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return (f"- {cpu}, {os.cpu_count()} cores, {threads} torch threads{load}\n"
            f"- python {platform.python_version()}, torch {torch.__version__}")


def build_pair(size: str):
    """Our Llama with random weights, and HF's LlamaForCausalLM holding the same weights."""
    from transformers import LlamaConfig, LlamaForCausalLM

    preset, vocab = SIZES[size]
    mc = get_preset(preset).model
    mc.vocab_size = vocab
    torch.manual_seed(0)
    ours = Llama(mc).eval()
    hc = LlamaConfig(vocab_size=vocab, hidden_size=mc.n_embd, intermediate_size=ffn_hidden(mc),
                     num_hidden_layers=mc.n_layer, num_attention_heads=mc.n_head,
                     num_key_value_heads=mc.n_kv_head or mc.n_head, max_position_embeddings=mc.block_size,
                     rms_norm_eps=mc.norm_eps, rope_theta=mc.rope.theta, tie_word_embeddings=mc.tie_embeddings,
                     attention_bias=False, mlp_bias=False, bos_token_id=None, eos_token_id=None, pad_token_id=0)
    hf = LlamaForCausalLM(hc).eval()
    state = {hf_name(k): v for k, v in ours.state_dict().items()}
    result = hf.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not (mc.tie_embeddings and k == "lm_head.weight")]
    if missing or result.unexpected_keys:
        raise SystemExit(f"weight mapping failed: missing {missing}, unexpected {result.unexpected_keys}")
    x = torch.randint(0, vocab, (2, PROMPT_LEN), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(x)[0] - hf(x).logits).abs().max().item()
    return ours, hf, diff


def hf_generate(hf, x: torch.Tensor, n: int) -> list[list[int]]:
    with torch.no_grad():
        out = hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                          use_cache=True, pad_token_id=0)
    return out[:, x.size(1):].tolist()


CLOCK = time.perf_counter  # --cpu-time: time.process_time


def timed(fn) -> tuple[float, object]:
    t0 = CLOCK()
    out = fn()
    return CLOCK() - t0, out


@torch.no_grad()
def matmul_floor(model, batch: int, reps: int = 5) -> float:
    """Seconds per decode step spent in the weight matmuls alone (every nn.Linear once on a (B, 1, in)
    input): the floor both implementations share at small batch, where reading the weights is the work."""
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = [torch.randn(batch, 1, m.in_features) for m in linears]
    best = float("inf")
    for _ in range(reps):
        t, _ = timed(lambda: [m(x) for m, x in zip(linears, inputs)])
        best = min(best, t)
    return best


def bench_run(ours, hf, batch: int, n_new: int, rounds: int) -> dict:
    vocab = ours.config.vocab_size
    x = torch.randint(0, vocab, (batch, PROMPT_LEN), generator=torch.Generator().manual_seed(2))
    prompts = x.tolist()
    engine = Engine(ours)
    greedy = lambda n: SampleConfig(temperature=0.0, max_new_tokens=n)  # noqa: E731

    def direct() -> tuple[float, float]:
        """Engine.prefill, then n_new - 1 Engine.decode steps of argmax tokens: (prefill s, decode s)."""
        t_pre, (logits, cache) = timed(lambda: engine.prefill(prompts, max_len=PROMPT_LEN + n_new))
        t0 = CLOCK()
        for _ in range(n_new - 1):
            logits = engine.decode(logits.argmax(-1), cache)
        return t_pre, CLOCK() - t0

    runs = {
        "ours_1": lambda: engine.generate(prompts, greedy(1)),
        "ours_n": lambda: engine.generate(prompts, greedy(n_new)),
        "hf_1": lambda: hf_generate(hf, x, 1),
        "hf_n": lambda: hf_generate(hf, x, n_new),
        "direct": direct,
    }
    engine.generate(prompts, greedy(4))  # warm-up
    hf_generate(hf, x, 4)
    best: dict[str, float] = {k: float("inf") for k in runs}
    outs: dict[str, object] = {}
    for i in range(rounds):
        for k, fn in runs.items():
            if k == "direct" and i < rounds - 1:
                continue  # the cross-check needs no best-of
            t, out = timed(fn)
            if k == "direct":
                best["direct_prefill"] = min(best.get("direct_prefill", float("inf")), out[0])
                best["direct_decode"] = min(best.get("direct_decode", float("inf")), out[1])
            else:
                best[k] = min(best[k], t)
                outs[k] = out
    same = sum(a == b for a, b in zip(outs["ours_n"], outs["hf_n"]))
    first_diff = None
    if same < batch:
        a, b = next((a, b) for a, b in zip(outs["ours_n"], outs["hf_n"]) if a != b)
        first_diff = next(i for i, (p, q) in enumerate(zip(a, b)) if p != q)
    decoded = batch * (n_new - 1)
    row = {"batch": batch, "same": same, "first_diff": first_diff,
           "kv_bytes": engine.cache.bytes_per_token() if engine.cache is not None else 0}
    for who in ("ours", "hf"):
        row[f"{who}_prefill_ms"] = best[f"{who}_1"] * 1e3
        row[f"{who}_decode_tok_s"] = decoded / max(best[f"{who}_n"] - best[f"{who}_1"], 1e-9)
    row["direct_prefill_ms"] = best["direct_prefill"] * 1e3
    row["direct_decode_tok_s"] = decoded / best["direct_decode"]
    row["ratio"] = row["ours_decode_tok_s"] / row["hf_decode_tok_s"]
    row["floor_tok_s"] = batch / matmul_floor(ours, batch)
    return row


def streaming(quick: bool) -> None:
    """llama-tiny (context 64) generating 10x its context through the sink cache."""
    mc = get_preset("llama-tiny").model
    mc.vocab_size = 2048
    torch.manual_seed(0)
    model = Llama(mc).eval()
    block, sinks = mc.block_size, 4
    n = 10 * block
    engine = Engine(model)
    marks: list[tuple[float, int]] = []  # (time, cache bytes) at every step

    def on_logits(rows, logits) -> None:
        marks.append((CLOCK(), engine.cache.nbytes))

    prompt = torch.randint(0, mc.vocab_size, (1, 16), generator=torch.Generator().manual_seed(3)).tolist()
    engine.generate(prompt, SampleConfig(temperature=0.0, max_new_tokens=8), cache="sink", sink_tokens=sinks)
    out = engine.generate(prompt, SampleConfig(temperature=1.0, max_new_tokens=n), cache="sink",
                          sink_tokens=sinks, on_logits=on_logits)
    slots = engine.cache.k.size(3)
    print(f"\n## Streaming: llama-tiny (context {block}) generates {len(out[0])} tokens = 10x its context, "
          f"sink cache of {sinks} sinks + {slots - sinks} window slots\n")
    print("| tokens | tok/s | cache bytes |")
    print("|---|---|---|")
    for start in range(0, n - 1, block):
        end = min(start + block, n - 1)
        dt = marks[end][0] - marks[start][0]
        print(f"| {start + 1}-{end} | {(end - start) / dt:,.0f} | {marks[end][1]:,} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="30m only, 32 new tokens, one round")
    p.add_argument("--sizes", default=None, help="comma-separated: 30m,125m")
    p.add_argument("--threads", type=int, default=0, help="torch threads; 0 = torch's default")
    p.add_argument("--rounds", type=int, default=0, help="timing rounds, best counts; 0 = 2 (1 with --quick)")
    p.add_argument("--cpu-time", action="store_true",
                   help="time with this process's CPU clock: with --threads 1 on a shared machine, other "
                        "processes' load then does not count")
    args = p.parse_args()
    global CLOCK
    if args.cpu_time:
        CLOCK = time.process_time
    torch.set_flush_denormal(True)  # random small weights must not hit the slow denormal path
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = (args.sizes or ("30m" if args.quick else "30m,125m")).split(",")
    n_new, rounds = (32, 1) if args.quick else (128, 2)
    rounds = args.rounds or rounds

    print("# Decoding: scratchlm Engine vs HF transformers LlamaForCausalLM.generate\n")
    print(machine_header(torch.get_num_threads()))
    try:
        import transformers
        from transformers import LlamaForCausalLM  # noqa: F401
    except Exception as e:  # noqa: BLE001 - any import failure means no comparison
        print(f"- HF transformers could not be imported ({type(e).__name__}: {e}); no comparison run")
        streaming(args.quick)
        return
    transformers.logging.set_verbosity_error()
    print(f"- transformers {transformers.__version__}; fp32; prompt {PROMPT_LEN} tokens, {n_new} new tokens, greedy; "
          f"best of {rounds} rounds after a warm-up; clock: {'process CPU time' if args.cpu_time else 'wall'}")

    rows = []
    for size in sizes:
        ours, hf, diff = build_pair(size)
        n_params = ours.num_params()
        print(f"- {size}: {n_params / 1e6:.1f}M parameters, {ours.config.n_layer} layers, "
              f"{ours.config.n_head} heads / {ours.config.n_kv_head} kv heads, vocab {ours.config.vocab_size}; "
              f"HF attention {hf.config._attn_implementation}; forward max |logit diff| ours vs HF {diff:.1e}")
        for batch in (1, 8):
            row = bench_run(ours, hf, batch, n_new, rounds)
            row["size"], row["params"] = size, n_params
            rows.append(row)
        del ours, hf

    print("\nprefill = generate 1 token; decode tok/s = B·(N-1) / (generate N − generate 1), same for both; "
          "'direct' = Engine.prefill / Engine.decode alone; matmul floor = the weight matmuls of one step alone, "
          "no attention, norms or Python (the bound both share); ceiling = floor / HF decode tok/s, the largest "
          "ratio any implementation reading these fp32 weights could reach against HF. ratio = ours / HF decode "
          "tok/s (above 1: ours faster)\n")
    print("| model | batch | prefill ms ours / HF | decode tok/s ours | decode tok/s HF | **ratio** | "
          "direct: prefill ms, decode tok/s | matmul floor tok/s | ceiling | same tokens | KV cache bytes/token |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        same = f"{r['same']}/{r['batch']}" + (f" (first diff at {r['first_diff']})" if r["first_diff"] is not None
                                              else "")
        print(f"| {r['size']} ({r['params'] / 1e6:.0f}M) | {r['batch']} | {r['ours_prefill_ms']:.0f} / "
              f"{r['hf_prefill_ms']:.0f} | {r['ours_decode_tok_s']:,.1f} | {r['hf_decode_tok_s']:,.1f} | "
              f"**{r['ratio']:.2f}x** | {r['direct_prefill_ms']:.0f}, {r['direct_decode_tok_s']:,.1f} | "
              f"{r['floor_tok_s']:,.1f} | {r['floor_tok_s'] / r['hf_decode_tok_s']:.2f}x | {same} | "
              f"{r['kv_bytes']:,} |")
    streaming(args.quick)


if __name__ == "__main__":
    main()
