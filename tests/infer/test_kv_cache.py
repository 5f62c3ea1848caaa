"""The two KV caches, one operation at a time, against attention computed from scratch.

KVCache (scratchlm/infer/kv_cache.py): per-row positions and mask under left padding and a sliding
window; `attend` over prefill + decode + chunks equals attention over each row's whole keys and
values; `advance`/`room` and the full cache; `select_rows`; memory. It runs in float64 with a
float64 rotation passed as its `rope`, so the only difference from the reference is the order of
the sums: atol 1e-12.

SinkCache (scratchlm/infer/sink_cache.py): places (positions by place in the cache), `room`, the
ring's eviction order, `attend` equal to attention over the sinks + last `window` tokens re-numbered
0..n-1 in text order, `select_rows`, fixed memory. Its rotation is RoPE's, in fp32 by design (as HF),
so it is compared in fp32: values O(1), scores of 8-term dot products and softmax sums of <= 5 terms
round at ~1e-7, far below atol 1e-5; a wrong slot or place moves outputs by 1e-1.

Whole-model generation with either cache is tested in test_engine.py and test_sink_cache.py.
"""

from __future__ import annotations

import math

import pytest
import torch

from scratchlm.infer.kv_cache import KVCache
from scratchlm.infer.sink_cache import SinkCache
from scratchlm.model.layers import RoPE, repeat_kv, rotate_half
from tests.helpers import tiny_model

H, H_KV, D = 4, 2, 8  # query heads, key/value heads (GQA), head dim
F32 = dict(atol=1e-5, rtol=1e-5)


