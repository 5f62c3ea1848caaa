"""Loss math of online RL on a language model (PPO, GRPO), as pure functions tested against hand
computations.

- `masked_mean`, `masked_var`, `masked_whiten`: statistics over the response tokens only, and the
  advantage whitening of PPO implementations (TRL, OpenRLHF).
- `discounted_returns`: reward-to-go per token.
- `gae`: generalized advantage estimation (Schulman et al. 2016) -> advantages and value targets.
- `kl_penalty`: per-token estimators k1, k2, k3 of KL(π || ref) from samples of π (Schulman 2020,
  "Approximating KL divergence"): k1 as the reward penalty of PPO-RLHF, k3 as GRPO's loss term.
- `clipped_surrogate`: PPO's clipped policy loss (Schulman et al. 2017), with the clip fraction
  and approximate KL to the rollout policy to log.
- `clipped_value_loss`: PPO's clipped value loss.
- `aggregate`: token losses -> one loss, per token (DAPO, Yu et al. 2025), per sequence (the
  original GRPO, Shao et al. 2024) or over a constant length (Dr. GRPO, Liu et al. 2025).
- `group_advantages`: GRPO's per-group normalised rewards, and which groups taught nothing.
- `explained_variance`: how much of the returns' variance the value head explains.
- `entropy_from_logits`: the policy's entropy per position.
- `AdaptiveKLController`, `FixedKLController`: the KL coefficient (Ziegler et al. 2019).

Conventions: token tensors are (B, T) over the response positions of B rollouts, and `mask` (B, T)
is 1.0 / True on response tokens and 0 elsewhere (prompt and padding). A row's response tokens are
contiguous but may start at any column (left- or right-padded rows). Entries outside the mask may
hold anything, inf and nan included: they never reach a masked result, nor a gradient (they are
dropped with `torch.where` before any exp or sum could spread them; never multiplied by 0, as
nan * 0 is nan). Per-token results of the functions that take a mask are 0 outside it. All math
runs in the input dtype (float64 inputs give exact checks; the caller upcasts bf16). The functions
never touch a model: the stage computes log-probabilities, values and rewards and passes them in.
Targets and constants (rollout log-probabilities, advantages, old values, returns) are detached
here, so a mistake in the caller cannot send a gradient through them.

Left out: asymmetric ("clip-higher") and dual-clip PPO, leave-one-out baselines (RLOO), and
distributed statistics (whitening over several processes).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch

Aggregation = Literal["token", "sequence", "constant"]


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the masked entries: over all of them (dim None, a scalar) or along `dim`.
    x, mask: same shape. No masked entry (in the whole tensor, or in a slice along dim) gives nan:
    the mean of nothing is undefined, and a statistic should not read 0 there."""
    m = mask.bool()
    total = torch.where(m, x, 0).sum() if dim is None else torch.where(m, x, 0).sum(dim)
    count = m.sum() if dim is None else m.sum(dim)
    return total / count.to(x.dtype)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over all masked entries (a scalar), with Bessel's correction n/(n-1) when
    `unbiased` (as TRL's masked_var and torch.var). nan with no masked entry, or with one when unbiased."""
    m = mask.bool()
    mean = masked_mean(x, m)
    var = masked_mean((x - mean).pow(2), m)
    if unbiased:
        n = m.sum().to(x.dtype)
        var = var * n / (n - 1)  # n = 1: 0 * 1/0 = nan, as torch.var of one value
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """x scaled to unit (unbiased) variance over the masked entries, and with `shift_mean` shifted
    to mean 0; without it the mean is kept (what TRL does for rewards, whose sign means something).
    Statistics pool all masked tokens of the batch, not each row. eps keeps a constant x finite.
    Entries outside the mask come back as 0, so no pad or prompt value leaks into a later sum."""
    m = mask.bool()
    mean = masked_mean(x, m)
    white = (x - mean) * torch.rsqrt(masked_var(x, m) + eps)
    if not shift_mean:
        white = white + mean
    return torch.where(m, white, 0)


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Reward-to-go G_t = r_t + gamma * G_next per token, where next is the row's next response token
    (G past the last one is 0: the episode ends with the response). rewards, mask: (B, T) -> (B, T),
    0 outside the mask. A reverse loop over T; the carry skips the unmasked columns, so left and
    right padding both work."""
    m = mask.bool()
    r = rewards.detach()
    out = torch.zeros_like(r)
    carry = torch.zeros_like(r[:, 0])  # (B,) G of the next response token
    for t in reversed(range(r.size(1))):
        g = r[:, t] + gamma * carry
        out[:, t] = torch.where(m[:, t], g, 0)
        carry = torch.where(m[:, t], g, carry)
    return out


class GAEOutput(NamedTuple):
    """(B, T), 0 outside the mask: the advantages, and the value targets advantages + values."""

    advantages: torch.Tensor
    returns: torch.Tensor


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float) -> GAEOutput:
    """Generalized advantage estimation (Schulman et al. 2016). rewards, values, mask: (B, T).

    Per response token t, with next the row's next response token:
        delta_t = r_t + gamma * V_next - V_t,   A_t = delta_t + gamma * lam * A_next,
    where V and A past the last response token are 0 (the episode ends; no bootstrap). lam = 1
    gives A_t = discounted reward-to-go - V_t (unbiased, high variance), lam = 0 the one-step TD
    error. returns = A + V are the value head's targets (TD(lam) returns). Inputs are detached:
    both outputs are constants of the losses that use them."""
    m = mask.bool()
    r, v = rewards.detach(), values.detach()
    adv = torch.zeros_like(r)
    next_v = torch.zeros_like(r[:, 0])  # (B,) V of the next response token, 0 past the last
    next_a = torch.zeros_like(r[:, 0])  # (B,) A of the next response token
    for t in reversed(range(r.size(1))):
        a = r[:, t] + gamma * next_v - v[:, t] + gamma * lam * next_a
        adv[:, t] = torch.where(m[:, t], a, 0)
        # An unmasked column (prompt or padding) passes the carry on untouched
        next_v = torch.where(m[:, t], v[:, t], next_v)
        next_a = torch.where(m[:, t], a, next_a)
    return GAEOutput(adv, torch.where(m, adv + v, 0))


def kl_penalty(logp: torch.Tensor, ref_logp: torch.Tensor, kind: Literal["k1", "k2", "k3"]) -> torch.Tensor:
    """Per-token estimate of KL(π || ref) from tokens sampled from π; logp, ref_logp: log π and
    log ref of those tokens, any shape -> same shape. With d = logp - ref_logp (Schulman 2020):
    - "k1" = d: unbiased, but negative on some tokens and high variance.
    - "k2" = d²/2: biased (low when π is close to ref), low variance, always >= 0.
    - "k3" = exp(-d) - (-d) - 1: unbiased and always >= 0 (log x <= x - 1); GRPO's loss term.
    Unclamped: exp(-d) overflows in fp16/bf16 once the policies are far apart, so pass fp32."""
    d = logp - ref_logp
    if kind == "k1":
        return d
    if kind == "k2":
        return 0.5 * d.pow(2)
    if kind == "k3":
        return torch.exp(-d) + d - 1
    raise ValueError(f"kl kind must be 'k1', 'k2' or 'k3', got {kind!r}")


def aggregate(token_values: torch.Tensor, mask: torch.Tensor, mode: Aggregation,
              max_len: int | None = None) -> torch.Tensor:
    """One scalar loss from per-token values (B, T) over the masked tokens:
    - "token": sum / number of masked tokens, each token weighs the same (DAPO, Yu et al. 2025).
    - "sequence": each row's mean, then the mean over rows (the original GRPO, Shao et al. 2024):
      a token of a short response weighs more than one of a long response.
    - "constant": sum / (B * max_len), a fixed denominator (Dr. GRPO, Liu et al. 2025), so neither
      the length nor the batch's token count rescales a token's gradient. max_len: the longest
      response the rollout may generate.
    A loss, not a statistic: an empty row adds 0 (its count is clamped to 1, as TRL does), and a
    batch without any masked token gives 0, so a loop never steps on nan."""
    m = mask.bool()
    vals = torch.where(m, token_values, 0)
    if mode == "token":
        return vals.sum() / m.sum().clamp(min=1).to(vals.dtype)
    if mode == "sequence":
        return (vals.sum(-1) / m.sum(-1).clamp(min=1).to(vals.dtype)).mean()
    if mode == "constant":
        if max_len is None or max_len <= 0:
            raise ValueError(f"aggregation 'constant' needs max_len > 0 (the longest response), got {max_len}")
        return vals.sum() / (vals.size(0) * max_len)
    raise ValueError(f"aggregation must be 'token', 'sequence' or 'constant', got {mode!r}")


class SurrogateOutput(NamedTuple):
    """PPO's policy loss (scalar, differentiable), and detached statistics to log: ratio (B, T)
    π/π_old per token (1 outside the mask); clip_frac, the fraction of response tokens where the
    clipped term was chosen (those tokens send no gradient); approx_kl, the mean of
    (log π - log π_old)²/2 over response tokens (k2 against the rollout policy)."""

    loss: torch.Tensor
    ratio: torch.Tensor
    clip_frac: torch.Tensor
    approx_kl: torch.Tensor


def clipped_surrogate(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                      clip_eps: float, agg: Aggregation = "token", max_len: int | None = None) -> SurrogateOutput:
    """PPO's clipped surrogate (Schulman et al. 2017). logp: log π of the sampled tokens (B, T)
    under the policy being trained; old_logp: the same under the rollout policy; advantages: (B, T)
    (GRPO: each row's group advantage broadcast over its tokens); mask: (B, T).

    Per token, with ratio = exp(logp - old_logp):
        loss_t = -min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A),
    the pessimistic of the two, so a token whose ratio has already moved past 1 ± eps in the
    direction A favours gains nothing more (and gets no gradient), while a move the other way is
    still corrected. Aggregated by `aggregate(.., agg, max_len)`. clip_frac counts a token only
    where the min strictly picked the clipped term; |ratio - 1| > eps would also count the tokens
    whose ratio is out of range on the side the loss still pulls back."""
    if clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0, got {clip_eps}")
    m = mask.bool()
    # The log-ratio is 0 outside the mask before exp: a pad's garbage cannot overflow into a nan gradient
    log_ratio = torch.where(m, logp - old_logp.detach(), 0)  # (B, T)
    ratio = torch.exp(log_ratio)
    adv = torch.where(m, advantages.detach(), 0)
    unclipped = ratio * adv
    clipped = ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv
    loss = aggregate(-torch.minimum(unclipped, clipped), m, agg, max_len)
    with torch.no_grad():
        clip_frac = masked_mean((clipped < unclipped).to(logp.dtype), m)
        approx_kl = masked_mean(0.5 * log_ratio.pow(2), m)
    return SurrogateOutput(loss, ratio.detach(), clip_frac, approx_kl)


class ValueLossOutput(NamedTuple):
    """PPO's value loss (scalar, differentiable), and the fraction of response tokens where the
    clipped term was the larger one (detached; those tokens send no gradient)."""

    loss: torch.Tensor
    clip_frac: torch.Tensor


def clipped_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       clip_range: float, agg: Aggregation = "token", max_len: int | None = None) -> ValueLossOutput:
    """PPO's clipped value loss, per token
        0.5 * max((V - R)², (V_old + clamp(V - V_old, -c, c) - R)²),
    aggregated by `aggregate(.., agg, max_len)`. values (B, T): the value head now; old_values: at
    rollout time; returns: the targets (`gae(...).returns`). The max keeps the value head from
    moving more than c from V_old in one rollout's updates (the pessimistic bound, as for the
    policy; OpenAI baselines, TRL, OpenRLHF)."""
    if clip_range <= 0:
        raise ValueError(f"value clip_range must be > 0, got {clip_range}")
    m = mask.bool()
    old, target = old_values.detach(), returns.detach()
    step = torch.where(m, values - old, 0)  # (B, T) 0 outside the mask, as for the policy's log-ratio
    miss = torch.where(m, old - target, 0)  # (B, T) V_old - R
    unclipped = (step + miss).pow(2)  # (V - R)²
    clipped = (step.clamp(-clip_range, clip_range) + miss).pow(2)
    loss = aggregate(0.5 * torch.maximum(unclipped, clipped), m, agg, max_len)
    with torch.no_grad():
        clip_frac = masked_mean((clipped > unclipped).to(values.dtype), m)
    return ValueLossOutput(loss, clip_frac)


class GroupAdvantages(NamedTuple):
    """advantages (N,): one per sampled response; zero_spread (n_groups,) bool: groups whose
    rewards were all equal, so their advantages are 0 and they teach nothing (DAPO filters them)."""

    advantages: torch.Tensor
    zero_spread: torch.Tensor


def group_advantages(rewards: torch.Tensor, group_size: int, scale_by_std: bool = True,
                     eps: float = 1e-4) -> GroupAdvantages:
    """GRPO's outcome advantages (Shao et al. 2024): rewards (N,), N = n_groups * group_size, the
    group_size responses to one prompt on consecutive rows. Each response's advantage is its reward
    minus its group's mean, divided by the group's std + eps with `scale_by_std`. The std is the
    unbiased one (torch.std, as DeepSeekMath and TRL). Without scaling it is Dr. GRPO's
    (Liu et al. 2025), which finds that the division up-weights prompts that are nearly always or
    nearly never solved. The caller broadcasts a row's advantage over its response tokens.
    A group whose rewards are all equal gets exactly 0 (its mean need not be exact in floating point)."""
    if rewards.dim() != 1:
        raise ValueError(f"group rewards must be 1-D (N,), got shape {tuple(rewards.shape)}")
    if group_size < 2:
        raise ValueError(f"a GRPO group needs at least 2 responses (its own baseline), got group_size={group_size}")
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    r = rewards.detach().view(-1, group_size)  # (n_groups, group_size)
    adv = r - r.mean(-1, keepdim=True)
    if scale_by_std:
        adv = adv / (r.std(-1, keepdim=True) + eps)
    zero_spread = r.amax(-1) == r.amin(-1)  # (n_groups,)
    adv = torch.where(zero_spread[:, None], 0, adv)
    return GroupAdvantages(adv.flatten(), zero_spread)


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """1 - Var[R - V] / Var[R] over the response tokens (a detached scalar): 1 = the value head
    predicts the returns, 0 = no better than their mean, < 0 = worse. nan when Var[R] is 0 (the
    ratio is undefined; a logged nan says so, where 0 or 1 would mislead). values, returns, mask: (B, T)."""
    with torch.no_grad():
        var_r = masked_var(returns, mask, unbiased=False)
        var_d = masked_var(returns - values, mask, unbiased=False)
        return torch.where(var_r > 0, 1 - var_d / var_r, torch.full_like(var_r, float("nan")))


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) over the last dim: (..., V) -> (...).
    H = logsumexp(l) - sum p·l, which never takes the log of a probability: one that underflowed
    to 0 would give 0 * log 0 = nan in -sum p log p. Logits must be finite (a -inf logit gives nan)."""
    p = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (p * logits).sum(-1)


class AdaptiveKLController:
    """The KL coefficient β of the reward penalty, steered towards a target KL (Ziegler et al. 2019):
        error = clip(KL / target - 1, -0.2, 0.2),   β <- β * (1 + error * n_steps / horizon),
    a proportional controller: β grows while the policy drifts beyond the target and shrinks below
    it, by at most 20% per `horizon` samples. n_steps: the samples (rollouts) since the last update.
    The state is `value`; target and horizon come from the run's config."""

    def __init__(self, init_coef: float, target: float, horizon: float):
        if init_coef < 0:
            raise ValueError(f"kl init_coef must be >= 0, got {init_coef}")
        if target <= 0:
            raise ValueError(f"kl target must be > 0, got {target}")
        if horizon <= 0:
            raise ValueError(f"kl horizon must be > 0, got {horizon}")
        self.value = float(init_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(float(current_kl) / self.target - 1, -0.2), 0.2)
        self.value *= 1 + error * n_steps / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class FixedKLController:
    """A constant KL coefficient with AdaptiveKLController's interface (update does nothing)."""

    def __init__(self, coef: float):
        if coef < 0:
            raise ValueError(f"kl coef must be >= 0, got {coef}")
        self.value = float(coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])
