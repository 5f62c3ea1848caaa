"""Fixtures for the data-stage tests (their helpers live in tests/helpers.py)."""

from __future__ import annotations

import pytest

from scratchlm.tokenizer import train_bpe
from tests.helpers import make_docs


@pytest.fixture(scope="session")
def bpe():
    return train_bpe(make_docs(50, seed=99), 300, "gpt4", ["<|endoftext|>"], progress=False)
