"""Shared test helpers: where the public test data lives, and skipping cleanly without it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_file(name: str) -> Path:
    """A file from ../shared/data, or skip the test with the reason."""
    path = SHARED_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is absent (public test data lives in ../shared/data beside the repository)")
    return path


@pytest.fixture
def shakespeare() -> str:
    return shared_file("tinyshakespeare.txt").read_text(encoding="utf-8")


def pytest_configure(config: pytest.Config) -> None:
    """One torch thread for the whole run (module fixtures included): the test models' matmuls are
    far too small to split, and when another process holds the second core, two spinning threads
    make a forward many times slower."""
    torch.set_num_threads(1)
