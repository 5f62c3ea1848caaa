"""Layers shared by the model families: positional encodings, norms, attention.

- Causal attention exists twice on purpose: `explicit_attention` spells out
  softmax(QKᵀ/√d + mask)·V (Vaswani et al. 2017) for reading and for attention pictures;
  `sdpa_attention` calls PyTorch's fused kernel. They are tested equal. Both take an optional
  sliding window (Mistral): position i sees positions i-window+1 .. i.
- `RMSNorm` (Zhang & Sennrich 2019): scale by the root mean square, no mean subtraction, no bias.
- `RoPE` (Su et al. 2021): rotate each (x_i, x_{i+D/2}) pair of a query or key by an angle
  proportional to its position, so q·k depends only on their offset. The "rotate half" layout of
  HF transformers, so HF Llama weights load unpermuted. Context extension: linear position
  interpolation (Chen et al. 2023), static NTK-aware base scaling, and YaRN (Peng et al. 2023).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def sinusoidal_positions(n_pos: int, dim: int, base: float = 10000.0) -> torch.Tensor:
    """The fixed encoding of "Attention Is All You Need": PE[p, 2i] = sin(p / base^(2i/d)),
    PE[p, 2i+1] = cos(p / base^(2i/d)). Returns (n_pos, dim)."""
    pos = torch.arange(n_pos, dtype=torch.float32)[:, None]  # (P, 1)
    inv_freq = base ** (-torch.arange(0, dim, 2, dtype=torch.float32) / dim)  # (dim/2,)
    pe = torch.zeros(n_pos, dim)
    pe[:, 0::2] = torch.sin(pos * inv_freq)
    pe[:, 1::2] = torch.cos(pos * inv_freq[: dim // 2])
    return pe


def causal_mask(T: int, window: int = 0, device: torch.device | str = "cpu") -> torch.Tensor:
    """(T, T) bool, True where query i may attend to key j: j <= i, and i - j < window if window > 0."""
    i = torch.arange(T, device=device)[:, None]
    j = torch.arange(T, device=device)[None, :]
    allowed = j <= i
    if window > 0:
        allowed &= (i - j) < window
    return allowed


def explicit_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0, training: bool = False,
    window: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention by hand. q, k, v: (B, H, T, D). Returns the output (B, H, T, D) and the
    attention weights (B, H, T, T), row t a distribution over positions 0..t."""
    T = q.size(-2)
    k, v = repeat_kv(k, q.size(1) // k.size(1)), repeat_kv(v, q.size(1) // v.size(1))  # GQA: share kv heads
    scores = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(q.size(-1)))  # (B, H, T, T)
    scores = scores.masked_fill(~causal_mask(T, window, q.device), float("-inf"))
    weights = F.softmax(scores, dim=-1)
    dropped = F.dropout(weights, dropout_p, training) if dropout_p > 0 else weights
    return dropped @ v, weights


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dropout_p: float = 0.0,
                   training: bool = False, window: int = 0) -> torch.Tensor:
    """The same computation through PyTorch's fused kernel (flash / memory-efficient / math).
    k, v may have fewer heads than q (grouped-query attention): each serves H / H_kv query heads."""
    p = dropout_p if training else 0.0
    gqa = k.size(1) != q.size(1)
    T = q.size(-2)
    if window <= 0 or window >= T:
        return F.scaled_dot_product_attention(q, k, v, dropout_p=p, is_causal=True, enable_gqa=gqa)
    mask = causal_mask(T, window, q.device)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, enable_gqa=gqa)


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D): each key/value head serves n_rep query heads."""
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)  # the same sum, one fused op
        # In fp32, as the reference implementations do: the mean of squares underflows in bf16.
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


def rope_frequencies(head_dim: int, theta: float, scaling: str = "none", factor: float = 1.0,
                     original_context: int = 0) -> tuple[torch.Tensor, float]:
    """(inv_freq (D/2,), attention scale) for RoPE, with an optional context-extension scheme."""
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim  # (D/2,)
    if scaling == "none" or factor == 1.0:
        return 1.0 / theta**exponents, 1.0
    if scaling == "linear":  # positions / factor: every frequency slowed by the same factor
        return 1.0 / theta**exponents / factor, 1.0
    if scaling == "ntk":  # raise the base so the lowest frequency stretches by `factor`, the highest barely
        return 1.0 / (theta * factor ** (head_dim / (head_dim - 2))) ** exponents, 1.0
    if scaling == "yarn":
        # High frequencies (many rotations within the original context) are kept, low ones are
        # interpolated by `factor`, with a linear ramp between; logits get a temperature 0.1 ln s + 1.
        if original_context <= 0:
            raise ValueError("yarn needs the original context length")

        def dim_of(rotations: float) -> float:
            return head_dim * math.log(original_context / (rotations * 2 * math.pi)) / (2 * math.log(theta))

        low = max(math.floor(dim_of(32.0)), 0)
        high = min(math.ceil(dim_of(1.0)), head_dim - 1)
        ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
        extrapolate = 1.0 / theta**exponents
        interpolate = extrapolate / factor
        inv_freq = interpolate * ramp + extrapolate * (1 - ramp)
        return inv_freq, 0.1 * math.log(factor) + 1.0
    raise ValueError(f"unknown rope scaling {scaling!r}")


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class RoPE(nn.Module):
    """Rotary position embedding: `rope(x, positions)` rotates x (B, H, T, D) by positions (B, T)."""

    def __init__(self, head_dim: int, theta: float = 10000.0, scaling: str = "none", factor: float = 1.0,
                 original_context: int = 0) -> None:
        super().__init__()
        inv_freq, self.attn_scale = rope_frequencies(head_dim, theta, scaling, factor, original_context)
        self.scaling = scaling  # the context-extension scheme ("none": positions end at the trained context)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self._memo: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def cos_sin(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (B, 1, T, D) for positions (B, T); memoised for the last positions seen,
        so the layers of one forward share them."""
        memo = self._memo
        if memo is not None and memo[0] is positions:
            return memo[1], memo[2]
        freqs = positions[..., None].float() * self.inv_freq  # (B, T, D/2)
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]  # (B, 1, T, D)
        cos, sin = emb.cos() * self.attn_scale, emb.sin() * self.attn_scale
        self._memo = (positions, cos, sin)
        return cos, sin

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        cos, sin = self.cos_sin(positions)
        xf = x.float()  # the rotation in fp32, as HF does; no copy when x is fp32
        return (xf * cos + rotate_half(xf) * sin).to(x.dtype)


