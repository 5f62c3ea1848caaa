"""Hogwild! inference (scratchlm/infer/hogwild.py): keys moved by re-rotation, and a shared cache whose
blocks sit at different places for different workers.

Re-rotation: RoPE at p then one more rotation by d equals RoPE at p + d, for every scaling scheme of
our RoPE (YaRN's attention scale included). RoPE rotates in fp32 (as HF), so against it the check is
in fp32 at 1e-5 (values O(1), angles < 64 rad: measured ~1e-6); in float64, against a float64
rotation, to 1e-12 (measured ~1e-15).

Shared cache: at every turn a worker's logits equal the uncached forward of one sequence that
concatenates the blocks of its layout and the tokens it feeds, and greedy tokens agree exactly
(fp32 within 1e-4, measured ~6e-6; float64, where the model's RoPE buffers are float64 too, 1e-12).
"""

from __future__ import annotations

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.infer.hogwild import SharedCache, hogwild_demo, hogwild_generate, rerotate, worker_layout
from scratchlm.model.layers import RoPE, rotate_half
from tests.helpers import make_checkpoint, tiny_model

SCHEMES = [("none", 1.0), ("linear", 4.0), ("ntk", 4.0), ("yarn", 4.0)]


def rope64(rope: RoPE, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """`rope` computed in float64: x (B, H, T, D), positions (B, T)."""
    angles = positions[..., None].double() * rope.inv_freq.double()  # (B, T, D/2)
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
    return (x * emb.cos() + rotate_half(x) * emb.sin()) * rope.attn_scale


@pytest.mark.parametrize("scaling,factor", SCHEMES)
def test_rerotated_keys_equal_keys_at_the_new_position(scaling, factor):
    torch.manual_seed(0)
    rope = RoPE(16, 10000.0, scaling, factor, original_context=32)
    x = torch.randn(2, 3, 20, 16)  # (B, H_kv, T, D)
    p = torch.randint(0, 30, (2, 20))
    d = torch.randint(-p.min().item(), 33, (2, 20))  # p + d in [0, 63)
    moved = rerotate(rope(x, p), rope, d[:, None])  # one offset per key: (B, 1, T) broadcasts over heads
    worst = (moved - rope(x, p + d)).abs().max().item()
    assert worst < 1e-5, worst
    assert (rerotate(rope(x, p), rope, 7) - rope(x, p + 7)).abs().max() < 1e-5  # one offset for all
    x64, p64, d64 = x.double(), p, d
    moved64 = rerotate(rope64(rope, x64, p64), rope, d64[:, None])
    worst64 = (moved64 - rope64(rope, x64, p64 + d64)).abs().max().item()
    assert worst64 < 1e-12, worst64
    assert (rerotate(rerotate(x64, rope, 11), rope, -11) - x64).abs().max() < 1e-12  # and back
    assert (moved - rope(x, p)).abs().max() > 0.1  # a real move


def llama(dtype: torch.dtype = torch.float32, n_layer: int = 2):
    return tiny_model(arch="llama", block_size=64, n_kv_head=1, n_layer=n_layer, seed=1).to(dtype)


def turns(model, cache: SharedCache, order: list[int], pending: list[list[int]]) -> float:
    """Workers feed in `order`; at each turn compare the worker's logits with the uncached forward of
    the concatenation of its layout's blocks and what it feeds. Returns the largest difference."""
    worst = 0.0
    for w in order:
        layout = worker_layout(w, len(pending))
        seq = [t for name in layout for t in cache.block(name).tokens] + pending[w]
        with torch.no_grad():
            ref, _ = model(torch.tensor([seq]))
        got = cache.step(layout, pending[w])
        worst = max(worst, (got - ref[0, -1]).abs().max().item())
        assert int(got.argmax()) == int(ref[0, -1].argmax())
        pending[w] = [int(got.argmax())]
    return worst


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float64, 1e-12)])
def test_two_workers_sharing_a_cache_equal_one_concatenated_prefill(dtype, tol):
    """One layer: a token's keys and values depend on the token and its position only, so in turns
    worker 0 sees [prompt][block 1][block 0] and worker 1 [prompt][block 0][block 1], each block at
    two places (written at one, read at the other, moved by re-rotation), and every turn equals the
    concatenated sequence."""
    model = llama(dtype, n_layer=1)
    cache = SharedCache(model)
    cache.step(["prompt"], [3, 1, 4, 1, 5])
    worst = turns(model, cache, [0, 1] * 6, [[9, 2], [6]])
    assert worst < tol, worst
    assert len(cache.block("worker0").tokens) == len(cache.block("worker1").tokens) + 1 == 7


def test_deeper_layers_equal_the_concatenation_when_written_in_its_order():
    """Two layers: a block's deeper keys keep the context they were computed in (Hogwild!'s
    approximation), so the equality holds when worker 0 writes while worker 1's block is empty and
    worker 1 then writes after it: each view is then the very sequence its keys were computed in.
    Interleaved, the views differ from any single sequence (checked: it is an approximation)."""
    model = llama()
    cache = SharedCache(model)
    cache.step(["prompt"], [3, 1, 4, 1, 5])
    pending = [[9, 2], [6]]
    assert turns(model, cache, [0] * 5 + [1] * 5, pending) < 1e-4
    with pytest.raises(AssertionError):  # worker 0 now reads worker 1's block, which never saw its last token
        assert turns(model, cache, [0, 1, 0, 1], pending) < 1e-4


def test_generate_matches_the_turns_above_and_workers_read_each_other():
    model = llama()
    out, cache = hogwild_generate(model, [3, 1, 4, 1, 5], [[9, 2], [6]], steps=6)
    assert [len(t) for t in out] == [6, 6]
    assert cache.block("worker0").tokens == [9, 2, *out[0][:-1]]  # the last token is not fed yet
    # Worker 1 alone (no worker 0 block) continues differently: it did read worker 0's tokens.
    alone, _ = hogwild_generate(model, [3, 1, 4, 1, 5], [[6]], steps=6)
    assert alone[0] != out[1]


def test_demo_prints_both_streams(tmp_path, capsys):
    run = make_checkpoint(tmp_path / "run", arch="llama", block_size=64)
    streams = hogwild_demo(run, "hello", headers=("a.", " b."), steps=5)
    printed = capsys.readouterr().out
    assert len(streams) == 2 and "worker 0: 'a." in printed and "worker 1: ' b." in printed
    assert all(len(s) > 3 for s in streams)


def test_a_model_without_rope_is_refused():
    with pytest.raises(UserError, match="RoPE"):
        SharedCache(tiny_model())
