"""Reading shards back: manifest checks, cross-shard reads, batches, rank sharding and exact resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from scratchlm.data.loader import BatchLoader, TokenShards
from scratchlm.data.prepare import prepare
from scratchlm.errors import UserError
from tests.helpers import byte_tok, make_cfg, make_docs, read_split, write_corpus


@pytest.fixture
def prepared(tmp_path):
    """A byte-level dataset with several shards per split: (folder, manifest)."""
    src = write_corpus(tmp_path / "in", make_docs(40))
    out = tmp_path / "data"
    m = prepare([str(src)], byte_tok(), make_cfg(shard_tokens=997, val_fraction=0.1), out, progress=False)
    assert len(m["splits"]["train"]["shards"]) > 3
    return out, m


def test_shards_open_and_read_across_boundaries(prepared):
    out, m = prepared
    shards = TokenShards(out, expect_tokenizer=byte_tok())
    stream = read_split(out, m, "train")
    assert shards.tokens("train") == len(stream) == m["tokens"]["train"] and shards.tokens("nope") == 0
    for start in (0, 990, 996, 997, 2500, len(stream) - 50):
        assert (shards.read("train", start, 50) == stream[start : start + 50]).all()
    assert (shards.read("train", 0, len(stream)) == stream).all()
    with pytest.raises(IndexError):
        shards.read("train", len(stream) - 5, 10)
    shards.verify()
    assert shards.tokenizer().fingerprint() == byte_tok().fingerprint()


def test_truncated_missing_or_corrupt_shards(prepared):
    out, m = prepared
    name = m["splits"]["train"]["shards"][2]["file"]
    path = out / name
    blob = path.read_bytes()
    path.write_bytes(blob[:-7])
    with pytest.raises(UserError, match=rf"{name}: shard is .* bytes.*re-run `scratchlm data prepare`"):
        TokenShards(out)
    path.unlink()
    with pytest.raises(UserError, match=rf"{name}: shard is missing"):
        TokenShards(out)
    path.write_bytes(bytes([blob[0] ^ 1]) + blob[1:])  # right size, wrong contents
    shards = TokenShards(out)
    with pytest.raises(UserError, match="sha256"):
        shards.verify()


def test_manifest_checks(prepared, tmp_path):
    out, m = prepared
    with pytest.raises(UserError, match="no manifest.json"):
        TokenShards(tmp_path / "in")
    (out / "manifest.json").write_text(json.dumps({**m, "version": 99}))
    with pytest.raises(UserError, match="version 99 is newer.*upgrade"):
        TokenShards(out)
    (out / "manifest.json").write_text("{")
    with pytest.raises(UserError, match="corrupt manifest"):
        TokenShards(out)


def test_tokenizer_mismatch(prepared, bpe):
    out, _ = prepared
    with pytest.raises(UserError) as e:
        TokenShards(out, expect_tokenizer=bpe)
    msg = str(e.value)
    assert byte_tok().fingerprint() in msg and bpe.fingerprint() in msg and "re-run" in msg and "\n" not in msg


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_batches_are_windows_with_targets_shifted_by_one(prepared, mode):
    out, m = prepared
    shards = TokenShards(out)
    stream = read_split(out, m, "train").astype(np.int64)
    T = 32
    windows = np.lib.stride_tricks.sliding_window_view(stream, T)  # (N - T + 1, T): windows[s] = stream[s:s+T]
    loader = BatchLoader(shards, "train", 8, T, mode=mode, seed=3)
    for _ in range(5):
        x, y = loader.next_batch()
        assert x.shape == y.shape == (8, T) and x.dtype == y.dtype == torch.int64
        assert (x[:, 1:] == y[:, :-1]).all()
        for row_x, row_y in zip(x.numpy(), y.numpy()):
            # a row is stream[s : s + T] and its target stream[s + 1 : s + T + 1] for some start s
            starts = np.flatnonzero((windows[:-1] == row_x).all(axis=1))
            assert any((windows[s + 1] == row_y).all() for s in starts)
            if mode == "sequential":
                assert any(s % T == 0 for s in starts)


def test_random_mode_is_seeded(prepared):
    shards = TokenShards(prepared[0])

    def draw(**kw):
        loader = BatchLoader(shards, "train", 4, 16, **kw)
        return torch.cat([loader.next_batch()[0] for _ in range(3)])

    assert torch.equal(draw(seed=1), draw(seed=1))
    assert not torch.equal(draw(seed=1), draw(seed=2))
    assert not torch.equal(draw(seed=1, rank=0, world_size=2), draw(seed=1, rank=1, world_size=2))


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_resume_yields_exactly_the_uninterrupted_batches(prepared, mode):
    shards = TokenShards(prepared[0])
    kw = dict(seed=11, mode=mode, rank=1, world_size=2)
    full = BatchLoader(shards, "train", 5, 24, **kw)
    per_epoch = full.windows_per_epoch() // 10  # turns of 2 ranks x 5 windows
    n, m = 7, per_epoch + 1  # the continuation crosses an epoch boundary in sequential mode
    reference = [full.next_batch() for _ in range(n + m)]

    first = BatchLoader(shards, "train", 5, 24, **kw)
    for _ in range(n):
        first.next_batch()
    state = json.loads(json.dumps(first.state_dict()))  # survives JSON
    resumed = BatchLoader(shards, "train", 5, 24, **kw)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(reference[n:], (resumed.next_batch() for _ in range(m))):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    if mode == "sequential":
        assert resumed.epoch >= 1


def test_resume_refuses_other_settings(prepared):
    shards = TokenShards(prepared[0])
    state = BatchLoader(shards, "train", 4, 16, mode="sequential").state_dict()
    with pytest.raises(UserError, match="batch_size=4, now 8"):
        BatchLoader(shards, "train", 8, 16, mode="sequential").load_state_dict(state)
    with pytest.raises(UserError, match="mode='sequential', now 'random'"):
        BatchLoader(shards, "train", 4, 16, mode="random").load_state_dict(state)


@pytest.mark.parametrize("world_size", [1, 3])
def test_ranks_cover_every_window_once_per_epoch(prepared, world_size):
    shards = TokenShards(prepared[0])
    T = next(t for t in range(40, 50) if (shards.tokens("train") - 1) // t % 3)  # not a multiple of 3 ranks
    n_windows = (shards.tokens("train") - 1) // T
    stream = read_split(prepared[0], prepared[1], "train").astype(np.int64)
    index = {stream[i * T : i * T + T].tobytes(): i for i in range(n_windows)}  # window contents -> index
    assert len(index) == n_windows
    loaders = [BatchLoader(shards, "train", 1, T, mode="sequential", rank=r, world_size=world_size, seed=5)
               for r in range(world_size)]
    seen: list[int] = []
    while len(seen) < 2 * n_windows:  # the ranks in lockstep, as under data parallelism
        seen += [index[loader.next_batch()[0][0].numpy().tobytes()] for loader in loaders]
    epochs = [seen[:n_windows], seen[n_windows : 2 * n_windows]]
    for order in epochs:
        assert sorted(order) == list(range(n_windows))  # all windows, none twice
    assert epochs[0] != epochs[1]  # each epoch reshuffles


@pytest.mark.parametrize("mode", ["random", "sequential"])
def test_a_step_over_ranks_is_one_process_with_more_accumulation(prepared, mode):
    """World size W, B rows each: rank r's k-th batch is the single process's batch k * W + r, so a
    step's batches (and so the loss curve) do not depend on W; a state resumes under another W."""
    shards = TokenShards(prepared[0])
    single = BatchLoader(shards, "train", 3, 20, mode=mode, seed=7)
    reference = [single.next_batch()[0] for _ in range(12)]
    ranks = [BatchLoader(shards, "train", 3, 20, mode=mode, seed=7, rank=r, world_size=2) for r in range(2)]
    for k in range(3):
        for r, loader in enumerate(ranks):
            assert torch.equal(loader.next_batch()[0], reference[2 * k + r])
    state = json.loads(json.dumps(ranks[0].state_dict()))  # after 6 global batches
    as_one = BatchLoader(shards, "train", 3, 20, mode=mode, seed=7)
    as_one.load_state_dict(state)
    assert torch.equal(as_one.next_batch()[0], reference[6])
    as_three = [BatchLoader(shards, "train", 3, 20, mode=mode, seed=7, rank=r, world_size=3) for r in range(3)]
    for r, loader in enumerate(as_three):
        loader.load_state_dict(state)
        assert torch.equal(loader.next_batch()[0], reference[6 + r])
    as_four = BatchLoader(shards, "train", 3, 20, mode=mode, seed=7, rank=0, world_size=4)
    with pytest.raises(UserError, match="world size that divides"):
        as_four.load_state_dict(state)  # 6 global batches are not whole turns of 4


def test_window_longer_than_split(prepared):
    shards = TokenShards(prepared[0])
    n = shards.tokens("val")
    with pytest.raises(UserError, match=rf"block_size={n}.*split 'val' has {n:,}"):
        BatchLoader(shards, "val", 2, n)
    BatchLoader(shards, "val", 2, n - 1).next_batch()  # exactly one window fits
    with pytest.raises(UserError, match="mode"):
        BatchLoader(shards, "val", 2, 8, mode="shuffled")


def test_empty_val_split(tmp_path):
    src = write_corpus(tmp_path / "in", make_docs(10))
    prepare([str(src)], byte_tok(), make_cfg(val_fraction=0.0), tmp_path / "d", progress=False)
    shards = TokenShards(tmp_path / "d")
    assert shards.tokens("val") == 0
    with pytest.raises(UserError, match="split 'val' is empty"):
        BatchLoader(shards, "val", 2, 8)
