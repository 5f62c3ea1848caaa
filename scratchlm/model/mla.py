"""DeepSeek-V3: multi-head latent attention (MLA), the MoE blocks, and multi-token prediction (MTP).

    tokens -> embedding -> n_layer x [RMSNorm -> MLA -> RMSNorm -> FFN or MoE] -> RMSNorm -> head
                                                       (+ mtp_depth MTP modules while training)

Multi-head latent attention (DeepSeek-V2, 2024): keys and values are not projected from x per head;
x is compressed to one latent c (kv_lora_rank = r wide, RMS-normed) and every head's key (no position)
and value are expanded from it by `wkv_b`. Positions enter through a separate, decoupled part: a RoPE
key k_pe (qk_rope_head_dim wide) shared by all heads, and a RoPE part of each head's query. Per head:

    score = q_nope · k_nope + q_pe · k_pe,   scaled by 1/sqrt(qk_nope_head_dim + qk_rope_head_dim)

So a decoding step needs only c and k_pe of the past tokens: the cache (`LatentCache`,
infer/kv_cache.py) holds r + d_rope numbers per token and layer instead of 2 x H_kv x D.

Two ways to compute the same attention (`model.mla_absorb`):
- naive: expand the cached latents into per-head keys and values, attend as usual;
- absorbed: W_UK (wkv_b's key rows of head h, (dn, r)) moves into the query, q_lat = W_UKᵀ q_nope, so
  q_nope · (W_UK c) = q_lat · c; attention runs over the latent itself (one key/value "head" shared by
  all query heads, like multi-query attention in r + d_rope dims), and W_UV (the value rows) is
  applied to the attended latent afterwards. Nothing per head is ever built for the past tokens.
Training (T queries over T keys) is cheaper naive; decoding (1 query over S cached latents) absorbed:
`decode` picks that way. Both are tested equal.

Queries are optionally compressed too (`q_lora_rank`: wq_a -> RMSNorm -> wq_b). RoPE here is the
"rotate half" layout of layers.RoPE; DeepSeek's checkpoints interleave the pairs, which the HF
conversion turns into ours by permuting the rows that make q_pe and k_pe (convert/hf_deepseek.py).

Multi-token prediction (DeepSeek-V3, 2024): `mtp_depth` modules, module k predicting the token k+1
ahead. At position i it reads the previous depth's hidden state h^{k-1}_i (depth 0: the main model's
final normed hidden state, the input of its head) and the embedding of token t_{i+k}:

    h^k_i = Block_k(W_k [RMSNorm(h^{k-1}_i); RMSNorm(Emb(t_{i+k}))]),   logits = Head(RMSNorm_k(h^k_i))

with the model's embedding and head shared. The training loss is the next-token loss plus
mtp_loss_weight x the mean of the depths' losses (`losses.multi_token_loss`). At inference the modules
are a draft for speculative decoding (infer/mtp.py). A packed batch (a doc_mask) trains no MTP term.

Names follow DeepSeek's reference code (wq_a, q_norm, wq_b, wkv_a, kv_norm, wkv_b, wo). Shapes: B batch,
T new tokens, S tokens attended to, H heads, r kv_lora_rank, dn / dr / dv the nope / rope / value head dims.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config.model import MLAConfig
from scratchlm.errors import UserError
from scratchlm.losses import fusable_head, linear_cross_entropy, multi_token_loss
from scratchlm.model.base import AttentionShape
from scratchlm.model.layers import DocumentMask, RMSNorm, RoPE, causal_mask, check_context
from scratchlm.model.llama import TransformerBlock
from scratchlm.model.moe import MoE

LATENT_EPS = 1e-6  # the latents' RMSNorms use DeepSeek's fixed epsilon, not model.norm_eps (as HF's DeepseekV3)


class LatentAttention(nn.Module):
    """Multi-head latent attention; the block calls it as it calls `llama.Attention`."""

    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        C, H = cfg.n_embd, cfg.n_head
        self.n_head, self.rank = H, cfg.kv_lora_rank
        self.dn, self.dr, self.dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        dq = self.dn + self.dr
        if cfg.q_lora_rank:
            self.wq_a = nn.Linear(C, cfg.q_lora_rank, bias=cfg.bias)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * dq, bias=False)
            self.wq = None
        else:
            self.wq = nn.Linear(C, H * dq, bias=False)
        self.wkv_a = nn.Linear(C, self.rank + self.dr, bias=cfg.bias)  # -> [latent | RoPE key]
        self.kv_norm = RMSNorm(self.rank, LATENT_EPS)
        self.wkv_b = nn.Linear(self.rank, H * (self.dn + self.dv), bias=False)  # latent -> [k_nope | v] per head
        self.wo = nn.Linear(H * self.dv, C, bias=cfg.bias)
        self.scale = 1.0 / math.sqrt(dq)
        self.window, self.absorb = cfg.sliding_window, cfg.mla_absorb

    def forward(self, x: torch.Tensor, rope: RoPE, positions: torch.Tensor | None, layer: int, cache,
                doc_mask: DocumentMask | None) -> torch.Tensor:
        B, T, _ = x.shape
        H = self.n_head
        q = self.wq(x) if self.wq is not None else self.wq_b(self.q_norm(self.wq_a(x)))
        q_nope, q_pe = q.view(B, T, H, self.dn + self.dr).transpose(1, 2).split([self.dn, self.dr], -1)
        latent, k_pe = self.wkv_a(x).split([self.rank, self.dr], -1)
        latent, k_pe = self.kv_norm(latent), k_pe[:, None]  # (B, T, r), (B, 1, T, dr): one RoPE key for all heads
        mask, causal = None, False
        if doc_mask is not None:
            positions, mask = doc_mask.positions(T), doc_mask.mask(self.window)
        elif cache is not None:
            if not hasattr(cache, "extend"):
                raise UserError(f"model.arch=mla caches latents: {type(cache).__name__} cannot hold them",
                                fix="use sample.cache=kv")
            positions = cache.positions(T)
        elif self.window > 0 and self.window < T:
            mask = causal_mask(T, self.window, x.device)
        else:
            causal = True
        q_pe, k_pe = rope(q_pe, positions), rope(k_pe, positions)
        if cache is not None:  # the past's latents and RoPE keys, this step's appended: (B, S, r), (B, 1, S, dr)
            latent, k_pe, mask = cache.extend(layer, latent, k_pe)
        absorb = self.absorb == "always" or (self.absorb == "decode" and cache is not None)
        attend = self.absorbed if absorb else self.naive
        y = attend(q_nope, q_pe, latent, k_pe, mask, causal)  # (B, H, T, dv)
        return self.wo(y.transpose(1, 2).reshape(B, T, H * self.dv))

    def _sdpa(self, q, k, v, mask, causal) -> torch.Tensor:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=self.scale,
                                              enable_gqa=k.size(1) != q.size(1))

    def naive(self, q_nope, q_pe, latent, k_pe, mask, causal) -> torch.Tensor:
        """Keys and values of every head expanded from the latent: (B, H, S, dn + dr) and (B, H, S, dv)."""
        B, S, H = latent.size(0), latent.size(1), self.n_head
        k_nope, v = self.wkv_b(latent).view(B, S, H, self.dn + self.dv).transpose(1, 2).split([self.dn, self.dv], -1)
        k = torch.cat([k_nope, k_pe.expand(B, H, S, self.dr)], dim=-1)
        return self._sdpa(torch.cat([q_nope, q_pe], dim=-1), k, v, mask, causal)

    def absorbed(self, q_nope, q_pe, latent, k_pe, mask, causal) -> torch.Tensor:
        """W_UK folded into the query and W_UV applied after: attention over the latent (one shared head)."""
        w = self.wkv_b.weight.view(self.n_head, self.dn + self.dv, self.rank)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn :]  # (H, dn, r), (H, dv, r)
        q_lat = torch.einsum("bhtd,hdr->bhtr", q_nope, w_uk)  # (B, H, T, r)
        k = torch.cat([latent[:, None], k_pe], dim=-1)  # (B, 1, S, r + dr)
        o = self._sdpa(torch.cat([q_lat, q_pe], dim=-1), k, latent[:, None], mask, causal)  # (B, H, T, r)
        return torch.einsum("bhtr,hvr->bhtv", o, w_uv)


def latent_block(cfg: MLAConfig) -> TransformerBlock:
    """A Llama block (dense SwiGLU) whose attention is latent attention."""
    block = TransformerBlock(cfg)
    block.attention = LatentAttention(cfg)
    return block


class MTPModule(nn.Module):
    """One multi-token prediction depth: (h^{k-1} (B, T, C), Emb(t_{i+k}) (B, T, C)) -> h^k (B, T, C)."""

    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__()
        self.config = cfg
        C = cfg.n_embd
        self.hnorm, self.enorm = RMSNorm(C, cfg.norm_eps), RMSNorm(C, cfg.norm_eps)
        self.proj = nn.Linear(2 * C, C, bias=False)
        self.block = latent_block(cfg)
        self.norm = RMSNorm(C, cfg.norm_eps)  # before the shared head

    def attention_shape(self) -> AttentionShape:
        """One layer of latents: what a draft's cache for this module holds (infer/mtp.py)."""
        c = self.config
        return AttentionShape(1, 1, c.kv_lora_rank, c.sliding_window, c.block_size, c.kv_lora_rank,
                              c.qk_rope_head_dim)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, rope: RoPE, cache=None) -> torch.Tensor:
        T = h.size(1)
        x = self.proj(torch.cat([self.hnorm(h), self.enorm(emb)], dim=-1))
        positions = None if cache is not None else torch.arange(T, device=h.device)[None]
        x = self.block(x, rope, positions, 0, cache, None)
        if cache is not None:
            cache.advance(T)
        return x


