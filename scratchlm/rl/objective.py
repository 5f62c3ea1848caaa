"""The PPO / GRPO update as an `Objective` the shared training loop runs (accumulation, precision,
clipping, checkpoints, resume and logging are the loop's).

A micro-batch is x (B, T), the rollout rows, and y (B, 6, T) float: per position the target id
(-1 off the answer), the rollout policy's log-probability, the reference's, the advantage, the
return and the rollout value (`FIELDS`): what the loader computed once per rollout. forward runs
the policy (and with PPO its value head) and returns the loss of `scratchlm.rl.losses`:

- GRPO: clipped surrogate on the group-normalised advantages + kl_coef x the k1/k2/k3 estimate of
  KL(policy || reference) on the sampled tokens, both aggregated per token, per answer or over a
  constant length (`rl.loss_agg`).
- RFT: the same surrogate with advantage 1 on the accepted answers' tokens (and no others): the
  gradient of their mean NLL (rejection-sampling fine-tuning, the baseline).
- PPO: clipped surrogate on GAE advantages (the KL penalty is in the rewards) + value_coef x the
  clipped value loss. The value head reads the policy's own final hidden states (`shared`: one
  linear layer, captured from the forward that gives the logits) or is a separate critic grown
  from the reward model (`separate`: its trunk and head applied at every position; the reward
  model's likelihood term is dropped from it).

`count(y)` is what the aggregation averages over (answer tokens, or answers), so the loop's
weighting of micro-batches gives the mean over the whole minibatch. The reference model is a frozen
copy of the starting policy, or with LoRA the policy with its adapters disabled (`reference_logits`);
it and the value head or critic are never in the saved network (the checkpoint stays a policy that
sample, chat and eval load); the value head or critic travel as extra tensors for resuming.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from scratchlm.config import RLConfig
from scratchlm.model.base import LanguageModel
from scratchlm.model.lora import adapters_disabled, lora_layers
from scratchlm.model.reward import RewardModel
from scratchlm.rl.losses import (
    aggregate,
    clipped_surrogate,
    clipped_value_loss,
    entropy_from_logits,
    explained_variance,
    kl_penalty,
    masked_mean,
)
from scratchlm.rl.rollout import HiddenStates, gather_logprobs, sampled_logits
from scratchlm.train.objective import Objective

FIELDS = ("targets", "old_logp", "ref_logp", "advantages", "returns", "old_values")


class RLObjective(Objective):
    def __init__(self, network: LanguageModel, cfg: RLConfig, critic: RewardModel | None = None,
                 valid_vocab: int | None = None) -> None:
        super().__init__(network)
        self.c, self.valid_vocab = cfg, valid_vocab  # the tokenizer's vocabulary: the ids the engine samples
        self.max_len = cfg.max_new_tokens + 1  # an answer's tokens and its <|end|>: Dr. GRPO's constant
        # The frozen reference, taken before any hook is put on the network.
        self.reference = None if lora_layers(network) else copy.deepcopy(network).requires_grad_(False).eval()
        self.value_head: nn.Linear | None = None
        self.critic = critic
        self._hidden: HiddenStates | None = None
        if cfg.algo == "ppo" and critic is None:
            self._hidden = HiddenStates(network)
            self.value_head = nn.Linear(network.config.n_embd, 1)
            nn.init.zeros_(self.value_head.weight)  # values start at 0: the first advantages are the returns
            nn.init.zeros_(self.value_head.bias)
        self.rollout_stats: dict[str, float] = {}
        self._step_kl = [0.0, 0]  # approx KL x count, count: since the loader last asked (early stopping)

    def train(self, mode: bool = True) -> RLObjective:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()
        return self

    # -- the forwards the loader and the update share -----------------------------------------------------
    def policy_logits(self, x: torch.Tensor) -> torch.Tensor:
        logits, _ = self.network(x)
        return logits

    @torch.no_grad()
    def reference_logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.reference is not None:
            return self.reference(x)[0]
        with adapters_disabled(self.network):
            return self.network(x)[0]

    def values(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T) fp32 value per position: right after `policy_logits(x)` for the shared head."""
        if self.critic is not None:
            h, _ = self.critic.body(x)
            return self.critic.head(h)[..., 0].float()
        assert self._hidden is not None and self.value_head is not None
        return self.value_head(self._hidden.take())[..., 0].float()

    # -- the update ---------------------------------------------------------------------------------------
    def count(self, y: torch.Tensor) -> int:
        """Answer tokens (token aggregation) or answers. A micro-batch with no answer token (RFT, all its
        answers rejected) counts as 1 with loss 0: a step with none is no update, not a NaN loss."""
        if not bool((y[:, 0] != -1).any()):
            return 1
        return int((y[:, 0] != -1).sum()) if self.c.loss_agg == "token" else int(y.shape[0])

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, doc_mask=None):
        if doc_mask is not None:
            raise ValueError("RL batches are padded rollout rows, not packed documents")
        logits = self.policy_logits(x)
        if y is None:
            return logits, None
        c = self.c
        targets = y[:, 0].long()
        old_logp, ref_logp, adv, returns, old_values = (y[:, i].float() for i in range(1, 6))
        mask = targets != -1
        logp = gather_logprobs(logits, targets, self.valid_vocab)
        pg = clipped_surrogate(logp, old_logp, adv, mask, c.clip_eps, c.loss_agg, self.max_len)
        loss = pg.loss
        n = self.count(y)
        if not bool(mask.any()):  # nothing to train on here (RFT): no statistics to record either
            return logits, loss + self.network.aux_loss()
        with torch.no_grad():
            entropy = masked_mean(entropy_from_logits(sampled_logits(logits, self.valid_vocab)), mask)
            stats = {"pg_loss": pg.loss.detach(), "clip_frac": pg.clip_frac, "approx_kl": pg.approx_kl,
                     "ratio": masked_mean(pg.ratio, mask), "entropy": entropy}
        if c.algo == "grpo" and c.kl_coef > 0:
            kl = aggregate(kl_penalty(logp, ref_logp, c.kl_estimator), mask, c.loss_agg, self.max_len)
            loss = loss + c.kl_coef * kl
            stats["kl_loss"] = kl.detach()
        if c.algo == "ppo":
            values = self.values(x)
            vl = clipped_value_loss(values, old_values, returns, mask, c.value_clip, c.loss_agg, self.max_len)
            loss = loss + c.value_coef * vl.loss
            stats.update(value_loss=vl.loss.detach(), value_clip_frac=vl.clip_frac,
                         explained_variance=explained_variance(values.detach(), returns, mask))
        self.record(n, **stats)
        self._step_kl[0] += float(pg.approx_kl) * n
        self._step_kl[1] += n
        return logits, loss + self.network.aux_loss()

    def take_step_kl(self) -> float:
        """The approximate KL (rollout policy -> current) over the micro-batches since the last call."""
        total, n = self._step_kl
        self._step_kl = [0.0, 0]
        return total / n if n else 0.0

    def metrics(self, training: bool = True) -> dict[str, float]:
        out = super().metrics(training)
        if training:
            out.update(self.rollout_stats)
        return out

    # -- resuming: the value head or critic are not the saved network ------------------------------------
    def _trained_extra(self) -> nn.Module | None:
        return self.critic if self.critic is not None else self.value_head

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        module = self._trained_extra()
        return {} if module is None else {k: v for k, v in module.state_dict().items()}

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        module = self._trained_extra()
        if module is not None:
            module.load_state_dict(tensors)
