"""The KV cache: keys and values of past tokens, kept so each new token costs one position.

Without a cache, generating token t recomputes attention inputs for all t previous tokens: the
work per token grows with the sequence. With one, the prompt is run once ("prefill") and each new
token runs alone ("decode"), reading the stored keys and values of every layer.

The model does not know how keys are stored: it hands each layer's un-rotated q, k, v and its
RoPE to `cache.attend(layer, q, k, v, rope)`, and asks `cache.positions(T)` for the position ids of
the T new tokens (for embeddings and RoPE). That protocol, with what the engine asks between
forwards, is `cache.py`'s `Cache`; a different cache (the rolling buffer with attention sinks,
`sink_cache.py`) is a different class, not a flag in the model.

`KVCache` preallocates (B, H_kv, max_len, D) per layer. Batched prompts of different lengths are
left-padded: row b's first `pad[b]` slots are padding, never attended to, and its positions start
at 0 after them. Every row's newest token sits in the last filled slot (`len - 1`); joining rows and
rolling rows back keep that invariant by shifting a row right and growing its padding, so one write
slot and one mask serve the whole batch. An optional sliding window limits each query to the last
`window` positions.

Shapes: L layers, B batch, H_kv key/value heads, S slots filled, T new tokens, D head dim.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.infer.cache import Cache, Rope


class KVCache(Cache):
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
        super().__init__()
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
        if a.latent_dim:  # the model caches a latent and a RoPE key per token (MLA): their layout
            return LatentCache(a.n_layer, batch, a.latent_dim, a.rope_dim, max_len or a.context, window=a.window,
                               pad=pad, device=p.device, dtype=dtype or p.dtype)
        return cls(a.n_layer, batch, a.n_kv_head, a.head_dim, max_len or a.context, window=a.window, pad=pad,
                   device=p.device, dtype=dtype or p.dtype)

    def room(self) -> int:
        """How many new tokens the next forward may add before the cache is full."""
        return self.max_len - self.len

    def lengths(self) -> torch.Tensor:
        """(B,) tokens each row holds: the filled slots less its left padding."""
        full = torch.full((self.batch,), self.len, dtype=torch.long, device=self.k.device)
        return full if self.pad is None else full - self.pad

    def _pads(self) -> torch.Tensor:
        return self.pad if self.pad is not None else torch.zeros(self.batch, dtype=torch.long, device=self.k.device)

    def _select_kv(self, rows: torch.Tensor) -> None:
        self.k, self.v = self.k[:, rows], self.v[:, rows]  # (L, B', H_kv, max_len, D), copies
        if self.pad is not None:
            self.pad = self.pad[rows]
        self._step = None

    def _join_kv(self, other: Cache) -> None:
        """Right-align both batches on the longer one: every row's last token stays in the last filled
        slot (the invariant prefill set up), the shorter side's rows gain left padding."""
        n = max(self.len, other.len)
        if n > self.max_len:
            raise ValueError(f"joining rows of {other.len} slots does not fit a cache of {self.max_len}")
        B, B2 = self.batch, other.batch
        shape = (self.k.size(0), B + B2, self.k.size(2), self.max_len, self.k.size(4))
        k, v = self.k.new_zeros(shape), self.v.new_zeros(shape[:-1] + self.v.shape[-1:])  # (v: its own width)
        for src, rows, shift in ((self, slice(0, B), n - self.len), (other, slice(B, B + B2), n - other.len)):
            k[:, rows, :, shift:n] = src.k[:, :, :, : src.len]
            v[:, rows, :, shift:n] = src.v[:, :, :, : src.len]
        self.pad = torch.cat([self._pads() + n - self.len, other._pads().to(self.k.device) + n - other.len])
        self.k, self.v, self.len, self._step = k, v, n, None

    def _truncate_kv(self, lengths: torch.Tensor) -> None:
        """The rows' common rollback moves the write slot back; a row that drops more has its kept tokens
        moved right by the difference (more left padding), so all rows still end in one slot."""
        drop = self.lengths() - lengths  # (B,) tokens each row gives back
        self.len -= int(drop.min())
        extra = drop - drop.min()
        if bool(extra.any()):
            pad = self._pads().clone()
            for b in extra.nonzero().flatten().tolist():
                e, p = int(extra[b]), int(pad[b])
                for t in (self.k, self.v):
                    t[:, b, :, p + e : self.len] = t[:, b, :, p : self.len - e].clone()
                pad[b] = p + e
            self.pad = pad
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

    def store(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a model that attends by itself over its whole past (native sparse attention reads blocks of
        keys): store the T new tokens' keys and values (B, H_kv, T, D) as given (rotated by the model) and
        return every slot's so far, (B, H_kv, S, D) each, with each row's left padding (B,): slot s of row b
        holds position s - pad[b]."""
        self._prepare(k.size(2))  # refuses a full cache
        end = self.len + k.size(2)
        self.k[layer, :, :, self.len : end] = k
        self.v[layer, :, :, self.len : end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end], self._pads()

    def advance(self, T: int) -> None:
        """Called by the model after its last layer: the T new tokens are now part of the past."""
        self.len += T
        self._step = None


class LatentCache(KVCache):
    """The cache of multi-head latent attention (DeepSeek-V2/V3, model/mla.py): per token and layer only
    the compressed key/value latent (kv_lora_rank wide) and the one RoPE key every head shares
    (qk_rope_head_dim wide, stored rotated), in place of H_kv keys and values of head_dim each. They sit in
    `k` (L, B, 1, S, r) and `v` (L, B, 1, S, d_rope) so padding, joins, rollbacks and row selection are
    the KV cache's own; the attention is the model's (it expands or absorbs the latent), so the model
    calls `extend` instead of `attend`."""

    def __init__(self, n_layer: int, batch: int, latent_dim: int, rope_dim: int, max_len: int, *, window: int = 0,
                 pad: torch.Tensor | None = None, device: torch.device | str = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__(n_layer, batch, 1, latent_dim, max_len, window=window, pad=pad, device=device, dtype=dtype)
        self.v = torch.zeros((n_layer, batch, 1, max_len, rope_dim), device=device, dtype=dtype)

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
        raise ValueError("a latent cache holds no keys and values: the model attends itself (LatentCache.extend)")

    def extend(self, layer: int, latent: torch.Tensor, rope_key: torch.Tensor,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Store the T new tokens' latent (B, T, r) and rotated RoPE key (B, 1, T, d_rope); return every
        slot's so far, (B, S, r) and (B, 1, S, d_rope), with the mask (B, 1, T, S) (None: all allowed)."""
        T = latent.size(1)
        _, mask = self._prepare(T)
        end = self.len + T
        self.k[layer, :, 0, self.len : end] = latent
        self.v[layer, :, :, self.len : end] = rope_key
        return self.k[layer, :, 0, :end], self.v[layer, :, :, :end], mask

    @property
    def nbytes(self) -> int:
        states = sum(s.nelement() * s.element_size() for s in self.states.values())
        return (self.k.nelement() + self.v.nelement()) * self.k.element_size() + states

    def bytes_per_token(self) -> int:
        """layers x (latent width + RoPE key width) x element size: no factor 2, no heads."""
        L, _, _, _, r = self.k.shape
        return L * (r + self.v.size(-1)) * self.k.element_size()
