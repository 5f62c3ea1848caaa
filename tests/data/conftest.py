"""Helpers for the data-stage tests: small generated corpora, tokenizers and configs."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest

from scratchlm.config import Config
from scratchlm.tokenizer import ByteTokenizer, train_bpe

WORDS = (
    "the", "lord", "said", "unto", "moses", "and", "aaron", "go", "forth", "into", "land", "which", "I", "give",
    "you", "behold", "a", "sower", "went", "out", "to", "sow", "seed", "upon", "stony", "places", "where", "they",
    "had", "not", "much", "earth",
)


def make_docs(n: int, seed: int = 0, lines: int = 4) -> list[str]:
    """n distinct documents of a few lines each (the doc number keeps them distinct)."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        body = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(6, 14))) for _ in range(lines)]
        docs.append(f"Document {i}.\n" + "\n".join(body))
    return docs


def write_corpus(folder: Path, docs: list[str]) -> Path:
    """One file per document, named so the folder's sorted order is the list's order."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, text in enumerate(docs):
        (folder / f"{i:05d}.txt").write_text(text, encoding="utf-8")
    return folder


def make_cfg(**data) -> Config:
    cfg = Config()
    cfg.data.workers = 1
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def byte_tok() -> ByteTokenizer:
    return ByteTokenizer({"<|endoftext|>": 256})


def read_split(out: Path, manifest: dict, split: str) -> np.ndarray:
    """A split's whole token stream, read straight from its shard files."""
    dtype = np.dtype(manifest["dtype"])
    parts = [np.fromfile(out / s["file"], dtype=dtype) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


@pytest.fixture(scope="session")
def bpe():
    return train_bpe(make_docs(50, seed=99), 300, "gpt4", ["<|endoftext|>"], progress=False)
