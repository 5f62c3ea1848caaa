"""A GPT-2-style decoder, readable top to bottom (Radford et al. 2019).

    tokens (B, T) -> token embedding + position encoding -> n_layer x Block -> LayerNorm -> LM head

Block (pre-norm): x + Attention(LN(x)), then x + MLP(LN(x)). Attention is multi-head causal
self-attention: one linear makes Q, K and V for all heads at once, heads are split, attend
independently, are concatenated back and mixed by an output projection. The MLP expands 4x with
GELU. Choices, all in `GPTConfig`: learned or sinusoidal positions, the explicit or the fused
(SDPA) attention kernel, biases, dropout, and an LM head tied to the token embedding.

Initialisation follows GPT-2: N(0, 0.02) for every weight, zero biases, and the two projections
that write into the residual stream scaled by 1/√(2·n_layer), so the residual's variance does not
grow with depth. (It also keeps fp32 CPU training clear of denormal numbers, which PyTorch's
default init produces here and which slow a step about 10x.)

Shapes: B batch, T time (tokens), C = n_embd channels, H heads, D = C / H per head, V vocab.
Left out here: KV cache, RoPE and the other modern parts (see the Llama-family model).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import GPTConfig
from scratchlm.errors import UserError
from scratchlm.losses import fusable_head, linear_cross_entropy
from scratchlm.model.base import AttentionShape, LanguageModel
from scratchlm.model.layers import DocumentMask, check_context, explicit_attention, sdpa_attention, sinusoidal_positions


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.dropout = cfg.n_head, cfg.dropout
        self.c_attn = nn.Linear(cfg.n_embd, 3 * cfg.n_embd, bias=cfg.bias)  # Q, K, V for all heads
        self.c_proj = nn.Linear(cfg.n_embd, cfg.n_embd, bias=cfg.bias)  # mixes the heads back
        self.resid_drop = nn.Dropout(cfg.dropout)
        self.impl = cfg.attn_impl
        self.window = cfg.sliding_window
        self.record = False  # keep the attention weights of the last forward (explicit path only)
        self.weights: torch.Tensor | None = None

    def forward(self, x: torch.Tensor, layer: int = 0, cache=None, doc_mask: DocumentMask | None = None
                ) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)  # each (B, T, C)
        # split heads: (B, T, C) -> (B, H, T, D)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        if doc_mask is not None:  # packed training: documents apart, this layer's window and dropout
            y = doc_mask.attend(layer, q, k, v, None, window=self.window,
                                dropout_p=self.dropout if self.training else 0.0)
        elif cache is not None:  # inference: the cache stores k, v and attends over the past (infer/kv_cache.py)
            y = cache.attend(layer, q, k, v, None)
        elif self.impl == "explicit" or self.record:
            y, w = explicit_attention(q, k, v, self.dropout, self.training, self.window)
            self.weights = w.detach() if self.record else None
        else:
            y = sdpa_attention(q, k, v, self.dropout, self.training, self.window)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # concatenate heads: (B, T, C)
        return self.resid_drop(self.c_proj(y))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.c_fc = nn.Linear(cfg.n_embd, 4 * cfg.n_embd, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.n_embd, cfg.n_embd, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # GELU with the tanh approximation, as GPT-2 was trained with.
        return self.drop(self.c_proj(F.gelu(self.c_fc(x), approximate="tanh")))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, layer: int = 0, cache=None, doc_mask: DocumentMask | None = None
                ) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x), layer, cache, doc_mask)
        return x + self.mlp(self.ln_2(x))


class GPT(LanguageModel):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        if cfg.n_embd % cfg.n_head:
            raise UserError(f"model.n_embd={cfg.n_embd} is not divisible by model.n_head={cfg.n_head}")
        if cfg.pos_emb not in ("learned", "sinusoidal"):
            raise UserError(f"model.pos_emb={cfg.pos_emb!r} is unknown", fix="use learned or sinusoidal")
        if cfg.attn_impl not in ("sdpa", "explicit"):
            raise UserError(f"model.attn_impl={cfg.attn_impl!r} is unknown", fix="use sdpa or explicit")
        self.config = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        if cfg.pos_emb == "learned":
            self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        else:
            self.register_buffer("pe", sinusoidal_positions(cfg.block_size, cfg.n_embd), persistent=False)
        self.drop = nn.Dropout(cfg.dropout)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=cfg.bias)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # one (V, C) matrix reads tokens in and writes logits out
        self.init_weights()

    @property
    def embedding(self) -> nn.Embedding:
        return self.wte

    @property
    def blocks(self) -> nn.ModuleList:
        return self.h

    @property
    def unembedding(self) -> nn.Module:
        return self.lm_head

    def attention_shape(self) -> AttentionShape:
        c = self.config
        return AttentionShape(c.n_layer, c.n_head, c.n_embd // c.n_head, c.sliding_window, c.block_size)

    def init_weights(self) -> None:
        """Every tensor's initialisation, in one place (GPT-2's scheme; see the module docstring)."""
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, resid_std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:  # linears and embeddings
                nn.init.normal_(p, 0.0, 0.02)
            else:  # LayerNorm gains
                nn.init.ones_(p)

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None,
        doc_mask: DocumentMask | None = None, last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """idx: (B, T) token ids. Returns logits (B, T, V) and, given targets (B, T), the mean
        cross-entropy of predicting targets[:, t] from idx[:, :t+1] (targets -1 are ignored).
        Given targets, the loss comes from `linear_cross_entropy`, chunk by chunk, and the logits
        are never built: (None, loss). A call that wants both asks for the logits without targets.

        With a `cache` (inference), idx holds only the new tokens; positions come from the cache.
        With a `doc_mask` (training on packed sequences), each token attends within its own document
        and positions restart at each document's start. `last_only` computes logits for the last
        position only (all that decoding needs)."""
        B, T = idx.shape
        check_context(cache, doc_mask)
        context = cache if cache is not None else doc_mask  # either hands out each token's position
        if context is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
            pos = self.wpe.weight[:T] if self.config.pos_emb == "learned" else self.pe[:T]  # (T, C)
        else:
            positions = context.positions(T)  # (B, T)
            pos = self.wpe(positions) if self.config.pos_emb == "learned" else self.pe[positions]  # (B, T, C)
        x = self.drop(self.wte(idx) + pos)  # (B, T, C)
        for i, block in enumerate(self.h):
            x = block(x, i, cache, doc_mask)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        x = self.ln_f(x)
        if targets is not None and fusable_head(self.lm_head):  # the loss without the (B, T, V) logits
            return None, linear_cross_entropy(x, self.lm_head.weight, targets)
        logits = self.lm_head(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
        return logits, loss

    # -- accounting -----------------------------------------------------------------------------
    def num_params(self, non_embedding: bool = True) -> int:
        """Parameters, each tied tensor once; without the position table by default (it does no
        matmul). The token table stays in: tied, it is also the LM head's matmul."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and self.config.pos_emb == "learned":
            n -= self.wpe.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward): 6N + 12·L·C·T (`transformer_flops`)."""
        return self.transformer_flops(self.num_params(), seq_len)
