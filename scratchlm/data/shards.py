"""Token shards on disk: raw little-endian token arrays (`np.memmap`-able, no header), uint16 when
vocab_size <= 65535 else uint32, at most `shard_tokens` tokens per file, named `train_000000.bin`,
`val_000000.bin`, ...; each shard's size and SHA-256 go in the manifest `scratchlm data prepare` writes.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import IO, Any

import numpy as np


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 holds every id of a vocabulary up to 65,535 tokens (GPT-2's 50,257 fits)."""
    return np.dtype(np.uint16) if vocab_size <= 65535 else np.dtype(np.uint32)


class ShardWriter:
    """Appends tokens to `{split}_{i:06d}.bin` files of at most `shard_tokens` tokens each."""

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict[str, Any]] = []
        self.tokens = 0
        self.documents = 0
        self._f: IO[bytes] | None = None
        self._hash: Any = None
        self._in_shard = 0

    def _open(self) -> None:
        name = f"{self.split}_{len(self.shards):06d}.bin"
        self._f = open(self.out_dir / name, "wb")  # noqa: SIM115  (closed in _close)
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0, "bytes": 0, "sha256": ""})

    def _close(self) -> None:
        if self._f is None:
            return
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        self._f = None
        self.shards[-1].update(tokens=self._in_shard, bytes=self._in_shard * self.dtype.itemsize,
                               sha256=self._hash.hexdigest())

    def write(self, ids: np.ndarray) -> None:
        """Append token ids (any integer dtype, shape (n,)); the caller checked their range."""
        # Little-endian on disk whatever the machine, so shards move between machines.
        arr = np.ascontiguousarray(ids, dtype=self.dtype.newbyteorder("<"))
        while arr.size:
            if self._f is None or self._in_shard == self.shard_tokens:
                self._close()
                self._open()
            take = min(arr.size, self.shard_tokens - self._in_shard)
            blob = arr[:take].tobytes()
            self._f.write(blob)
            self._hash.update(blob)
            self._in_shard += take
            self.tokens += take
            arr = arr[take:]

    def close(self) -> dict[str, Any]:
        self._close()
        return {"tokens": self.tokens, "documents": self.documents, "shards": self.shards}
