"""The cache protocol's batch operations (scratchlm/infer/cache.py) on whole models: per-row lengths,
rows joining a running batch, rows rolled back to earlier lengths, recurrent states.

Each check compares a cached next-token logit with the model's plain forward over that row's whole
text, alone. The GPT runs in float64, where the two differ only in the order of sums (atol 1e-10);
the Llama's RoPE rotates in fp32 by design, so it is compared at fp32 rounding of O(1)-O(10) logits
(atol 1e-5, rtol 1e-5); a wrong slot, position or mask moves logits by far more (> 1e-2).
"""

from __future__ import annotations

import pytest
import torch

from scratchlm.infer.kv_cache import KVCache
from scratchlm.infer.sink_cache import SinkCache
from tests.helpers import prompts_of, tiny_model

TOL = {"gpt": dict(atol=1e-10, rtol=0), "llama": dict(atol=1e-5, rtol=1e-5)}


def model_of(arch: str, **kw):
    extra = dict(bias=False, n_kv_head=1) if arch == "llama" else {}
    return tiny_model(arch=arch, block_size=24, **extra, **kw).double()


def alone(model, tokens: list[int]) -> torch.Tensor:
    """Next-token logits (V,) of one row by a full forward, no cache."""
    with torch.no_grad():
        return model(torch.tensor([tokens]))[0][0, -1]


def prefill(model, prompts: list[list[int]], max_len: int = 24) -> tuple[KVCache, torch.Tensor]:
    """Left-padded prefill into a new cache: (cache, last logits (B, V))."""
    P = max(map(len, prompts))
    pad = torch.tensor([P - len(p) for p in prompts])
    cache = KVCache.for_model(model, len(prompts), max_len, pad=pad)
    idx = torch.tensor([[0] * (P - len(p)) + p for p in prompts])
    with torch.no_grad():
        logits, _ = model(idx, cache=cache, last_only=True)
    return cache, logits[:, -1]


def decode(model, cache, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor(tokens).view(-1, 1), cache=cache, last_only=True)
    return logits[:, -1]


def test_lengths_are_per_row():
    model = model_of("gpt")
    cache, _ = prefill(model, prompts_of([3, 5, 1]))
    assert cache.lengths().tolist() == [3, 5, 1] and cache.len == 5
    decode(model, cache, [1, 2, 3])
    assert cache.lengths().tolist() == [4, 6, 2]
    assert cache.positions(1).tolist() == [[4], [6], [2]]  # the next token's position is the row's length


@pytest.mark.parametrize("arch", ["gpt", "llama"])
@pytest.mark.parametrize("joining", [[9], [2, 4]], ids=["longer", "shorter"])
def test_rows_joining_a_running_batch_compute_as_if_alone(arch, joining):
    """A batch prefilled and decoding; other prompts prefilled apart and joined; every row's next
    logits equal its own text's, whether the joining rows are longer (the running rows shift right)
    or shorter (they get left padding)."""
    model = model_of(arch)
    texts = prompts_of([5, 3] + joining, seed=3)
    running, _ = prefill(model, texts[:2])
    for t in (7, 11):  # two decode steps before the others arrive
        decode(model, running, [t, t + 1])
        texts[0].append(t), texts[1].append(t + 1)
    other, _ = prefill(model, texts[2:])
    running.join(other)
    assert running.batch == len(texts) and running.lengths().tolist() == [len(t) for t in texts]
    new = [20 + r for r in range(len(texts))]
    logits = decode(model, running, new)
    for r, text in enumerate(texts):
        torch.testing.assert_close(logits[r], alone(model, text + [new[r]]), **TOL[arch])


@pytest.mark.parametrize("arch", ["gpt", "llama"])
def test_truncate_rolls_each_row_back_to_its_own_length(arch):
    """Speculative decoding's rollback: rows decode drafted tokens, each keeps a different number; the
    next token's logits equal those of the kept text alone. Row 2 rolls back into its prompt."""
    model = model_of(arch, sliding_window=6) if arch == "llama" else model_of(arch)
    texts = prompts_of([4, 6, 5], seed=4)
    cache, _ = prefill(model, texts)
    drafted = [[30, 31, 32], [33, 34, 35], [36, 37, 38]]
    with torch.no_grad():
        model(torch.tensor(drafted), cache=cache)  # the drafts verified in one forward (B, 3)
    keep = [2, 3, 0]  # drafted tokens each row accepts
    kept = [t + d[:k] for t, d, k in zip(texts, drafted, keep)]
    kept[2] = kept[2][:-2]  # and row 2 drops two prompt tokens as well
    cache.truncate([len(t) for t in kept])
    assert cache.lengths().tolist() == [len(t) for t in kept]
    new = [40, 41, 42]
    logits = decode(model, cache, new)
    for r, text in enumerate(kept):
        torch.testing.assert_close(logits[r], alone(model, text + [new[r]]), **TOL[arch])


