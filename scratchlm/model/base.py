"""The surface every model offers the stages, declared once so no caller guesses at attribute names.

- `embedding`: the token table (nn.Embedding, V rows), or None for a model without one (the baselines:
  the bigram's table holds logits, the MLP's has an extra "no token" row).
- `blocks`: the transformer blocks in order (empty for the baselines): per-layer metrics read them.
- `unembedding`: the output nn.Linear that writes vocabulary logits, or None where there is none.
- `rotary`: the model's RoPE when positions enter as rotations (the Llama family), else None: only then
  can cached keys move to new positions (the sink cache) or the context stretch (`model.rope.scaling`).
- `attention_shape()`: what a cache must hold for this model (layers, key/value heads, head dim, sliding
  window, trained context), or None for a model that cannot decode with one (the baselines); `can_stretch`:
  whether the context may reach past block_size (RoPE with a scaling scheme set).
- hooks the training loop calls on every model, with neutral defaults: `aux_loss()` (a loss term added
  to the cross-entropy, 0.0 here), `after_optimizer_step()` (nothing here), `routing_metrics()` ({}).
  The MoE overrides the three; the classifier forwards them to its body.

State-dict and attribute names stay each architecture's own (`wte`, `tok_embeddings`, `rope`, ...): the
accessors are properties over them (named apart from them: nn.Module would file a submodule assigned to
a same-named attribute away from a property), so checkpoints and the HF conversions are untouched.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from scratchlm.model.layers import RoPE


@dataclass(frozen=True)
class AttentionShape:
    """What a cache needs to know about a model: per layer, n_kv_head heads of head_dim keys and values;
    `window` > 0 limits each query to that many latest positions; `context` is block_size. A model that
    caches a latent instead (MLA) sets `latent_dim` (its width) and `rope_dim` (its RoPE key's width)."""

    n_layer: int
    n_kv_head: int
    head_dim: int
    window: int
    context: int
    latent_dim: int = 0
    rope_dim: int = 0


class LanguageModel(nn.Module):
    @property
    def embedding(self) -> nn.Embedding | None:
        return None

    @property
    def blocks(self) -> Sequence[nn.Module]:
        return ()

    @property
    def unembedding(self) -> nn.Module | None:
        """The output head (an nn.Linear, or a LoRA / quantized wrapper of one after `adapt_model`)."""
        return None

    @property
    def rotary(self) -> RoPE | None:
        return None

    def attention_shape(self) -> AttentionShape | None:
        """None: this model has no attention to cache (its forward takes no `cache`)."""
        return None

    @property
    def recurrent(self) -> bool:
        """Whether some layer keeps a recurrent state (an SSM's scan) in the cache: such a cache cannot
        roll back to an earlier length (speculative decoding's rejected tokens)."""
        return False

    @property
    def can_stretch(self) -> bool:
        """Whether generation may run past block_size: only RoPE with a scaling scheme (a learned position
        table, or unscaled RoPE, ends at the trained context)."""
        return self.rotary is not None and self.rotary.scaling != "none"

    def aux_loss(self) -> torch.Tensor | float:
        return 0.0

    def after_optimizer_step(self) -> None:
        """Called after each optimizer step (the MoE's sigmoid router moves its balancing bias here)."""

    def routing_metrics(self) -> dict[str, float]:
        return {}

    def transformer_flops(self, weights: int, seq_len: int | None = None) -> float:
        """Training FLOPs per token of a transformer with `weights` parameters in use per token:
        6 per weight that multiplies (forward + backward; untied, the token table is a lookup and is
        left out) plus attention's QKᵀ and AV, 2 matmuls x 2 FLOPs x T x C per layer, x3 for the
        backward: 12·L·C·T (T the full context; causal masking is not credited, as in PaLM's MFU)."""
        c = self.config
        lookup = 0 if c.tie_embeddings else self.embedding.weight.numel()
        return 6 * (weights - lookup) + 12 * c.n_layer * c.n_embd * (seq_len or c.block_size)
