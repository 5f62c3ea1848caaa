"""The Jamba hybrid (Lieber et al. 2024): Mamba layers interleaved with attention and MoE layers.

    tokens (B, T) -> token embedding -> n_layer x block -> RMSNorm -> output head
    block i: x + mixer(RMSNorm(x)), then x + feed-forward(RMSNorm(x))
      mixer:        attention if i % attn_layer_period == attn_layer_offset, else Mamba (model/mamba.py)
      feed-forward: MoE (model/moe.py's MoELayer, softmax top-k, unrenormalised) where `is_moe_layer`
                    (i % moe_every == moe_first_dense, Jamba's expert period and offset), else SwiGLU

Jamba v0.1 has one attention layer in 8 and an MoE in every other layer. The attention layers are
Llama's grouped-query attention with no positional encoding at all: the Mamba layers, recurrent,
already know the order of the tokens (Jamba's ablation found RoPE unnecessary). So the Llama pieces
are reused as they are, handed a rotation that leaves q and k alone (`no_rotation`).

Decoding: an attention layer keeps keys and values in the cache as usual (the cache holds only the
attention layers: `attention_shape()` counts those, `attention_slot` maps a layer to its slot); a
Mamba layer keeps its constant-size conv + scan state through the cache's `state` / `set_state`, so
its memory does not grow with the context. Left padding in a batched prefill is masked out of the
Mamba layers: a new token is padding when its row's length, counted from the cache, is still < 0.
Packed training (`doc_mask`) restarts the Mamba state and conv at each document start.

Shapes: B batch, T time, C = n_embd.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config.model import JambaConfig
from scratchlm.errors import UserError
from scratchlm.losses import fusable_head, linear_cross_entropy
from scratchlm.model.base import AttentionShape, LanguageModel
from scratchlm.model.layers import DocumentMask, RMSNorm, check_context
from scratchlm.model.llama import FeedForward, TransformerBlock, check_config
from scratchlm.model.mamba import Mamba
from scratchlm.model.moe import MoE, MoELayer, check_moe_config, expert_hidden, is_moe_layer


def no_rotation(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Jamba's attention has no positional encoding: the rotation the Llama attention applies is the identity."""
    return x


def is_attention_layer(cfg: JambaConfig, i: int) -> bool:
    return i % cfg.attn_layer_period == cfg.attn_layer_offset


class MambaBlock(nn.Module):
    """RMSNorm -> Mamba -> residual, RMSNorm -> feed-forward -> residual."""

    def __init__(self, cfg: JambaConfig) -> None:
        super().__init__()
        self.mamba_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mamba = Mamba(cfg.n_embd, cfg.mamba_expand * cfg.n_embd, cfg.mamba_d_state, cfg.mamba_d_conv,
                           cfg.mamba_dt_rank, cfg.mamba_conv_bias, cfg.mamba_proj_bias, cfg.norm_eps,
                           cfg.mamba_scan, cfg.mamba_chunk)
        self.ffn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.feed_forward = FeedForward(cfg)

    def forward(self, x: torch.Tensor, layer: int, cache, keep: torch.Tensor | None,
                starts: torch.Tensor | None) -> torch.Tensor:
        state = cache.state(layer) if cache is not None else None
        y, new_state = self.mamba(self.mamba_norm(x), state, keep, starts)
        if cache is not None:
            cache.set_state(layer, new_state)
        x = x + y
        return x + self.feed_forward(self.ffn_norm(x))


