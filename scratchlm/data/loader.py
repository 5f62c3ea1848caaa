"""Reading prepared token shards back: `TokenShards` (the folder) and `BatchLoader` (batches).

`TokenShards` opens the folder `scratchlm data prepare` wrote, checks the manifest's format and
version, that every shard is there with the size the manifest records (a truncated copy is
caught before training, not as garbage batches), and optionally that the shards were made with
the tokenizer the model uses. Shards are memory-mapped: nothing is read until a batch needs it,
and a split is one logical stream of tokens across its shard files.

`BatchLoader` cuts (x, y) batches of shape (B, T) from one split, y being x shifted one token
left (y[b, t] is the token after x[b, t]). Under data parallelism the ranks read one global
stream of batches in turns: rank r's k-th batch is global batch k * world_size + r, so a step's
batches over all ranks are the ones a single process would draw with that many more
accumulation steps, whatever the world size (the loss curve does not depend on it), and the
position is one global counter, so a run resumes under a different world size. Two modes:
- "random" (nanoGPT): each row starts at a uniformly drawn offset in [0, N - T - 1]. The
  generator for global batch g is seeded by (seed, split, g), so the whole state is the counter.
- "sequential": the split is cut into non-overlapping windows of T tokens (window w covers
  tokens [w*T, w*T + T], the last one shared as the next window's first input), shuffled once
  per epoch by (seed, split, epoch); global batch g takes the next B windows of that order, so
  the ranks together see every window exactly once per epoch. A batch that runs past the end of
  an epoch continues into the next one, so every batch is full.

`state_dict()` holds plain ints and strings (JSON-ready) with the position and the settings that
define the stream; `load_state_dict` refuses a state from different settings, since the stream it
would continue is not the one that was interrupted. Resuming yields exactly the batches an
uninterrupted loader would have.

Left out: per-document attention masks and document-aligned windows (windows cross the
end-of-text separators, as in GPT-2 / nanoGPT pretraining), background prefetch threads.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scratchlm.data.prepare import FORMAT, FORMAT_VERSION
from scratchlm.errors import UserError
from scratchlm.tokenizer.base import Tokenizer, load_tokenizer

RERUN = "re-run `scratchlm data prepare`"
MODES = ("random", "sequential")


class TokenShards:
    """The shards of a prepared data folder, memory-mapped, one token stream per split."""

    def __init__(self, path: str | Path, *, expect_tokenizer: Tokenizer | str | None = None) -> None:
        self.dir = Path(path)
        mpath = self.dir / "manifest.json"
        try:
            manifest = json.loads(mpath.read_text(encoding="utf-8"))
        except (FileNotFoundError, NotADirectoryError):  # a missing folder, or a file given as one
            raise UserError(f"{self.dir}: no manifest.json, not a prepared data folder",
                            fix=RERUN) from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise UserError(f"{mpath}: corrupt manifest ({e})", fix=RERUN) from None
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise UserError(f"{mpath}: not a scratchlm shard manifest", fix=RERUN)
        version = manifest.get("version")
        if not isinstance(version, int) or version > FORMAT_VERSION:
            raise UserError(f"{mpath}: shard format version {version} is newer than this scratchlm reads "
                            f"({FORMAT_VERSION})", fix="upgrade scratchlm")
        self.manifest = manifest
        try:
            # Shards are little-endian on disk (see prepare.ShardWriter).
            self.dtype = np.dtype(manifest["dtype"]).newbyteorder("<")
            tok = manifest["tokenizer"]
            self.tokenizer_kind: str = tok["kind"]
            self.vocab_size: int = int(tok["vocab_size"])
            self.tokenizer_fingerprint: str = tok["fingerprint"]
            self.eot_id: int | None = manifest["eot_id"]
            splits = manifest["splits"]
            self._maps: dict[str, list[np.ndarray]] = {}
            self._starts: dict[str, np.ndarray] = {}  # (n_shards + 1,) cumulative token offsets
            for split, info in splits.items():
                maps, counts = [], []
                for shard in info["shards"]:
                    maps.append(self._open_shard(shard["file"], int(shard["tokens"])))
                    counts.append(int(shard["tokens"]))
                if sum(counts) != int(info["tokens"]):
                    raise UserError(f"{mpath}: split {split!r} shard counts do not add up to its total", fix=RERUN)
                self._maps[split] = maps
                self._starts[split] = np.concatenate([[0], np.cumsum(counts, dtype=np.int64)])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"{mpath}: corrupt manifest ({type(e).__name__}: {e})", fix=RERUN) from None
        if expect_tokenizer is not None:
            self.check_tokenizer(expect_tokenizer)

    def _open_shard(self, name: str, tokens: int) -> np.ndarray:
        path = self.dir / name
        if Path(name).name != name:
            raise UserError(f"{self.dir / 'manifest.json'}: shard name {name!r} is not a plain file name", fix=RERUN)
        if not path.is_file():
            raise UserError(f"{path}: shard is missing", fix=RERUN)
        expected = tokens * self.dtype.itemsize
        size = path.stat().st_size
        if size != expected:
            raise UserError(f"{path}: shard is {size:,} bytes, the manifest says {expected:,} (truncated or replaced)",
                            fix=RERUN)
        if tokens == 0:
            return np.zeros(0, dtype=self.dtype)  # an empty file cannot be memory-mapped
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(tokens,))

    def check_tokenizer(self, expected: Tokenizer | str) -> None:
        """Raise unless the shards were made by `expected` (a tokenizer or its fingerprint)."""
        fp = expected.fingerprint() if isinstance(expected, Tokenizer) else str(expected)
        if fp != self.tokenizer_fingerprint:
            raise UserError(
                f"{self.dir}: shards were tokenized with {self.tokenizer_kind} tokenizer {self.tokenizer_fingerprint}, "
                f"but this run uses tokenizer {fp}",
                fix=f"re-run `scratchlm data prepare` with this tokenizer, or use {self.dir / 'tokenizer.json'}",
            )

    def verify(self) -> None:
        """Re-hash every shard against the manifest's sha256 (reads everything; the size checks are free)."""
        for info in self.manifest["splits"].values():
            for shard in info["shards"]:
                h = hashlib.sha256()
                with open(self.dir / shard["file"], "rb") as f:
                    for block in iter(lambda f=f: f.read(1 << 22), b""):
                        h.update(block)
                if h.hexdigest() != shard["sha256"]:
                    raise UserError(f"{self.dir / shard['file']}: contents do not match the manifest's sha256",
                                    fix=RERUN)

    @property
    def splits(self) -> list[str]:
        return list(self._maps)

    def tokens(self, split: str) -> int:
        """Number of tokens in a split (0 for a split that was not written)."""
        starts = self._starts.get(split)
        return int(starts[-1]) if starts is not None else 0

    def read(self, split: str, start: int, length: int) -> np.ndarray:
        """Tokens [start, start + length) of the split's stream, across shard boundaries: (length,)."""
        starts, maps = self._starts[split], self._maps[split]
        if start < 0 or start + length > starts[-1]:
            raise IndexError(f"tokens [{start}, {start + length}) outside split {split!r} of {starts[-1]} tokens")
        i = int(np.searchsorted(starts, start, side="right")) - 1
        lo = start - int(starts[i])
        if lo + length <= len(maps[i]):  # the common case: inside one shard
            return np.asarray(maps[i][lo : lo + length])
        parts, need = [], length
        while need:
            piece = maps[i][lo : lo + need]
            parts.append(piece)
            need -= len(piece)
            i, lo = i + 1, 0
        return np.concatenate(parts)

    def documents(self, split: str) -> list[np.ndarray]:
        """The split's documents as token arrays, cut at the end-of-text id that `prepare` writes before
        each one (the ids themselves left out); a folder written without separators is one document."""
        stream = self.read(split, 0, self.tokens(split))
        if self.eot_id is None:
            return [stream] if len(stream) else []
        pieces = np.split(stream, np.flatnonzero(stream == self.eot_id))  # each starts with the id, but the first
        docs = [p[1:] if len(p) and p[0] == self.eot_id else p for p in pieces]
        return [d for d in docs if len(d)]

    def data_id(self, split: str) -> str:
        """A short hash of a split's shard list: names a loader's stream in its state."""
        blob = json.dumps([self.tokenizer_fingerprint, self.manifest["splits"].get(split)], sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def tokenizer(self) -> Tokenizer:
        """The copy of the tokenizer saved beside the shards."""
        return load_tokenizer(self.dir / "tokenizer.json")

    def __repr__(self) -> str:
        counts = ", ".join(f"{s}={self.tokens(s):,}" for s in self.splits)
        return f"TokenShards({str(self.dir)!r}, {counts}, dtype={self.dtype.name})"


class BatchLoader:
    """(x, y) int64 batches of shape (batch_size, block_size) from one split; see the module doc."""

    def __init__(
        self,
        shards: TokenShards,
        split: str,
        batch_size: int,
        block_size: int,
        *,
        seed: int = 1337,
        rank: int = 0,
        world_size: int = 1,
        mode: str = "random",
        device: str | torch.device = "cpu",
    ) -> None:
        if mode not in MODES:
            raise UserError(f"loader mode {mode!r} is unknown", fix=f"use one of {', '.join(MODES)}")
        if batch_size < 1 or block_size < 1:
            raise UserError(f"batch_size={batch_size} and block_size={block_size} must be at least 1")
        if not 0 <= rank < world_size:
            raise UserError(f"rank={rank} must be in [0, world_size={world_size})")
        if seed < 0:
            raise UserError(f"seed={seed} must be >= 0")
        self.shards, self.split, self.mode = shards, split, mode
        self.batch_size, self.block_size = batch_size, block_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.device = torch.device(device)
        self.n_tokens = shards.tokens(split)
        if self.n_tokens == 0:
            raise UserError(f"{shards.dir}: split {split!r} is empty (data.val_fraction=0 when it was prepared?)",
                            fix="re-run `scratchlm data prepare` with a validation fraction, or do not evaluate")
        if self.n_tokens < block_size + 1:
            raise UserError(
                f"{shards.dir}: block_size={block_size} needs {block_size + 1} tokens per window but split "
                f"{split!r} has {self.n_tokens:,}",
                fix="use a smaller block_size or prepare more text",
            )
        self._split_key = zlib.crc32(split.encode())  # keeps train and val streams independent
        self.n_windows = (self.n_tokens - 1) // block_size  # sequential mode
        self.step = 0  # global batches drawn so far (all ranks' together)
        self.epoch = 0  # sequential: current epoch, and the global position in its window order
        self.pos = 0
        self._order: np.ndarray | None = None  # sequential: the window order of self.epoch

    # -- positions --------------------------------------------------------------------------------
    def _epoch_order(self, epoch: int) -> np.ndarray:
        """The window indices of an epoch, in the order every rank reads them: (n_windows,)."""
        return np.random.default_rng([self.seed, self._split_key, epoch]).permutation(self.n_windows)

    def windows_per_epoch(self) -> int:
        """Sequential mode: windows in an epoch (all ranks' together)."""
        return self.n_windows

    def _take_windows(self, n: int) -> list[int]:
        """The next n windows of the sequential stream (crossing into the next epoch as needed)."""
        out: list[int] = []
        while len(out) < n:
            if self._order is None:
                self._order = self._epoch_order(self.epoch)
            take = self._order[self.pos : self.pos + n - len(out)]
            out.extend(take.tolist())
            self.pos += len(take)
            if self.pos >= len(self._order):
                self.epoch, self.pos, self._order = self.epoch + 1, 0, None
        return out

    def _next_starts(self) -> np.ndarray:
        """Token offsets of this rank's next batch: (batch_size,). Every rank advances the global
        stream past all ranks' batches of this turn and keeps its own."""
        B, T, W, r = self.batch_size, self.block_size, self.world_size, self.rank
        if self.mode == "random":
            # (seed, split, 0, g): the key's third entry stays 0 so one process draws what it always drew
            rng = np.random.default_rng([self.seed, self._split_key, 0, self.step + r])
            return rng.integers(0, self.n_tokens - T, size=B)  # start + T + 1 <= n_tokens
        windows = self._take_windows(B * W)[r * B : (r + 1) * B]
        return np.asarray(windows, dtype=np.int64) * T

    # -- batches ----------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.block_size
        starts = self._next_starts()
        self.step += self.world_size
        rows = np.stack([self.shards.read(self.split, int(s), T + 1) for s in starts])  # (B, T+1)
        buf = torch.from_numpy(rows.astype(np.int64))
        x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T) each
        if self.device.type == "cuda":
            # Pinned host memory lets the copy overlap with compute.
            return x.pin_memory().to(self.device, non_blocking=True), y.pin_memory().to(self.device, non_blocking=True)
        return x.to(self.device), y.to(self.device)

    def __iter__(self) -> BatchLoader:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    # -- resume -------------------------------------------------------------------------------------
    def _settings(self) -> dict[str, Any]:
        return {
            "mode": self.mode, "split": self.split, "batch_size": self.batch_size, "block_size": self.block_size,
            "seed": self.seed, "data": self.shards.data_id(self.split),
        }

    def state_dict(self) -> dict[str, Any]:
        """Plain JSON values: the stream's settings and the global position in it (`step`: global
        batches drawn; sequential: `epoch`, `pos`). The world size it was saved under is recorded,
        not required: the position is the same for every rank and every world size."""
        return {"version": 2, **self._settings(), "world_size": self.world_size, "step": self.step,
                "epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key, value in self._settings().items():
            if state.get(key) != value:
                what = "the data (shards re-prepared?)" if key == "data" else f"{key}={state.get(key)!r}, now {value!r}"
                raise UserError(
                    f"cannot resume the {self.split} loader: it was saved with {what}",
                    fix="resume with the same data and loader settings",
                )
        # version 1 kept per-rank positions; a single process's are the global ones
        if not (state.get("version") == 2 or (state.get("version") == 1 and state.get("world_size") == 1)):
            raise UserError(f"cannot resume the {self.split} loader: its state (version {state.get('version')!r}) "
                            "holds per-rank positions from before the global stream", fix="start the run afresh")
        try:
            step, epoch, pos = int(state["step"]), int(state["epoch"]), int(state["pos"])
        except (KeyError, TypeError, ValueError) as e:
            raise UserError(f"cannot resume the {self.split} loader: corrupt state ({e})") from None
        if self.mode == "sequential" and not 0 <= pos < max(1, self.windows_per_epoch()):
            raise UserError(f"cannot resume the {self.split} loader: position {pos} is outside the epoch")
        if step % self.world_size:
            raise UserError(f"cannot resume the {self.split} loader on {self.world_size} processes: it stopped after "
                            f"{step} global batches, not a whole turn of {self.world_size}",
                            fix="resume with a world size that divides the batches drawn")
        self.step, self.epoch, self.pos, self._order = step, epoch, pos, None
