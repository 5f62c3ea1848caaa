"""The KV cache: keys and values of past tokens, kept so each new token costs one position.

Without a cache, generating token t recomputes attention inputs for all t previous tokens: the
work per token grows with the sequence. With one, the prompt is run once ("prefill") and each new
token runs alone ("decode"), reading the stored keys and values of every layer.

The model does not know how keys are stored: it hands each layer's un-rotated q, k, v and its
RoPE to `cache.attend(layer, q, k, v, rope)`, and asks `cache.positions(T)` for the position ids of
the T new tokens (for embeddings and RoPE). That is the whole protocol, so a different cache
(e.g. the rolling buffer with attention sinks, `sink_cache.py`) is a different class, not a flag
in the model. The engine (`engine.py`) also asks a cache for its `room()` (how many tokens the
next forward may add) and, when rows of a batch finish, to `select_rows` the ones still running.

`KVCache` preallocates (B, H_kv, max_len, D) per layer. Batched prompts of different lengths are
left-padded: row b's first `pad[b]` slots are padding, never attended to, and its positions start
at 0 after them. An optional sliding window limits each query to the last `window` positions.

Shapes: L layers, B batch, H_kv key/value heads, S slots filled, T new tokens, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Rope = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


class CacheMemory:
    """Memory accounting shared by the caches: both hold `k` and `v` of shape (L, B, H_kv, S, D)."""

    k: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.k.nelement() * self.k.element_size() * 2

    def bytes_per_token(self) -> int:
        """Cache memory one token (slot) costs: 2 (K and V) x layers x kv heads x head dim x element size."""
        L, B, H, S, D = self.k.shape
        return 2 * L * H * D * self.k.element_size()


class KVCache(CacheMemory):
    def __init__(
        self,
        n_layer: int,
        batch: int,
        n_kv_head: int,
        head_dim: int,
        max_len: int,
        *,
        window: int = 0,
        pad: torch.Tensor | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (n_layer, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len, self.window, self.len = max_len, window, 0
        self.pad = pad.to(device) if pad is not None else None  # (B,) left-padding slots per row
        self._step: tuple[int, int, torch.Tensor, torch.Tensor | None] | None = None

    @classmethod
    def for_model(cls, model: nn.Module, batch: int, max_len: int | None = None, *, pad: torch.Tensor | None = None,
                  dtype: torch.dtype | None = None) -> KVCache:
        a = model.attention_shape()
        p = next(model.parameters())
        return cls(a.n_layer, batch, a.n_kv_head, a.head_dim, max_len or a.context, window=a.window, pad=pad,
                   device=p.device, dtype=dtype or p.dtype)

    def room(self) -> int:
        """How many new tokens the next forward may add before the cache is full."""
        return self.max_len - self.len

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these batch rows (B',), e.g. once the others have finished generating."""
        rows = rows.to(self.k.device)
        self.k, self.v = self.k[:, rows], self.v[:, rows]  # (L, B', H_kv, max_len, D), copies
        if self.pad is not None:
            self.pad = self.pad[rows]
        self._step = None

    def _prepare(self, T: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Positions (B, T) and the attention mask (B, 1, T, S+T) of this forward, shared by its layers."""
        if self._step is not None and self._step[:2] == (self.len, T):
            return self._step[2], self._step[3]
        if self.len + T > self.max_len:
            raise ValueError(f"KV cache is full: {self.len} + {T} tokens > max_len {self.max_len}")
        B, device = self.k.size(1), self.k.device
        slots = torch.arange(self.len, self.len + T, device=device)  # (T,) slots of the new tokens
        pad = self.pad if self.pad is not None else torch.zeros(B, dtype=torch.long, device=device)
        positions = (slots[None, :] - pad[:, None]).clamp(min=0)  # (B, T)
        mask = None
        if self.pad is not None or self.window > 0 or T > 1:
            keys = torch.arange(self.len + T, device=device)  # (S,)
            allowed = keys[None, None, :] <= slots[None, :, None]  # causal, (1, T, S)
            allowed = allowed & (keys[None, None, :] >= pad[:, None, None])  # never a padding slot
            if self.window > 0:
                allowed = allowed & (slots[None, :, None] - keys[None, None, :] < self.window)
            mask = allowed[:, None]  # (B, 1, T, S)
        self._step = (self.len, T, positions, mask)
        return positions, mask

    def positions(self, T: int) -> torch.Tensor:
        return self._prepare(T)[0]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
        """q (B, H, T, D), k and v (B, H_kv, T, D), un-rotated -> attention output (B, H, T, D)."""
        T = q.size(2)
        positions, mask = self._prepare(T)
        if rope is not None:
            q, k = rope(q, positions), rope(k, positions)
        end = self.len + T
        self.k[layer, :, :, self.len : end] = k
        self.v[layer, :, :, self.len : end] = v
        keys, values = self.k[layer, :, :, :end], self.v[layer, :, :, :end]  # (B, H_kv, S, D)
        return F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=keys.size(1) != q.size(1))

    def advance(self, T: int) -> None:
        """Called by the model after its last layer: the T new tokens are now part of the past."""
        self.len += T
        self._step = None
