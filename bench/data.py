"""The data pipeline's stages, timed, and what each rule removes: `python bench/data.py [--plant 0.1] [--quick]`.

Corpus: the embedded KJV (1,189 chapters, ~4.3 MB) plus planted duplicates, each inserted at a random
place after its original: `--plant` x 1,189 near copies of random chapters, each with 0.2-3% of its
words replaced by other words of the Bible (word 5-gram Jaccard with the original, computed exactly,
from about 0.75 to 0.99), and `--exact` x 1,189 copies that differ only in case and line breaks
(duplicates once normalised); written as one JSONL file, which the pipeline streams.

Stages, each timed alone over the whole corpus in this one process at one thread (best of `--rounds`):
read (JSONL, line by line), normalise + exact dedup (NFKC, case fold, punctuation, whitespace;
blake2b key; a set), MinHash signatures (word 5-gram shingles, 128 permutations), LSH (bands,
candidate pairs, verification, union-find), the quality rules (the default ones, and all of
them at Gopher's thresholds), tokenising (our BPE, 4,096 tokens, trained on the corpus first;
tiktoken engine, one thread), and `prepare` end to end with the default settings. documents/s
and MB/s (10^6 bytes of UTF-8 in, per second).

Removal: for each rule, the documents it drops on this corpus when it is the only rule, at the
default setting and at Gopher's published threshold (Rae et al. 2021), and the first-rule counts of
a default `prepare` (its manifest's `filtered`); and near-dedup's recall on the planted near copies by
their exact Jaccard, with the other documents it dropped.

Markdown on stdout. Absolute speeds are for this machine only; run it alone (a benchmark).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

from scratchlm.config import Config, DataConfig  # noqa: E402
from scratchlm.data.dedup import MinHasher, dedup_key, near_duplicates, normalize  # noqa: E402
from scratchlm.data.filters import DOCUMENT_RULES, active_rules, document_rule, failing_rules  # noqa: E402
from scratchlm.data.prepare import prepare  # noqa: E402
from scratchlm.data.sources import iter_documents, kjv_chapters  # noqa: E402
from scratchlm.tokenizer import train_tokenizer  # noqa: E402

GOPHER = dict(min_words=50, max_words=100_000, min_mean_word_length=3, max_mean_word_length=10,
              max_symbol_word_ratio=0.1, max_bullet_line_ratio=0.9, max_ellipsis_line_ratio=0.3,
              min_alpha_word_fraction=0.8, min_stop_words=2, max_top_ngram_fraction=0.2,
              max_dup_ngram_fraction=0.15, script="latin", min_script_fraction=0.5)
# the settings each rule reads (for the table)
SETTINGS = {
    "too_short": ("min_chars",), "repeated_lines": ("max_repeated_line_ratio",),
    "word_count": ("min_words", "max_words"), "mean_word_length": ("min_mean_word_length", "max_mean_word_length"),
    "symbol_ratio": ("max_symbol_word_ratio",), "bullet_lines": ("max_bullet_line_ratio",),
    "ellipsis_lines": ("max_ellipsis_line_ratio",), "alpha_words": ("min_alpha_word_fraction",),
    "stop_words": ("min_stop_words",), "script": ("script", "min_script_fraction"),
    "top_ngram": ("max_top_ngram_fraction",), "dup_ngram": ("max_dup_ngram_fraction",),
}


def shingle_set(text: str, n: int = 5) -> set[tuple[str, ...]]:
    w = normalize(text).split()
    return {tuple(w[i : i + n]) for i in range(max(len(w) - n + 1, 1))}


def planted_corpus(near: float, exact: float, seed: int) -> tuple[list[str], dict[int, float], list[int]]:
    """KJV chapters with copies inserted after their originals; the near copies' positions -> their exact
    Jaccard with the original, and the exact copies' positions."""
    rng = random.Random(seed)
    chapters = kjv_chapters()
    vocab = " ".join(chapters[:50]).split()
    copies: dict[int, list[tuple[str, float | None]]] = {}
    n_near, n_exact = round(near * len(chapters)), round(exact * len(chapters))
    for k, src in enumerate(rng.sample(range(len(chapters)), n_near + n_exact)):
        words = chapters[src].split()
        if k < n_near:
            for pos in rng.sample(range(len(words)), max(1, round(rng.uniform(0.002, 0.03) * len(words)))):
                words[pos] = rng.choice(vocab)
            text = " ".join(words)
            a, b = shingle_set(text), shingle_set(chapters[src])
            j = len(a & b) / len(a | b)
        else:
            text, j = "\n".join(" ".join(words[i : i + 12]) for i in range(0, len(words), 12)).upper(), None
        copies.setdefault(rng.randrange(src + 1, len(chapters) + 1), []).append((text, j))  # after the original
    docs, near_at, exact_at = [], {}, []
    for i in range(len(chapters) + 1):
        for text, j in copies.get(i, []):
            if j is None:
                exact_at.append(len(docs))
            else:
                near_at[len(docs)] = j
            docs.append(text)
        if i < len(chapters):
            docs.append(chapters[i])
    return docs, near_at, exact_at


