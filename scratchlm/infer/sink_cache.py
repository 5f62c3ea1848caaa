"""Attention sinks + a rolling window: a KV cache of fixed size for endless generation.

StreamingLLM (Xiao et al. 2023, "Efficient Streaming Language Models with Attention Sinks")
observed that a model puts a large share of its attention on the first few tokens whatever they
say (they are visible to every query, so softmax parks its surplus there). Dropping them, as a
plain rolling window does, wrecks the model; keeping them fixes it. So `SinkCache` keeps

    [ sink_tokens first tokens ][ the `window` most recent tokens, a ring buffer ]

and nothing else: (sink_tokens + window) slots per layer, allocated once, however long the text
grows. A new token overwrites the oldest window slot; the sinks are never overwritten.

Positions, as in the paper: by place in the cache, not in the text. The sinks sit at 0..k-1,
the window's tokens follow in order, the newest last, so positions never exceed the cache span
and the model never sees a position it was not trained on. The window counts the new token: a
query attends to the k sinks and the last `window` tokens including itself (memory = the
attention span = k + window slots). With k = 0 this is Mistral's rolling buffer (Jiang et al.
2023), which equals the model's own sliding-window attention: RoPE scores depend only on
offsets, and offsets inside a contiguous window are the same by place as by text position.

Keys are stored UN-rotated and all of them are rotated with their current places at every step
(the other choice, storing rotated keys and rotating the window by -1 each step, costs the same
rotation work and accumulates rounding). The rotation is (S, D) elementwise work per layer and
step, the same order as the attention's QKᵀ itself, and keeps every position exactly in
[0, k + window) forever, so a stream of millions of tokens stays as precise as its first step.

Only RoPE models can use it: a GPT adds learned absolute position embeddings to its tokens, so a
cached key carries its text position for good and cannot be moved. `for_model` refuses it.

Left out: rows of different lengths in one batch (the engine runs one batch per prompt length),
and a one-pass prefill of a prompt longer than the slots (the engine fills the slots in one
forward, then feeds the rest one token at a time, which is exactly the streaming computation).

Shapes: L layers, B batch, H_kv key/value heads, S = sink_tokens + window slots, D head dim.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import UserError
from scratchlm.infer.cache import Cache, Rope
from scratchlm.model.base import LanguageModel
from scratchlm.model.layers import rotate_half


class _Step(NamedTuple):
    """What one forward's layers share: where the new tokens go and every slot's place."""

    seen: int
    T: int
    write: int  # first slot written (T consecutive slots)
    n: int  # slots attended: 0..n-1
    key_places: torch.Tensor  # (1, n) place of each attended slot
    query_places: torch.Tensor  # (1, T)
    mask: torch.Tensor | None  # (T, n) bool, or None when every query sees every slot


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`RoPE.forward` with its cos, sin computed once per step rather than once per layer."""
    return (x.float() * cos + rotate_half(x.float()) * sin).to(x.dtype)


def check_sink_settings(model: LanguageModel, sink_tokens: int, window: int) -> int:
    """Refuse what the sink cache cannot do, naming the setting; returns the window to use
    (window 0 = the rest of the context: block_size - sink_tokens, at most the model's own
    sliding window)."""
    c = model.config
    if model.rotary is None:
        raise UserError(
            f"the sink cache needs rotary positions (RoPE) to move cached keys to new positions; this "
            f"model.arch={c.arch} has none (a GPT adds absolute position embeddings to its tokens; Jamba's "
            "attention has no positions at all)",
            fix="use the normal KV cache (sample.cache=kv) with this model")
    if sink_tokens < 0:
        raise UserError(f"sample.sink_tokens={sink_tokens} must be >= 0")
    if window < 0:
        raise UserError(f"sample.window={window} must be >= 1 (0 = the rest of the context)")
    own = model.attention_shape().window  # the model's own sliding window, 0 = none
    if window == 0:
        window = c.block_size - sink_tokens
        if own > 0:
            window = min(window, own)
        if window < 1:
            raise UserError(f"sample.sink_tokens={sink_tokens} leaves no room for a window in "
                            f"model.block_size={c.block_size}", fix="use fewer sink tokens")
    if sink_tokens + window > c.block_size:
        raise UserError(f"sample.sink_tokens={sink_tokens} + sample.window={window} = {sink_tokens + window} "
                        f"slots do not fit the model's context, model.block_size={c.block_size}",
                        fix="shrink sample.window: positions past the context were never trained")
    if own > 0 and window > own:
        raise UserError(f"sample.window={window} is wider than model.sliding_window={own}, "
                        "which is all the model ever attended to", fix=f"use sample.window<={own}")
    return window