class MLA(MoE):
    """DeepSeek-V3: the MoE's blocks with latent attention, and `mtp_depth` MTP modules (`self.mtp`)."""

    def __init__(self, cfg: MLAConfig) -> None:
        super().__init__(cfg)
        for block in self.layers:
            block.attention = LatentAttention(cfg)
        self.rope = RoPE(cfg.qk_rope_head_dim, cfg.rope.theta)
        self.mtp = nn.ModuleList(MTPModule(cfg) for _ in range(cfg.mtp_depth))
        self.init_weights()

    def attention_shape(self) -> AttentionShape:
        c = self.config
        return AttentionShape(c.n_layer, 1, c.kv_lora_rank, c.sliding_window, c.block_size, c.kv_lora_rank,
                              c.qk_rope_head_dim)

    def hidden(self, idx: torch.Tensor, cache=None, doc_mask: DocumentMask | None = None) -> torch.Tensor:
        """The last block's output (B, T, C), before the final norm."""
        B, T = idx.shape
        check_context(cache, doc_mask)
        positions = None
        if cache is None and doc_mask is None:
            if T > self.config.block_size:
                raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
            positions = torch.arange(T, device=idx.device)[None]
        x = self.tok_embeddings(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, self.rope, positions, i, cache, doc_mask)
        if cache is not None:
            cache.advance(T)
        return x

    def token_loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the head on normed hidden states h (B, T, C) against targets (B, T), -1 ignored."""
        if fusable_head(self.output):
            return linear_cross_entropy(h, self.output.weight, targets)
        logits = self.output(h)
        return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)

    def mtp_hidden(self, h0: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
        """Each MTP depth's output h^k (B, T - k, C), from the main model's normed hidden states h0 (B, T, C)
        and the tokens idx (B, T): position i of depth k reads h^{k-1}_i and t_{i+k} and predicts t_{i+k+1}."""
        outs, h, T = [], h0, idx.size(1)
        for k, module in enumerate(self.mtp, start=1):
            if T - k < 1:
                break
            h = module(h[:, : T - k], self.tok_embeddings(idx[:, k:]), self.rope)
            outs.append(h)
        return outs

    def mtp_logits(self, idx: torch.Tensor) -> list[torch.Tensor]:
        """Each depth's logits (B, T - k, V) on idx (B, T) with no cache: the reference the draft is tested against."""
        h0 = self.norm(self.hidden(idx))
        return [self.output(m.norm(h)) for m, h in zip(self.mtp, self.mtp_hidden(h0, idx))]

    def forward(self, idx, targets=None, *, cache=None, doc_mask: DocumentMask | None = None, last_only: bool = False):
        """As `Llama.forward`; with targets and MTP on, the loss adds the MTP term (targets (B, T) are the
        next tokens of idx, so depth k's labels are targets[:, k:])."""
        x = self.hidden(idx, cache, doc_mask)
        if last_only:
            x = x[:, -1:]
        h = self.norm(x)
        if targets is None:
            return self.output(h), None
        loss = self.token_loss(h, targets)
        c = self.config
        if self.mtp and c.mtp_loss_weight > 0 and doc_mask is None:
            depths = [self.token_loss(m.norm(hk), targets[:, k:])
                      for k, (m, hk) in enumerate(zip(self.mtp, self.mtp_hidden(h, idx)), start=1)]
            loss = multi_token_loss(loss, depths, c.mtp_loss_weight)
        return None, loss + self.aux_loss()
