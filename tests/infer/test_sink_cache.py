"""The attention-sink cache (StreamingLLM): generating 10x the context in fixed memory, with every step's
logits close (fp32: helpers.LOGITS_ATOL/RTOL) to a slow from-scratch computation of the same sink +
window attention; sinks = 0 ≡ the model's own sliding window; batches; and the settings it refuses."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import SampleConfig
from scratchlm.errors import UserError
from scratchlm.infer.engine import Engine
from scratchlm.infer.sink_cache import SinkCache
from scratchlm.model.layers import repeat_kv
from tests.helpers import assert_logits_close, tiny_model

# std 0.2 keeps the logits near +-5, far from ties, so greedy tokens compare exactly.
LLAMA = dict(arch="llama", bias=False, n_head=4, n_kv_head=2, block_size=32, std=0.2)


class StreamingReference:
    """StreamingLLM by hand, one token at a time: every token's un-rotated K and V are kept for
    every layer, and token t attends to exactly the first `sinks` tokens and the last `window`
    tokens (itself included), re-numbered 0..n-1 in text order for RoPE."""

    def __init__(self, model, sinks: int, window: int) -> None:
        self.model, self.sinks, self.window = model, sinks, window
        self.kv: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in model.layers]  # per layer, per token
        self.t = 0

    @torch.no_grad()
    def step(self, token: int) -> torch.Tensor:
        """Feed one token; returns the next-token logits (V,)."""
        m, t = self.model, self.t
        keep = [j for j in range(t + 1) if j < self.sinks or t - j < self.window]
        places = torch.arange(len(keep))[None]  # (1, n): place in the cache, not in the text
        x = m.tok_embeddings(torch.tensor([[token]]))  # (1, 1, C)
        for layer, block in zip(self.kv, m.layers):
            a = block.attention
            H, H_kv, D = a.n_head, a.n_kv_head, a.head_dim
            h = block.attention_norm(x)
            q = a.wq(h).view(1, 1, H, D).transpose(1, 2)  # (1, H, 1, D)
            k = a.wk(h).view(1, 1, H_kv, D).transpose(1, 2)  # (1, H_kv, 1, D)
            v = a.wv(h).view(1, 1, H_kv, D).transpose(1, 2)
            if a.q_norm is not None:
                q, k = a.q_norm(q), a.k_norm(k)
            layer.append((k[:, :, 0], v[:, :, 0]))  # un-rotated, (1, H_kv, D)
            K = torch.stack([layer[j][0] for j in keep], dim=2)  # (1, H_kv, n, D)
            V = torch.stack([layer[j][1] for j in keep], dim=2)
            K, q = m.rope(K, places), m.rope(q, places[:, -1:])  # the new token is the last place
            K, V = repeat_kv(K, H // H_kv), repeat_kv(V, H // H_kv)
            w = F.softmax(q @ K.transpose(-2, -1) / math.sqrt(D), dim=-1)  # (1, H, 1, n): all allowed
            y = (w @ V).transpose(1, 2).reshape(1, 1, H * D)
            x = x + a.wo(y)
            x = x + block.feed_forward(block.ffn_norm(x))
        self.t += 1
        return m.output(m.norm(x))[0, 0]


def sink_run(model, prompts, n, sinks, window, temperature=0.0):
    """Generation with the sink cache (greedy by default); per row, the logits of every step, and
    per step the cache's tensors (shape, storage) as seen while it runs."""
    engine = Engine(model)
    logits = {r: [] for r in range(len(prompts))}
    caches = []

    def record(rows, lg):
        for pos, r in enumerate(rows):
            logits[r].append(lg[pos].clone())
        caches.append((tuple(engine.cache.k.shape), tuple(engine.cache.v.shape), engine.cache.k.data_ptr()))

    outs = engine.generate(prompts, SampleConfig(temperature=temperature, max_new_tokens=n, seed=5), cache="sink",
                           sink_tokens=sinks, window=window, on_logits=record)
    return outs, logits, caches, engine


