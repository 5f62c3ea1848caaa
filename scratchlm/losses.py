"""Loss math shared across stages, as pure functions tested against hand computations.

So far: the mixture-of-experts router losses. Later stages add theirs here (masked
cross-entropy, Bradley-Terry, DPO, PPO clip, GAE, GRPO advantages, KL estimators).
"""

from __future__ import annotations

import torch


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer / GShard auxiliary loss: E * sum_e f_e * P_e.

    probs (N, E): the router's softmax over experts per token. experts (N, k): the chosen
    experts. f_e is the fraction of the N*k routing assignments that went to expert e, P_e the
    mean router probability of e. It is 1 when routing is uniform and grows as load concentrates;
    gradients flow through P (f comes from a discrete top-k). (HF Mixtral's version is k times
    this value: it does not divide the assignments by k.)
    """
    N, k = experts.shape
    f = torch.bincount(experts.flatten(), minlength=n_experts).to(probs.dtype) / (N * k)  # (E,)
    P = probs.mean(0)  # (E,)
    return n_experts * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(router logits)^2, which keeps the logits
    small so the router's softmax stays numerically stable (Zoph et al. 2022). logits: (N, E)."""
    return torch.logsumexp(logits.float(), dim=-1).pow(2).mean()


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the router's distribution per token; ln E = undecided, 0 = certain."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()