class DocumentMask:
    """Attention confined to each document of a packed sequence (for training on packed examples).

    `model(x, y, doc_mask=DocumentMask(doc_ids))` trains on sequences that hold several examples
    (the models' `doc_mask`, apart from the inference `cache`, though it hands out `positions` and
    `attend`s as the caches do, see scratchlm/infer/kv_cache.py): a token attends only to earlier tokens of its own
    document, and positions restart at 0 at each document start, so every example is computed
    exactly as if it were alone. doc_ids: (B, T) ints, equal within a document.

    The rest of the attention is the layer's own, passed to `attend` by the model: its sliding
    window (the same convention as `causal_mask`; within a document, slot distance is position
    distance, so a windowed model sees the same keys packed as alone) and its attention dropout
    (GPT, in training). Without them a windowed model would be fine-tuned with full attention.
    """

    def __init__(self, doc_ids: torch.Tensor) -> None:
        B, T = doc_ids.shape
        self._same = (doc_ids[:, :, None] == doc_ids[:, None, :])[:, None]  # (B, 1, T, T)
        self._masks: dict[int, torch.Tensor] = {}  # window -> mask, shared by the layers of a forward
        idx = torch.arange(T, device=doc_ids.device).expand(B, T)
        starts = torch.ones_like(doc_ids, dtype=torch.bool)
        starts[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
        # position = distance to the most recent document start at or before t
        start_idx = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=1).values
        self._positions = idx - start_idx  # (B, T)

    def mask(self, window: int = 0) -> torch.Tensor:
        """(B, 1, T, T) bool: same document, causal, and within `window` when > 0."""
        if window not in self._masks:
            T = self._same.size(-1)
            self._masks[window] = self._same & causal_mask(T, window, self._same.device)
        return self._masks[window]

    def positions(self, T: int) -> torch.Tensor:
        return self._positions[:, :T]

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope, *, window: int = 0,
               dropout_p: float = 0.0) -> torch.Tensor:
        """As the caches' `attend`, plus the layer's window and dropout probability (0 outside training)."""
        if rope is not None:
            q, k = rope(q, self._positions), rope(k, self._positions)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.mask(window), dropout_p=dropout_p,
                                              enable_gqa=k.size(1) != q.size(1))


def check_context(cache, doc_mask: DocumentMask | None) -> None:
    """A forward either decodes with a KV cache (inference) or trains on packed documents, not both."""
    if cache is not None and doc_mask is not None:
        raise ValueError("a forward takes a KV cache (inference) or a document mask (training), not both")