@pytest.mark.parametrize("sinks,window,prompt_len", [(4, 12, 10), (4, 0, 9), (2, 8, 20), (0, 6, 3)])
def test_ten_contexts_in_fixed_memory_equal_the_reference(sinks, window, prompt_len):
    model = tiny_model(**LLAMA, qk_norm=sinks == 2)
    block = model.config.block_size
    n = 10 * block + 5
    prompt = torch.randint(0, 64, (prompt_len,), generator=torch.Generator().manual_seed(3)).tolist()
    # Sampled, not greedy: a random model's greedy text soon repeats one token, and varied tokens
    # exercise more; the reference is fed the same tokens.
    outs, logits, caches, engine = sink_run(model, [prompt], n, sinks, window, temperature=1.0)
    w = window or block - sinks
    slots = sinks + w
    # Memory: the same two (L, B, H_kv, sinks + window, D) tensors from the first step to the last.
    L, H_kv, D = model.config.n_layer, model.config.n_kv_head, model.config.n_embd // model.config.n_head
    assert len(outs[0]) == n and len(caches) == n
    assert set(caches) == {((L, 1, H_kv, slots, D), (L, 1, H_kv, slots, D), caches[0][2])}
    assert engine.cache.nbytes == 2 * L * H_kv * slots * D * 4
    # Logits: every step against the same attention computed from scratch.
    ref = StreamingReference(model, sinks, w)
    for token in prompt[:-1]:
        ref.step(token)
    for t, token in enumerate([prompt[-1]] + outs[0][:-1]):
        assert_logits_close(logits[0][t], ref.step(token), msg=f"step {t}")


def test_no_sinks_is_the_models_own_sliding_window():
    # Mistral's rolling buffer: with positions by place, offsets inside the window are the text offsets.
    model = tiny_model(**LLAMA, sliding_window=6)
    prompt = [3, 1, 4, 1, 5]
    n = 26  # 31 tokens <= block_size, so the uncached forward can check it; the ring wraps 4 times
    outs, logits, _, _ = sink_run(model, [prompt], n, 0, 6)
    seq = prompt + outs[0]
    with torch.no_grad():
        full, _ = model(torch.tensor([seq[:-1]]))  # (1, T, V), the model's own window mask
    expected = full[0, len(prompt) - 1:]
    assert_logits_close(torch.stack(logits[0]), expected)
    assert outs[0] == expected.argmax(-1).tolist()


def test_batches_of_several_lengths_equal_one_at_a_time():
    model = tiny_model(**LLAMA)
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(0, 64, (n,), generator=g).tolist() for n in (5, 9, 5, 40)]  # 40 > block: cropped
    with pytest.warns(UserWarning, match="block_size=32"):
        batched, _, _, _ = sink_run(model, prompts, 60, 4, 10)
    for prompt, out in zip(prompts, batched):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the 40-token prompt warns again
            alone, _, _, _ = sink_run(model, [prompt], 60, 4, 10)
        assert alone[0] == out


def test_refused_settings_name_the_field():
    llama = tiny_model(**LLAMA)
    with pytest.raises(UserError, match="RoPE"):
        SinkCache.for_model(tiny_model(), 1)  # a GPT: learned absolute positions
    with pytest.raises(UserError, match="sample.window"):
        SinkCache.for_model(llama, 1, sink_tokens=4, window=29)  # 33 slots > block_size 32
    with pytest.raises(UserError, match="sample.sink_tokens"):
        SinkCache.for_model(llama, 1, sink_tokens=-1, window=8)
    with pytest.raises(UserError, match="sample.sink_tokens"):
        SinkCache.for_model(llama, 1, sink_tokens=32)  # no room left for a window
    with pytest.raises(UserError, match="sample.window"):
        SinkCache.for_model(llama, 1, window=-2)
    with pytest.raises(UserError, match="sliding_window"):
        SinkCache.for_model(tiny_model(**LLAMA, sliding_window=6), 1, window=10)
    cache = SinkCache.for_model(llama, 2, sink_tokens=4)
    assert cache.k.shape == (2, 2, 2, 32, 8) and cache.bytes_per_token() == 2 * 2 * 2 * 8 * 4