class Jamba(LanguageModel):
    def __init__(self, cfg: JambaConfig) -> None:
        super().__init__()
        check_config(cfg)
        check_moe_config(cfg)
        if cfg.attn_layer_offset >= cfg.attn_layer_period:
            raise UserError(f"model.attn_layer_offset={cfg.attn_layer_offset} must be < "
                            f"model.attn_layer_period={cfg.attn_layer_period}")
        self.config = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(TransformerBlock(cfg) if is_attention_layer(cfg, i) else MambaBlock(cfg)
                                    for i in range(cfg.n_layer))
        for i, block in enumerate(self.layers):
            if is_moe_layer(cfg, i):
                block.feed_forward = MoELayer(cfg)
        # layer index -> its slot in the key/value cache, for the attention layers only
        self.attention_slot = {i: n for n, i in enumerate(i for i in range(cfg.n_layer) if is_attention_layer(cfg, i))}
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.output = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.output.weight = self.tok_embeddings.weight
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
    def recurrent(self) -> bool:
        return True

    def attention_shape(self) -> AttentionShape:
        """The key/value cache of the attention layers only; the Mamba layers keep states beside it."""
        c = self.config
        return AttentionShape(len(self.attention_slot), c.n_kv_head or c.n_head, c.n_embd // c.n_head,
                              c.sliding_window, c.block_size)

    def init_weights(self) -> None:
        """N(0, 0.02) for matrices, experts and embeddings; the residual-writing projections (attention
        wo, Mamba out_proj, the feed-forwards' and experts' down projections) scaled by 1/√(2·n_layer);
        norm gains 1, biases 0; then Mamba's own A, D and step-size bias (`Mamba.init_ssm`)."""
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for name, p in self.named_parameters():
            if name.endswith(("wo.weight", "w2.weight", "out_proj.weight", "w2_EHC")):
                nn.init.normal_(p, 0.0, resid_std)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif p.dim() >= 2:
                nn.init.normal_(p, 0.0, 0.02)
            else:
                nn.init.ones_(p)
        for m in self.modules():
            if isinstance(m, Mamba):
                m.init_ssm()
            elif isinstance(m, MoELayer):
                m.select_bias.zero_()

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None, *, cache=None,
        doc_mask: DocumentMask | None = None, last_only: bool = False,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """As `Llama.forward`: idx (B, T) -> logits (B, T, V); given targets, (None, loss + router losses)."""
        B, T = idx.shape
        check_context(cache, doc_mask)
        if cache is None and T > self.config.block_size:
            raise ValueError(f"sequence of {T} tokens is longer than block_size={self.config.block_size}")
        keep = starts = None
        if cache is not None:  # left padding: a new token is padding while its row's length is still < 0
            keep = torch.arange(T, device=idx.device)[None] + cache.lengths()[:, None].to(idx.device) >= 0
            keep = None if bool(keep.all()) else keep
        elif doc_mask is not None:
            starts = doc_mask.positions(T) == 0  # (B, T) a document starts: the Mamba layers restart
        x = self.tok_embeddings(idx)  # (B, T, C)
        for i, layer in enumerate(self.layers):
            if i in self.attention_slot:
                x = layer(x, no_rotation, None, self.attention_slot[i], cache, doc_mask)
            else:
                x = layer(x, i, cache, keep, starts)
        if cache is not None:
            cache.advance(T)
        if last_only:
            x = x[:, -1:]
        x = self.norm(x)
        if targets is not None and fusable_head(self.output):
            loss = linear_cross_entropy(x, self.output.weight, targets)
            return None, loss + self.aux_loss()
        logits = self.output(x)  # (B, T, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)
            loss = loss + self.aux_loss()
        return logits, loss

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        return [(i, b.feed_forward) for i, b in enumerate(self.layers) if isinstance(b.feed_forward, MoELayer)]

    # the MoE's router losses, balancing-bias step and routing metrics, over `moe_layers`
    aux_loss = MoE.aux_loss
    after_optimizer_step = MoE.after_optimizer_step
    routing_metrics = MoE.routing_metrics

    def num_params(self, non_embedding: bool = True) -> int:
        """As Llama's and the MoE's: parameters, tied ones once; the token table stays in (no position
        table to leave out). `active_params`, `flops_per_token` and experiments/arch.py's `param_counts`
        (which takes the tables off itself) rely on that."""
        return sum(p.numel() for p in self.parameters())

    def active_params(self) -> int:
        """Parameters one token uses: all but the (E - k) experts it is not routed to, per MoE layer."""
        c = self.config
        per_expert = 3 * c.n_embd * expert_hidden(c)
        return self.num_params() - len(self.moe_layers()) * (c.n_experts - c.n_active_experts) * per_expert

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """6 x active weights (the lookup left out when untied) + 12·C·T per attention layer. The scan's
        elementwise work, O(expand·C·N) per token and layer, is not counted (as norms are not)."""
        c = self.config
        lookup = 0 if c.tie_embeddings else self.tok_embeddings.weight.numel()
        attention = 12 * len(self.attention_slot) * c.n_embd * (seq_len or c.block_size)
        return 6 * (self.active_params() - lookup) + attention
