"""AdamW with decoupled weight decay on matrices only (Loshchilov & Hutter 2019).

Weight decay pulls weights toward zero; it makes sense for the matrices that mix features, not
for LayerNorm gains and biases (decaying a gain toward 0 fights the normalisation) nor for
embeddings (a rare token's row would shrink whenever it is absent). Tied weights are counted once.

On CPU the fused AdamW kernel is about 4x faster than the default multi-tensor ("foreach") one
(measured here), so it is used wherever the parameters allow.
"""

from __future__ import annotations

import torch
from torch import nn

from scratchlm.config import TrainConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay = [], []
    for p in model.parameters():  # .parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and id(p) not in embeddings else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_optimizer(model: nn.Module, t: TrainConfig) -> torch.optim.AdamW:
    groups = param_groups(model, t.weight_decay)
    params = [p for g in groups for p in g["params"]]
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda", "mps") for p in params)
    return torch.optim.AdamW(groups, lr=t.lr, betas=(t.beta1, t.beta2), eps=1e-8, fused=fused)
