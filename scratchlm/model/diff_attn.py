"""Differential attention (Ye et al. 2024, "Differential Transformer"): the Llama blocks, with an
attention that subtracts a second softmax map from the first to cancel attention noise.

    out = (softmax(Q1 K1ᵀ/√D) - λ · softmax(Q2 K2ᵀ/√D)) · V          V two heads wide (2D)
    λ   = exp(λq1·λk1) - exp(λq2·λk2) + λ_init,   λ_init = 0.8 - 0.6·exp(-0.3·l)   (l = layer, from 0)
    out = (1 - λ_init) · RMSNorm(out)                                   per pair, over its 2D dims, no gain

That last norm (HF's groupnorm, the paper's GroupNorm) puts the attention branch at unit scale whatever
the maps: at llama-tiny's size about 13x a Llama attention's output at init. On a short run that holds
the model on the unigram plateau (100 steps of the experiment's recipe: val loss 5.00 against Llama's
4.21, 3.93 without the norm): `model.sub_norm=false` (preset diff-nonorm-tiny) is that ablation.

The heads are laid out as in HF's `DiffLlamaForCausalLM` (so its weights load by name): n_head query
heads of D = n_embd / n_head dims; head h < H/2 makes the first map of pair h and head h + H/2 the
second. The n_kv_head key/value heads split the same way: key head g serves the query heads GQA gives
it, and pair j's value is value heads j and j + H_kv/2 side by side (2D dims). λ's four vectors (D,)
are one per layer, shared by its pairs. The depth schedule counts layers from 0, as HF does (the
paper's (l - 1) with l from 1).

How it runs through a plain attention and the ordinary KV cache: pack each key pair (g, g + H_kv/2)
into one 2D-wide head, and each value pair likewise; a query of the first map is padded with zeros
where the second map's key sits, and a query of the second map the other way round, so its dot product
with the packed key is exactly its own q·k. One call with H query heads over H_kv/2 packed heads then
gives both maps' outputs against the full 2D value, and the cache holds H_kv/2 heads of 2D: the bytes
of a GQA cache with H_kv heads of D. Halves are interleaved ([a_lo, b_lo, a_hi, b_hi], lo/hi the two
halves RoPE pairs), so `PairRoPE`, a RoPE over 2D dims whose frequencies repeat, rotates each of the two
packed heads exactly as a D-dim RoPE would: the caches rotate (and the sink cache re-rotates) as for Llama.
The price of the padding: the scores cost 2x a D-dim product (as HF's two calls do).

Shapes: B batch, T time, C = n_embd, H query heads, H_kv key/value heads, D = C / H, P = H_kv / 2 pairs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config.model import DiffConfig
from scratchlm.model.base import AttentionShape
from scratchlm.model.layers import DocumentMask, RMSNorm, RoPE, explicit_attention, sdpa_attention
from scratchlm.model.llama import Llama, TransformerBlock


def lambda_init(layer: int) -> float:
    """The depth schedule of λ's initial value (layer counted from 0): 0.2 at the first layer, toward 0.8."""
    return 0.8 - 0.6 * math.exp(-0.3 * layer)


class PairRoPE(RoPE):
    """RoPE for two D-dim heads packed as [a_lo, b_lo, a_hi, b_hi]: a 2D-dim rotary whose pairs
    (i, i + D) are (a_lo[i], a_hi[i]) and then (b_lo[i], b_hi[i]), with the D-dim frequencies twice."""

    def __init__(self, head_dim: int, *args, **kwargs) -> None:
        super().__init__(head_dim, *args, **kwargs)
        self.inv_freq = torch.cat([self.inv_freq, self.inv_freq])  # (D,) = two heads' (D/2,)