def rope64(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """A rotary embedding computed in float64 (RoPE's own rotates in fp32): x (B, H, T, D), positions (B, T)."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angles = positions[..., None].double() * inv_freq  # (B, T, D/2)
    emb = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, T, D)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def qkv(seed: int, B: int, T: int, dtype: torch.dtype = torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(B, H, T, D, generator=g, dtype=dtype), torch.randn(B, H_KV, T, D, generator=g, dtype=dtype),
            torch.randn(B, H_KV, T, D, generator=g, dtype=dtype))


def padded_reference(q, k, v, pad: list[int], window: int) -> torch.Tensor:
    """Attention by loops over each row's whole sequence (B, H, S, D): slot s holds position s - pad[b];
    a query sees the keys of its row that are not padding, not later, and within the window. Padding
    queries (which see nothing) come out as zeros."""
    B, _, S, _ = q.shape
    pos = (torch.arange(S)[None] - torch.tensor(pad)[:, None]).clamp(min=0)  # (B, S)
    q, k = rope64(q, pos), repeat_kv(rope64(k, pos), H // H_KV)
    v = repeat_kv(v, H // H_KV)
    out = torch.zeros_like(q)
    for b in range(B):
        for i in range(pad[b], S):
            keys = [j for j in range(pad[b], i + 1) if window == 0 or i - j < window]
            w = torch.softmax(q[b, :, i : i + 1] @ k[b, :, keys].transpose(-2, -1) / math.sqrt(D), dim=-1)
            out[b, :, i] = (w @ v[b, :, keys])[:, 0]
    return out


@pytest.mark.parametrize("window", [0, 3])
def test_kv_cache_mask_with_padding_matches_explicit_loops(window):
    pad = torch.tensor([0, 3, 5])
    cache = KVCache(1, 3, 1, 2, 12, window=window, pad=pad)
    for T in (7, 1, 1, 3):  # a prefill, two decode steps, a chunk
        start = cache.len
        positions, mask = cache._prepare(T)
        for b in range(3):
            for t in range(T):
                i = start + t - pad[b].item()  # the query's position in its row's text
                assert positions[b, t].item() == max(i, 0)
                for s in range(start + T):
                    j = s - pad[b].item()  # the key's position (negative: a padding slot)
                    allowed = j >= 0 and i >= 0 and j <= i and (window == 0 or i - j < window)
                    # A padding query sees nothing (its output is never used); the cache passes no
                    # mask at all when every query sees every slot.
                    got = True if mask is None else mask[b, 0, t, s].item()
                    assert got == allowed or i < 0, (b, t, s)
        cache.advance(T)


def test_kv_cache_positions_per_row_follow_the_padding():
    cache = KVCache(1, 3, H_KV, D, 8, pad=torch.tensor([0, 2, 1]))
    assert cache.positions(3).tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]  # padding slots clamp to 0
    cache.advance(3)
    assert cache.positions(1).tolist() == [[3], [1], [2]]
    assert KVCache(1, 2, H_KV, D, 8).positions(2).tolist() == [[0, 1], [0, 1]]  # no padding


@pytest.mark.parametrize("window", [0, 3])
def test_kv_cache_attend_equals_attention_over_the_whole_sequence(window):
    pad, chunks = [0, 2], (4, 1, 2, 1)  # prefill, decode, a chunk, decode: 8 slots = max_len
    S = sum(chunks)
    cache = KVCache(2, 2, H_KV, D, S, window=window, pad=torch.tensor(pad), dtype=torch.float64)
    layers = [qkv(seed, 2, S) for seed in (1, 2)]  # each layer its own q, k, v: (B, H, S, D), (B, H_kv, S, D)
    expected = [padded_reference(*layer, pad, window) for layer in layers]
    start = 0
    for T in chunks:
        assert cache.room() == S - start
        for n, (q, k, v) in enumerate(layers):
            out = cache.attend(n, *(x[:, :, start : start + T] for x in (q, k, v)), rope64)
            for b in range(2):
                real = slice(max(start, pad[b]), start + T)  # the row's padding queries are never used
                got = out[b, :, real.start - start :]
                torch.testing.assert_close(got, expected[n][b, :, real], atol=1e-12, rtol=0, msg=f"{start=} {b=}")
        cache.advance(T)
        start += T
        assert cache.len == start
    # The stored keys are rotated by their positions; the values are as given.
    pos = (torch.arange(S)[None] - torch.tensor(pad)[:, None]).clamp(min=0)
    for n, (_, k, v) in enumerate(layers):
        torch.testing.assert_close(cache.k[n], rope64(k, pos), atol=1e-14, rtol=0)
        assert torch.equal(cache.v[n], v)
    assert cache.room() == 0
    with pytest.raises(ValueError, match="KV cache is full: 8 \\+ 1 tokens > max_len 8"):
        cache.attend(0, *(x[:, :, :1] for x in layers[0]), rope64)


def test_kv_cache_select_rows_keeps_those_rows_and_their_padding():
    pad = [0, 1, 2]
    cache = KVCache(1, 3, H_KV, D, 6, pad=torch.tensor(pad), dtype=torch.float64)
    q, k, v = qkv(3, 3, 4)
    cache.attend(0, q[:, :, :3], k[:, :, :3], v[:, :, :3], rope64)
    cache.advance(3)
    before = cache.k.clone(), cache.v.clone()
    cache.select_rows(torch.tensor([2, 0]))
    assert cache.pad.tolist() == [2, 0] and cache.len == 3 and cache.room() == 3
    assert torch.equal(cache.k, before[0][:, [2, 0]]) and torch.equal(cache.v, before[1][:, [2, 0]])
    assert cache.positions(1).tolist() == [[1], [3]]
    rows = [2, 0]
    out = cache.attend(0, q[rows, :, 3:], k[rows, :, 3:], v[rows, :, 3:], rope64)
    expected = padded_reference(q[rows], k[rows], v[rows], [2, 0], 0)[:, :, 3:]
    torch.testing.assert_close(out, expected, atol=1e-12, rtol=0)


def test_kv_cache_memory_and_for_model():
    cache = KVCache(2, 3, H_KV, 4, 8, dtype=torch.float64)  # L=2, B=3, H_kv=2, max_len=8, D=4
    assert cache.nbytes == 2 * (2 * 3 * 2 * 8 * 4) * 8  # K and V, preallocated whatever is filled
    assert cache.bytes_per_token() == 2 * 2 * 2 * 4 * 8  # per slot: K and V x L x H_kv x D x 8 bytes
    cache.select_rows(torch.tensor([1]))
    assert cache.nbytes == 2 * (2 * 1 * 2 * 8 * 4) * 8

    model = tiny_model(arch="llama", bias=False, n_head=H, n_kv_head=H_KV, sliding_window=5)  # n_embd 32: D = 8
    cache = KVCache.for_model(model, 3)
    assert cache.k.shape == cache.v.shape == (2, 3, H_KV, 16, D)  # max_len = block_size
    assert (cache.window, cache.k.dtype, cache.room()) == (5, torch.float32, 16)
    assert KVCache.for_model(model, 1, 10, dtype=torch.float64).k.shape == (2, 1, H_KV, 10, D)


def test_sink_cache_places_and_room():
    cache = SinkCache(1, 2, H_KV, D, sink_tokens=2, window=3)  # 5 slots
    assert cache.room() == 5
    assert cache.positions(3).tolist() == [[0, 1, 2]] * 2  # filling: place = text position
    cache.advance(3)
    assert cache.room() == 2 and cache.positions(2).tolist() == [[3, 4]] * 2
    cache.advance(2)
    for _ in range(4):  # full: one token at a time, always at the last place
        assert cache.room() == 1 and cache.positions(1).tolist() == [[4]] * 2
        cache.advance(1)
    assert cache.seen == 9
    with pytest.raises(ValueError, match="at most 1 new tokens"):
        cache.positions(2)


def test_sink_cache_evicts_the_oldest_window_token_and_keeps_the_sinks():
    cache = SinkCache(1, 1, 1, D, sink_tokens=2, window=3)
    rope = RoPE(D)

    def feed(tokens: list[int]) -> None:
        v = torch.tensor(tokens, dtype=torch.float32).view(1, 1, -1, 1).expand(1, 1, -1, D)  # value = token
        cache.attend(0, torch.zeros(1, 1, len(tokens), D), torch.zeros(1, 1, len(tokens), D), v, rope)
        cache.advance(len(tokens))

    feed([0, 1, 2, 3])
    feed([4])
    assert cache.v[0, 0, 0, :, 0].tolist() == [0, 1, 2, 3, 4]
    slots = []
    for t in range(5, 10):
        feed([t])
        slots.append(cache.v[0, 0, 0, :, 0].tolist())
    # Token t takes window slot 2 + (t - 2) % 3: the ring, oldest first; slots 0 and 1 stay the sinks.
    assert slots == [[0, 1, 5, 3, 4], [0, 1, 5, 6, 4], [0, 1, 5, 6, 7], [0, 1, 8, 6, 7], [0, 1, 8, 9, 7]]


@pytest.mark.parametrize("sinks,window", [(2, 3), (0, 4)])
def test_sink_cache_attend_equals_sinks_plus_window_from_scratch(sinks, window):
    rope = RoPE(D)
    n_tokens, prefill = 13, 3
    cache = SinkCache(2, 1, H_KV, D, sink_tokens=sinks, window=window)
    layers = [qkv(seed, 1, n_tokens, torch.float32) for seed in (4, 5)]
    start = 0
    for T in [prefill] + [1] * (n_tokens - prefill):
        for n, (q, k, v) in enumerate(layers):
            out = cache.attend(n, *(x[:, :, start : start + T] for x in (q, k, v)), rope)
            for i in range(T):
                t = start + i  # text position of this query
                keep = [j for j in range(t + 1) if j < sinks or t - j < window]
                places = torch.arange(len(keep))[None]  # (1, n): by place in the cache, in text order
                K = repeat_kv(rope(k[:, :, keep], places), H // H_KV)
                V = repeat_kv(v[:, :, keep], H // H_KV)
                qt = rope(q[:, :, t : t + 1], places[:, -1:])  # the query is the last place
                w = torch.softmax(qt @ K.transpose(-2, -1) / math.sqrt(D), dim=-1)
                torch.testing.assert_close(out[:, :, i : i + 1], w @ V, **F32, msg=f"layer {n} token {t}")
        cache.advance(T)
        start += T


def test_sink_cache_select_rows_memory_and_refusals():
    cache = SinkCache(2, 3, H_KV, D, sink_tokens=1, window=4)
    assert cache.nbytes == 2 * (2 * 3 * H_KV * 5 * D) * 4 and cache.bytes_per_token() == 2 * 2 * H_KV * D * 4
    q, k, v = qkv(6, 3, 1, torch.float32)
    rope, ptr = RoPE(D), cache.k.data_ptr()
    for _ in range(12):  # 12 tokens through 5 slots: the same storage throughout
        for n in range(2):
            cache.attend(n, q, k, v, rope)
        cache.advance(1)
    assert cache.k.data_ptr() == ptr and cache.k.shape == (2, 3, H_KV, 5, D)
    before = cache.k.clone()
    cache.select_rows(torch.tensor([2, 0]))
    assert torch.equal(cache.k, before[:, [2, 0]]) and cache.positions(1).tolist() == [[4], [4]]
    with pytest.raises(ValueError, match="needs RoPE"):
        cache.attend(0, q[:2], k[:2], v[:2], None)
    with pytest.raises(ValueError, match="sink_tokens >= 0 and window >= 1"):
        SinkCache(1, 1, 1, D, sink_tokens=2, window=0)
    with pytest.raises(ValueError, match="sink_tokens >= 0 and window >= 1"):
        SinkCache(1, 1, 1, D, sink_tokens=-1, window=3)
