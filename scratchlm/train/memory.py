"""Trading compute for memory, applied to a model from outside: activation checkpointing.

A block's backward needs tensors its forward made (the inputs of each matmul, the attention
probabilities or what the fused kernel keeps, the MLP's hidden activations): ordinarily they stay
in memory from the forward until the backward, which for a deep model is most of the memory a
step uses. `checkpoint_blocks(model, k)` makes every k-th block keep only its input and run its
forward a second time in the backward to remake the rest (`torch.utils.checkpoint`, the
non-reentrant kind that composes with FSDP2 and torch.compile):

- k = 1 checkpoints every block: activation memory falls to one tensor (B, T, C) per block, and a
  step costs about one more forward of the blocks (from 3x to 4x the forward's FLOPs);
- k > 1 checkpoints blocks 0, k, 2k, ...: a middle point between memory and compute.

The gradients are those of the plain model (the recompute runs the same operations in the same
order; dropout draws the same masks, as the RNG state is restored). The block's forward is
replaced on the instance, so the weights keep their names and checkpoints do not change.
"""

from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


def _checkpointed(forward, *args, **kwargs):
    if not torch.is_grad_enabled():  # inference, evaluation: nothing to save, nothing to recompute
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_blocks(model: nn.Module, every: int = 1) -> list[int]:
    """Checkpoint blocks 0, every, 2*every, ... of `model.blocks` in place; returns their indices."""
    if every < 1:
        raise ValueError(f"every={every} must be >= 1")
    done = []
    for i, block in enumerate(model.blocks):
        if i % every == 0 and not getattr(block, "_checkpointed", False):
            block.forward = functools.partial(_checkpointed, block.forward)
            block._checkpointed = True
            done.append(i)
    return done