def pack(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Two (..., D) tensors -> (..., 2D) laid out [a_lo, b_lo, a_hi, b_hi]."""
    *lead, D = a.shape
    return torch.stack([a.view(*lead, 2, D // 2), b.view(*lead, 2, D // 2)], dim=-2).reshape(*lead, 2 * D)


def unpack(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of `pack`: (..., 2D) -> a, b of (..., D)."""
    *lead, D2 = x.shape
    halves = x.view(*lead, 2, 2, D2 // 4)  # (..., lo/hi, a/b, D/2)
    return halves[..., 0, :].reshape(*lead, D2 // 2), halves[..., 1, :].reshape(*lead, D2 // 2)


class DiffAttention(nn.Module):
    def __init__(self, cfg: DiffConfig, layer: int) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = D = cfg.n_embd // cfg.n_head
        self.wq = nn.Linear(cfg.n_embd, self.n_head * D, bias=cfg.bias)
        self.wk = nn.Linear(cfg.n_embd, self.n_kv_head * D, bias=cfg.bias)
        self.wv = nn.Linear(cfg.n_embd, self.n_kv_head * D, bias=cfg.bias)
        self.wo = nn.Linear(self.n_head * D, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else None
        self.lambda_q1, self.lambda_k1 = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.zeros(D))
        self.lambda_q2, self.lambda_k2 = nn.Parameter(torch.zeros(D)), nn.Parameter(torch.zeros(D))
        self.lambda_init = lambda_init(layer)
        self.eps, self.window, self.impl = cfg.norm_eps, cfg.sliding_window, cfg.attn_impl
        self.sub_norm = cfg.sub_norm
        self.record = False
        self.weights: torch.Tensor | None = None  # recorded maps (B, 2, H/2, T, T): first maps, second maps

    def lam(self) -> torch.Tensor:
        """λ = exp(λq1·λk1) - exp(λq2·λk2) + λ_init, a scalar."""
        return (torch.exp((self.lambda_q1 * self.lambda_k1).sum()) - torch.exp((self.lambda_q2 * self.lambda_k2).sum())
                + self.lambda_init)

    def pack_qkv(self, q, k, v):
        """q (B, H, T, D), k and v (B, H_kv, T, D) -> the packed (B, H, T, 2D) and (B, P, T, 2D) x 2,
        query heads ordered pair by pair (first-map heads, then second-map heads) as GQA groups them."""
        B, H, T, D = q.shape
        P = self.n_kv_head // 2
        zero = torch.zeros_like(q[:, : H // 2])
        q1, q2 = pack(q[:, : H // 2], zero), pack(zero, q[:, H // 2 :])  # each (B, H/2, T, 2D)
        q = torch.stack([q1.view(B, P, -1, T, 2 * D), q2.view(B, P, -1, T, 2 * D)], dim=2).view(B, H, T, 2 * D)
        return q * math.sqrt(2.0), pack(k[:, :P], k[:, P:]), pack(v[:, :P], v[:, P:])  # √2: scale 1/√D, not 1/√2D

    def unpack_heads(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, H, T, X) in `pack_qkv`'s head order -> the first maps' and the second maps' (B, H/2, T, X)."""
        B, H, T, X = y.shape
        y = y.view(B, self.n_kv_head // 2, 2, -1, T, X)
        return y[:, :, 0].reshape(B, H // 2, T, X), y[:, :, 1].reshape(B, H // 2, T, X)

    def forward(self, x: torch.Tensor, rope: RoPE, positions: torch.Tensor | None, layer: int, cache,
                doc_mask: DocumentMask | None) -> torch.Tensor:
        B, T, _ = x.shape
        D = self.head_dim
        q = self.wq(x).view(B, T, self.n_head, D).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_head, D).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_head, D).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.pack_qkv(q, k, v)  # (B, H, T, 2D), (B, P, T, 2D), (B, P, T, 2D)
        if doc_mask is not None:
            y = doc_mask.attend(layer, q, k, v, rope, window=self.window)
        elif cache is not None:  # the cache rotates (PairRoPE), stores the packed heads and attends
            y = cache.attend(layer, q, k, v, rope)
        else:
            q, k = rope(q, positions), rope(k, positions)
            if self.impl == "explicit" or self.record:
                y, w = explicit_attention(q, k, v, window=self.window)
                self.weights = torch.stack(self.unpack_heads(w.detach()), dim=1) if self.record else None
            else:
                y = sdpa_attention(q, k, v, window=self.window)  # (B, H, T, 2D)
        first, second = self.unpack_heads(y)  # (B, H/2, T, 2D) each, values laid out packed
        y = first - self.lam().to(y.dtype) * second
        y = torch.cat(unpack(y), dim=-1)  # value heads j and j + P side by side, as HF
        if self.sub_norm:
            y = (1 - self.lambda_init) * F.rms_norm(y, (2 * D,), eps=self.eps)  # per pair, no gain
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * D))


class DiffBlock(TransformerBlock):
    def __init__(self, cfg: DiffConfig, layer: int) -> None:
        super().__init__(cfg)
        self.attention = DiffAttention(cfg, layer)


class DiffTransformer(Llama):
    """Llama with `DiffAttention` in every block; names as Llama's, plus `attention.lambda_{q,k}{1,2}`."""

    def __init__(self, cfg: DiffConfig) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList(DiffBlock(cfg, i) for i in range(cfg.n_layer))
        r = cfg.rope
        self.rope = PairRoPE(cfg.n_embd // cfg.n_head, r.theta, r.scaling, r.factor,
                             r.original_context or cfg.block_size)
        self.init_weights()

    def attention_shape(self) -> AttentionShape:
        """The cache holds the packed heads: H_kv / 2 of 2D dims (the bytes of H_kv heads of D)."""
        c = self.config
        return AttentionShape(c.n_layer, (c.n_kv_head or c.n_head) // 2, 2 * (c.n_embd // c.n_head),
                              c.sliding_window, c.block_size)

    def init_weights(self) -> None:
        """Llama's, and λ's four vectors N(0, lambda_std) (as HF and the paper)."""
        super().init_weights()
        for name, p in self.named_parameters():
            if ".lambda_" in name:
                nn.init.normal_(p, 0.0, self.config.lambda_std)

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6N + attention: the scores as Llama's, the values twice as wide (2D per map), so 18·L·C·T
        instead of 12 (the model's FLOPs; the zero padding of `pack_qkv` adds another 6·L·C·T of work)."""
        c = self.config
        attention_extra = 6 * c.n_layer * c.n_embd * (seq_len or c.block_size)
        return self.transformer_flops(self.num_params(), seq_len) + attention_extra
