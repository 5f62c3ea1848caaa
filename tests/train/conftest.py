"""Fixtures for the training tests (their helpers live in tests/helpers.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from scratchlm.config import Config
from scratchlm.data.prepare import prepare
from scratchlm.tokenizer import ByteTokenizer
from tests.helpers import make_docs, write_corpus


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pretrain")
    corpus = write_corpus(root / "corpus", make_docs(60, seed=1))
    cfg = Config()
    cfg.data.workers = 1
    prepare([str(corpus)], ByteTokenizer({"<|endoftext|>": 256}), cfg, root / "data", progress=False)
    return root / "data"