class SinkCache(Cache):
    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        head_dim: int,
        *,
        sink_tokens: int = 4,
        window: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if sink_tokens < 0 or window < 1:
            raise ValueError(f"need sink_tokens >= 0 and window >= 1, got {sink_tokens} and {window}")
        super().__init__()
        self.sinks, self.window = sink_tokens, window
        self.slots = sink_tokens + window
        shape = (n_layer, batch, n_kv_head, self.slots, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)  # un-rotated keys
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.seen = 0  # tokens of text consumed so far (grows without bound; the slots do not)
        self._step: _Step | None = None
        self._rot: tuple[torch.Tensor, ...] | None = None  # cos, sin for keys and queries of this step

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, *, sink_tokens: int = 4, window: int = 0,
                  dtype: torch.dtype | None = None) -> SinkCache:
        window = check_sink_settings(model, sink_tokens, window)
        a = model.attention_shape()
        p = next(model.parameters())
        return cls(a.n_layer, batch, a.n_kv_head, a.head_dim, sink_tokens=sink_tokens,
                   window=window, device=p.device, dtype=dtype or p.dtype)

    def room(self) -> int:
        """Tokens the next forward may add: the empty slots while filling, then one at a time
        (each evicts the oldest window token, so a longer chunk would need per-query caches)."""
        return self.slots - self.seen if self.seen < self.slots else 1

    def lengths(self) -> torch.Tensor:
        """(B,) tokens of text each row has consumed (all rows alike: no padding)."""
        return torch.full((self.batch,), self.seen, dtype=torch.long, device=self.k.device)

    def _select_kv(self, rows: torch.Tensor) -> None:
        self.k, self.v = self.k[:, rows], self.v[:, rows]
        self._step, self._rot = None, None

    def _join_kv(self, other: Cache) -> None:
        """Rows join only at the same point of the stream: places are shared by the whole batch."""
        if (other.sinks, other.window, other.seen) != (self.sinks, self.window, self.seen):
            raise ValueError(f"sink caches join only with the same sinks, window and tokens seen: "
                             f"{self.sinks, self.window, self.seen} vs {other.sinks, other.window, other.seen}")
        self.k, self.v = torch.cat([self.k, other.k], dim=1), torch.cat([self.v, other.v], dim=1)
        self._step, self._rot = None, None

    def _truncate_kv(self, lengths: torch.Tensor) -> None:
        """Only while filling and for all rows alike: once the ring has evicted a token, giving back the
        newest ones cannot bring the evicted ones back."""
        n = int(lengths[0])
        if bool((lengths != n).any()):
            raise ValueError("the sink cache rolls back all rows alike (its places are shared by the batch)")
        if self.seen > self.slots and n < self.seen:
            raise ValueError(f"the sink cache has evicted tokens ({self.seen} seen, {self.slots} slots): it cannot "
                             "roll back")
        self.seen = n
        self._step, self._rot = None, None

    def _prepare(self, T: int) -> _Step:
        if self._step is not None and (self._step.seen, self._step.T) == (self.seen, T):
            return self._step
        k, S, seen, device = self.sinks, self.slots, self.seen, self.k.device
        if seen + T <= S:
            # Filling: nothing evicted yet, so slot = text position = place, attention is causal.
            n = seen + T
            key_places = torch.arange(n, device=device)[None]  # (1, n)
            query_places = key_places[:, seen:]  # (1, T)
            mask = None
            if T > 1:
                mask = key_places[0][None, :] <= query_places[0][:, None]  # (T, n)
            step = _Step(seen, T, seen, n, key_places, query_places, mask)
        elif T == 1:
            # Full: the new token takes the oldest window slot. Ring slot r's place is k plus its
            # rank by age among the window slots; the newest (just written) ranks last, k+window-1.
            newest = (seen - k) % self.window
            ring = (torch.arange(self.window, device=device) - newest - 1) % self.window  # (window,) age rank
            key_places = torch.cat([torch.arange(k, device=device), k + ring])[None]  # (1, S)
            query_places = torch.full((1, 1), S - 1, device=device)
            step = _Step(seen, T, k + newest, S, key_places, query_places, None)
        else:
            raise ValueError(f"the sink cache takes at most {self.room()} new tokens in this forward, got {T}")
        self._step, self._rot = step, None
        return step

    def positions(self, T: int) -> torch.Tensor:
        """Places of the T new tokens, (B, T)."""
        return self._prepare(T).query_places.expand(self.k.size(1), T)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
        """q (B, H, T, D), k and v (B, H_kv, T, D), un-rotated -> attention output (B, H, T, D)."""
        if rope is None:
            raise ValueError("the sink cache needs RoPE: positions by place in the cache (see SinkCache.for_model)")
        T = q.size(2)
        step = self._prepare(T)
        if self._rot is None:  # once per step: every layer rotates by the same places
            cos_k, sin_k = rope.cos_sin(step.key_places)  # (1, 1, n, D)
            cos_q, sin_q = rope.cos_sin(step.query_places)  # (1, 1, T, D)
            self._rot = (cos_k, sin_k, cos_q, sin_q)
        cos_k, sin_k, cos_q, sin_q = self._rot
        self.k[layer, :, :, step.write : step.write + T] = k
        self.v[layer, :, :, step.write : step.write + T] = v
        keys = _rotate(self.k[layer, :, :, : step.n], cos_k, sin_k)  # (B, H_kv, n, D), rotated by place
        values = self.v[layer, :, :, : step.n]
        q = _rotate(q, cos_q, sin_q)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=step.mask,
                                              enable_gqa=keys.size(1) != q.size(1))

    def advance(self, T: int) -> None:
        self.seen += T
        self._step, self._rot = None, None
