"""Layers shared by the model families: positional encodings and causal attention.

`causal_attention` exists twice on purpose: `explicit` spells out softmax(QKᵀ/√d + mask)·V
(Vaswani et al. 2017) for reading and for attention-weight pictures; `sdpa` calls PyTorch's
fused `scaled_dot_product_attention`. They are tested equal.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sinusoidal_positions(n_pos: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": PE[p, 2i] = sin(p / base^(2i/d)),
    PE[p, 2i+1] = cos(p / base^(2i/d)). Returns (n_pos, dim)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    pe = torch.zeros(n_pos, dim)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return pe


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, training: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention by hand. q, k, v: (B, H, T, D). Returns the output (B, H, T, D) and the
    attention weights (B, H, T, T), row t a distribution over positions 0..t."""
    T = q.size(-2)
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, T, T)
    future = torch.ones(T, T, dtype=torch.bool, device=q.device).triu(1)  # True above the diagonal
    scores = scores.masked_fill(future, float("-inf"))
    weights = F.softmax(scores, dim=-1)
    dropped = F.dropout(weights, dropout_p, training) if dropout_p > 0 else weights
    return dropped @ v, weights


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                   training: bool = False) -> torch.Tensor:
    """The same computation through PyTorch's fused kernel (flash / memory-efficient / math)."""
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p if training else 0.0, is_causal=True)