def best_of(rounds: int, fn):
    best, out = float("inf"), None
    for _ in range(rounds):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--plant", type=float, default=0.1, help="near-duplicate copies, as a fraction of the chapters")
    ap.add_argument("--exact", type=float, default=0.02, help="normalised-duplicate copies, as a fraction")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="one round")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rounds = 1 if args.quick else args.rounds

    docs, near_at, exact_at = planted_corpus(args.plant, args.exact, args.seed)
    n, mb = len(docs), sum(len(d.encode()) for d in docs) / 1e6
    cfg = Config()
    cfg.data.workers = 1
    data = cfg.data
    rows = []

    def stage(name: str, fn, what: str = "") -> object:
        seconds, out = best_of(rounds, fn)
        rows.append((name, seconds, what))
        return out

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "corpus.jsonl"
        src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs), encoding="utf-8")
        texts = stage("read (JSONL, streamed)", lambda: [d.text for d in iter_documents([str(src)])])
        assert texts == docs

        def exact() -> list[str]:
            seen: set[bytes] = set()
            norms = []
            for t in texts:
                norm = normalize(t)
                seen.add(dedup_key(norm))
                norms.append(norm)
            return norms

        norms = stage("normalise + exact dedup", exact)
        hasher = MinHasher(data.near_dedup_perms, data.near_dedup_ngram, data.near_dedup_unit)
        sig = stage("MinHash signatures (128 perms, word 5-grams)",
                    lambda: hasher.signatures_of([hasher.shingles(s) for s in norms]))
        dropped = stage("LSH (9 bands x 13 rows, verify, union-find)",
              lambda: near_duplicates(sig, data.near_dedup_threshold, data.near_dedup_bands, data.near_dedup_verify))
        default_rules = active_rules(data)
        stage(f"quality rules, defaults ({len([r for r in default_rules if r in DOCUMENT_RULES])} rules)",
              lambda: [document_rule(t, data, default_rules) for t in texts])
        gopher = replace(data, **GOPHER)
        every = stage(f"quality rules, all {len(DOCUMENT_RULES)} at Gopher's thresholds",
                      lambda: [failing_rules(t, gopher) for t in texts])
        t0 = time.perf_counter()
        tok = train_tokenizer(texts, cfg.tokenizer, progress=False)
        train_s = time.perf_counter() - t0
        stage("tokenise (BPE 4,096, tiktoken engine, 1 thread)",
              lambda: tok.encode_batch(texts, num_threads=1), f"(training it took {train_s:.1f} s)")
        manifest = stage("prepare end to end, defaults, 1 worker",
                         lambda: prepare([str(src)], tok, cfg, Path(tmp) / "out", progress=False))

    print(f"\n## Stages on the KJV + {len(near_at)} planted near and {len(exact_at)} normalised duplicates "
          f"({n:,} documents, {mb:.2f} MB), "
          f"one thread, best of {rounds}\n")
    print("| stage | seconds | documents/s | MB/s | |\n|---|---:|---:|---:|---|")
    for name, seconds, what in rows:
        print(f"| {name} | {seconds:.3f} | {n / seconds:,.0f} | {mb / seconds:.2f} | {what} |")

    alone = {r: sum(r in f for f in every) for r in DOCUMENT_RULES}
    defaults = DataConfig()
    by_default = {r: sum(failing_rules(t, defaults, (r,)) != [] for t in docs) if r in default_rules else 0
                  for r in DOCUMENT_RULES}
    print(f"\n## Documents removed of {n:,}: each rule alone (default setting / Gopher's), and a default prepare\n")
    print("| rule | default setting | alone, default | Gopher setting | alone, Gopher | default prepare "
          "(first rule) |\n|---|---|---:|---|---:|---:|")
    filtered = manifest["filtered"]
    for r in ("duplicate", *DOCUMENT_RULES, "near_duplicate"):
        if r in SETTINGS:
            dflt = ", ".join(f"{k}={getattr(defaults, k)}" for k in SETTINGS[r])
            gop = ", ".join(f"{k}={getattr(gopher, k)}" for k in SETTINGS[r])
            on = r in default_rules
            print(f"| {r} | {dflt}{'' if on else ' (off)'} | {by_default[r] / n:.1%} | {gop} | {alone[r] / n:.1%} "
                  f"| {filtered.get(r, 0)} |")
        else:
            print(f"| {r} | on | | | | {filtered.get(r, 0)} |")
    t = data.near_dedup_threshold
    print(f"\n## Near-dedup alone (the LSH stage: threshold {t}, {manifest['filters']['lsh']}) on the planted near "
          "copies, by their exact word 5-gram Jaccard\n")
    print("| Jaccard | planted | dropped | share |\n|---|---:|---:|---:|")
    for lo, hi in ((0.9, 1.01), (0.85, 0.9), (0.8, 0.85), (0.75, 0.8), (0.0, 0.75)):
        at = [i for i, j in near_at.items() if lo <= j < hi]
        got = sum(bool(dropped[i]) for i in at)
        print(f"| [{lo:.2f}, {min(hi, 1.0):.2f}{']' if hi > 1 else ')'} | {len(at)} | {got} | "
              f"{got / len(at) if at else float('nan'):.0%} |")
    others = [i for i in range(n) if i not in near_at and i not in exact_at]
    print(f"\nOther documents dropped by near-dedup: {sum(bool(dropped[i]) for i in others)} of {len(others):,} "
          f"(the {len(exact_at)} normalised copies have Jaccard 1: {sum(bool(dropped[i]) for i in exact_at)} dropped). "
          f"A default prepare kept {manifest['documents']['kept']:,} of {manifest['documents']['read']:,}.")


if __name__ == "__main__":
    main()
