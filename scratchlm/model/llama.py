"""The modern decoder (Llama family): RMSNorm, RoPE, SwiGLU, grouped-query attention.

    tokens (B, T) -> token embedding -> n_layer x TransformerBlock -> RMSNorm -> output head

What changed since GPT-2, and why:
- RMSNorm instead of LayerNorm: no mean subtraction and no bias; as good, cheaper.
- RoPE instead of a learned position table: positions enter as rotations of q and k, so
  attention scores depend on relative offsets, and the context can be stretched later
  (`rope.scaling`). Nothing is added to the token embedding.
- SwiGLU feed-forward (Shazeer 2020): w2(silu(w1 x) * w3 x), hidden 8/3 x C so the three
  matrices cost what GPT's two 4x ones do.
- Grouped-query attention (Ainslie et al. 2023): n_kv_head key/value heads shared by n_head
  query heads; the KV cache shrinks by n_head / n_kv_head. n_kv_head = 1 is multi-query.
- No biases; an optional RMSNorm on each head's q and k (`qk_norm`, Qwen3); an optional
  sliding window (`sliding_window`, Mistral).

Names follow Meta's reference implementation (`tok_embeddings`, `layers.N.attention.wq`,
`feed_forward.w1`, `attention_norm`, ...). Shapes: B batch, T time, C = n_embd, H heads,
H_kv key/value heads, D = C / H head dim, V vocab.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import LlamaConfig
from scratchlm.errors import UserError
from scratchlm.losses import fusable_head, linear_cross_entropy
from scratchlm.model.base import AttentionShape, LanguageModel
from scratchlm.model.layers import DocumentMask, RMSNorm, RoPE, check_context, explicit_attention, sdpa_attention


def ffn_hidden(cfg: LlamaConfig) -> int:
    return cfg.ffn_hidden or 64 * math.ceil(8 * cfg.n_embd / 3 / 64)


def check_config(cfg: LlamaConfig) -> None:
    n_kv = cfg.n_kv_head or cfg.n_head
    if cfg.n_embd % cfg.n_head:
        raise UserError(f"model.n_embd={cfg.n_embd} is not divisible by model.n_head={cfg.n_head}")
    if cfg.n_head % n_kv:
        raise UserError(f"model.n_kv_head={n_kv} does not divide model.n_head={cfg.n_head}",
                        fix="use a divisor of n_head (1 = multi-query)")
    if (cfg.n_embd // cfg.n_head) % 2:
        raise UserError(f"head dim {cfg.n_embd // cfg.n_head} is odd; RoPE rotates pairs of dims",
                        fix="choose n_embd / n_head even")
    if cfg.rope.scaling not in ("none", "linear", "ntk", "yarn"):
        raise UserError(f"model.rope.scaling={cfg.rope.scaling!r} is unknown", fix="use none, linear, ntk or yarn")
    if cfg.sliding_window < 0:
        raise UserError(f"model.sliding_window={cfg.sliding_window} must be >= 0 (0 = off)")


class Attention(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.wq = nn.Linear(cfg.n_embd, self.n_head * self.head_dim, bias=cfg.bias)
        self.wk = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.wv = nn.Linear(cfg.n_embd, self.n_kv_head * self.head_dim, bias=cfg.bias)
        self.wo = nn.Linear(self.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps) if cfg.qk_norm else None
        self.window, self.impl = cfg.sliding_window, cfg.attn_impl
        self.record = False
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, rope: RoPE, positions: torch.Tensor | None, layer: int, cache,
                doc_mask: DocumentMask | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if doc_mask is not None:  # packed training: documents apart, this layer's window
            y = doc_mask.attend(layer, q, k, v, rope, window=self.window)
        elif cache is not None:  # the cache rotates, stores and attends (infer/kv_cache.py)
            y = cache.attend(layer, q, k, v, rope)
        else:
            q, k = rope(q, positions), rope(k, positions)
            if self.impl == "explicit" or self.record:
                y, w = explicit_attention(q, k, v, window=self.window)
                self.weights = w.detach() if self.record else None
            else:
                y = sdpa_attention(q, k, v, window=self.window)  # (B, H, T, D)
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class FeedForward(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        hidden = ffn_hidden(cfg)
        self.w1 = nn.Linear(cfg.n_embd, hidden, bias=False)  # gate
        self.w3 = nn.Linear(cfg.n_embd, hidden, bias=False)  # up
        self.w2 = nn.Linear(hidden, cfg.n_embd, bias=False)  # down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class TransformerBlock(nn.Module):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attention = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, rope: RoPE, positions, layer: int, cache,
                doc_mask: DocumentMask | None) -> torch.Tensor:
        x = x + self.attention(self.attention_norm(x), rope, positions, layer, cache, doc_mask)
        return x + self.feed_forward(self.ffn_norm(x))


class Llama(LanguageModel):
    def __init__(self, cfg: LlamaConfig) -> None:
        super().__init__()
        check_config(cfg)
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(TransformerBlock(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.output = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
        r = cfg.rope
        self.rope = RoPE(cfg.n_embd // cfg.n_head, r.theta, r.scaling, r.factor, r.original_context or cfg.block_size)
        self.init_weights()

    @property
    def embedding(self) -> nn.Embedding:
        return self.tok_embeddings

    @property
    def blocks(self) -> nn.ModuleList:
        return self.layers

    @property
    def unembedding(self) -> nn.Module:
        return self.output

    @property
    def rotary(self) -> RoPE:
        return self.rope

    def attention_shape(self) -> AttentionShape:
        c = self.config
        return AttentionShape(c.n_layer, c.n_kv_head or c.n_head, c.n_embd // c.n_head, c.sliding_window,
                              c.block_size)

    def init_weights(self) -> None:
        """N(0, 0.02) for matrices and embeddings, the residual-writing projections (wo, w2) scaled
        by 1/√(2·n_layer) as in GPT-2, norm gains 1, biases 0."""
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight")):
                nn.init.normal_(p, 0.0, resid_std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            else:
                nn.init.ones_(p)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None,
        doc_mask: DocumentMask | None = None, last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """As `GPT.forward`: idx (B, T) -> logits (B, T, V); given targets, (None, loss) (fused loss).
        With a cache or a doc_mask, RoPE's positions come from it (in its `attend`)."""
        B, T = idx.shape
        check_context(cache, doc_mask)
        positions = None
        if cache is None and doc_mask is None:
            if T > self.config.block_size and self.config.rope.scaling == "none":
                raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
            positions = torch.arange(T, device=idx.device)[None]  # (1, T), shared by the batch
        x = self.tok_embeddings(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rope, positions, i, cache, doc_mask)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if targets is not None and fusable_head(self.output):  # the loss without the (B, T, V) logits
            return None, linear_cross_entropy(x, self.output.weight, targets)
        logits = self.output(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, tied ones once (the token table stays in: tied, it is also the output matmul)."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6N + attention's 12·L·H·D·T (`transformer_flops`; the window, if any, not credited)."""
        return self.transformer_flops(self.num_params(), seq_len)