def test_truncate_and_join_refuse_what_does_not_fit():
    model = model_of("gpt")
    cache, _ = prefill(model, prompts_of([3, 5]))
    for bad in ([4, 5], [3], [-1, 2]):
        with pytest.raises(ValueError, match="one length per row"):
            cache.truncate(bad)
    full, _ = prefill(model, prompts_of([10]), max_len=10)
    with pytest.raises(ValueError, match="does not fit"):
        prefill(model, prompts_of([3]), max_len=10)[0].join(prefill(model, prompts_of([12]))[0])
    with pytest.raises(ValueError, match="same model"):
        cache.join(prefill(model_of("llama"), prompts_of([2]))[0])
    with pytest.raises(ValueError, match="same model"):
        cache.join(SinkCache(2, 1, 2, 16, sink_tokens=1, window=3, dtype=torch.float64))
    assert full.lengths().tolist() == [10]


def test_recurrent_states_leave_and_join_with_their_rows_and_never_roll_back():
    cache = KVCache(1, 3, 2, 4, 8)
    assert cache.state(0) is None
    with pytest.raises(ValueError, match="2 rows does not fit a batch of 3"):
        cache.set_state(0, torch.zeros(2, 5))
    state = torch.arange(3.0)[:, None].expand(3, 5).clone()  # row b holds b
    cache.set_state(1, state)
    assert cache.nbytes == 2 * cache.k.nelement() * 4 + state.nelement() * 4
    cache.select_rows(torch.tensor([2, 0]))
    assert cache.state(1)[:, 0].tolist() == [2.0, 0.0]
    other = KVCache(1, 1, 2, 4, 8)
    with pytest.raises(ValueError, match="different layers"):
        cache.join(other)
    other.set_state(1, torch.full((1, 5), 7.0))
    cache.join(other)
    assert cache.state(1)[:, 0].tolist() == [2.0, 0.0, 7.0] and cache.batch == 3
    with pytest.raises(ValueError, match="cannot be rolled back"):
        cache.truncate([0, 0, 0])


def sink_logits(model, cache: SinkCache, tokens: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        logits, _ = model(torch.tensor(tokens), cache=cache, last_only=True)
    return logits[:, -1]


def test_sink_cache_joins_rows_at_the_same_point_and_rolls_back_only_while_filling():
    model = tiny_model(arch="llama", bias=False, block_size=24).double()
    a, b = prompts_of([6, 6], seed=5)
    ca, cb = (SinkCache.for_model(model, 1, sink_tokens=2, window=6) for _ in range(2))
    sink_logits(model, ca, [a]), sink_logits(model, cb, [b])
    both = SinkCache.for_model(model, 1, sink_tokens=2, window=6)
    sink_logits(model, both, [a])
    both.join(cb)
    joined = sink_logits(model, both, [[9], [9]])
    torch.testing.assert_close(joined[0], sink_logits(model, ca, [[9]])[0], **TOL["llama"])
    with pytest.raises(ValueError, match="same sinks, window and tokens seen"):
        both.join(SinkCache.for_model(model, 1, sink_tokens=2, window=6))

    # Rolling back while filling: as if the dropped tokens had never been fed.
    fresh = SinkCache.for_model(model, 2, sink_tokens=2, window=6)
    sink_logits(model, fresh, [a[:4], b[:4]])
    both.truncate([4, 4])
    torch.testing.assert_close(sink_logits(model, both, [[3], [3]]), sink_logits(model, fresh, [[3], [3]]),
                               **TOL["llama"])
    with pytest.raises(ValueError, match="all rows alike"):
        both.truncate([2, 3])
    for t in range(6):  # past the 8 slots: the ring evicts
        sink_logits(model, both, [[t], [t]])
    with pytest.raises(ValueError, match="cannot roll back"):
        both.truncate([9, 9])
