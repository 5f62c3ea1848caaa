"""The RL loop's data: a loader that makes a rollout, scores it, computes what the update needs
once, then hands out its micro-batches for `epochs` passes of `minibatches` optimizer steps.

`rl.algo=rft` (rejection-sampling fine-tuning, the baseline at equal compute) trains the same
rollouts' accepted answers (reward >= rl.rft_threshold) with their NLL: the surrogate with advantage
1 on their tokens and none elsewhere, no KL term.

Per rollout (`_rollout`):
1. `rl.prompts` task prompts (a resumable shuffled order over the training prompts), each answered
   `rl.group` times through the engine at temperature 1 (`rollout.sample_answers`); with
   `skip_zero_spread` (GRPO's dynamic sampling) prompt groups whose rewards are all equal are
   replaced by fresh ones, up to 4 draws, so every kept group teaches something.
2. rewards (`rewards.RewardSource`), then in the update's own micro-batches, precision and module
   mode, without gradients: the policy's log-probabilities (the "old" ones), the reference's, and
   with PPO the values. Same rows, same shapes, same forward: the first update's ratio is exactly 1,
   and on the first rollout the policy/reference KL is exactly 0.
3. advantages: GRPO normalises each group's rewards (`group_advantages`) and gives every answer
   token its answer's advantage; PPO puts -kl_coef x (log π_old - log π_ref) on every answer token
   and the reward on the last, runs GAE (γ, λ) on the old values and whitens the advantages over
   the rollout; the adaptive controller (Ziegler et al. 2019) then moves kl_coef towards `kl_target`
   using this rollout's KL.
4. the plan: epoch 0 in rollout order, later epochs shuffled (seeded by the rollout and epoch),
   cut into minibatches of train.grad_accum micro-batches of train.batch_size rows. With
   `target_kl`, once a minibatch's mean approximate KL (rollout policy -> current) exceeds it, the
   rest of the rollout is skipped and the next step starts a new rollout.
Logged per rollout (beside the objective's per-step losses): reward mean and std, checker accuracy,
the reward model's mean score, KL to the reference (per answer, k1 summed over its tokens), the KL
coefficient, answer length, the share of answers that stopped, and GRPO's zero-spread groups.

Resumable: the prompt order, the rollout count and position, the KL controller (JSON), and the
sampling generator's state, the rollout's tensors and the plan (extra tensors) come back, so a
resumed run draws and trains exactly what an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch

from scratchlm.config import Config
from scratchlm.data.order import EpochOrder
from scratchlm.errors import UserError
from scratchlm.rl.losses import (
    AdaptiveKLController,
    FixedKLController,
    gae,
    group_advantages,
    masked_whiten,
)
from scratchlm.rl.objective import FIELDS, RLObjective
from scratchlm.rl.rewards import RewardSource
from scratchlm.rl.rollout import build_rollout, gather_logprobs, sample_answers
from scratchlm.tasks.families import Task
from scratchlm.tokenizer import Tokenizer

MAX_DRAWS = 4  # skip_zero_spread: prompt draws per rollout before zero-spread groups are kept anyway


class RolloutLoader:
    def __init__(self, objective: RLObjective, tok: Tokenizer, tasks: list[Task], prompt_ids: list[list[int]],
                 rewards: RewardSource, cfg: Config, amp: Callable[[], contextlib.AbstractContextManager],
                 device: torch.device) -> None:
        r, t = cfg.rl, cfg.train
        self.objective, self.tok, self.tasks, self.prompt_ids, self.rewards = objective, tok, tasks, prompt_ids, rewards
        self.r, self.seed, self.amp, self.device = r, cfg.seed, amp, device
        self.batch, self.accum = t.batch_size, t.grad_accum
        self.n_rows = r.prompts * r.group
        if self.n_rows % (r.minibatches * t.batch_size):
            raise UserError(f"a rollout of rl.prompts x rl.group = {self.n_rows} answers does not split into "
                            f"rl.minibatches={r.minibatches} minibatches of train.batch_size={t.batch_size} rows",
                            fix="make rl.prompts x rl.group a multiple of rl.minibatches x train.batch_size")
        self.order = EpochOrder(len(tasks), shuffle=True, fill=True, seed=cfg.seed)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        self.kl_ctl = (AdaptiveKLController(r.kl_coef, r.kl_target, r.kl_horizon)
                       if r.algo == "ppo" and r.kl_control == "adaptive" else FixedKLController(r.kl_coef))
        self.rollouts, self.pos, self.early_stops = 0, 0, 0
        self.buffer: dict[str, torch.Tensor] | None = None
        self.plan: torch.Tensor | None = None  # (micro-batches, batch_size) row indices

    # -- the loop's side ----------------------------------------------------------------------------------
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        step_start = (self.buffer is not None and self.plan is not None and 0 < self.pos < len(self.plan)
                      and self.pos % self.accum == 0)
        if step_start and self.r.target_kl > 0 and self.objective.take_step_kl() > self.r.target_kl:
            self.early_stops += 1  # the last minibatch moved too far from the rollout policy: a new rollout
            self.buffer = None
        if self.buffer is None or self.plan is None or self.pos == len(self.plan):
            self._rollout()
        assert self.buffer is not None and self.plan is not None
        rows = self.plan[self.pos]
        self.pos += 1
        return self.buffer["x"][rows].to(self.device), self.buffer["y"][rows].to(self.device)

    def state_dict(self) -> dict:
        return {"order": self.order.state_dict("prompts"), "rollouts": self.rollouts, "pos": self.pos,
                "early_stops": self.early_stops, "kl": self.kl_ctl.state_dict(), "stats": self.objective.rollout_stats,
                "step_kl": list(self.objective._step_kl)}

    def load_state_dict(self, state: dict) -> None:
        self.order.load_state_dict(state["order"], "prompts", "RL prompts", "use the same rl settings")
        self.rollouts, self.pos, self.early_stops = state["rollouts"], state["pos"], state["early_stops"]
        self.kl_ctl.load_state_dict(state["kl"])
        self.objective.rollout_stats, self.objective._step_kl = state["stats"], list(state["step_kl"])

    def extra_tensors(self) -> dict[str, torch.Tensor]:
        out = {"generator": self.generator.get_state()}
        if self.buffer is not None and self.plan is not None:
            out.update(x=self.buffer["x"], y=self.buffer["y"], plan=self.plan)
        return out

    def load_extra_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(tensors["generator"])
        if "plan" in tensors:
            self.buffer, self.plan = {"x": tensors["x"], "y": tensors["y"]}, tensors["plan"]
        else:
            self.buffer = self.plan = None

    # -- a rollout -----------------------------------------------------------------------------------------
    def _draw(self) -> tuple[list[int], list[list[int]], list[bool], torch.Tensor, dict]:
        """(task index per answer, answers, ended, rewards, parts) for rl.prompts groups."""
        r, policy = self.r, self.objective.network
        end = self.tok.special_tokens["<|end|>"]
        kept: list[tuple] = []  # per group: (task index, answers, ended, total, checker, rm)
        spare: list[tuple] = []
        for _ in range(MAX_DRAWS if r.skip_zero_spread else 1):
            idx = self.order.take(r.prompts)
            rows = [self.prompt_ids[i] for i in idx for _ in range(r.group)]
            answers, ended = sample_answers(policy, self.tok, rows, r.max_new_tokens, self.generator)
            tasks = [self.tasks[i] for i in idx for _ in range(r.group)]
            full = [p + a + ([end] if e else []) for p, a, e in zip(rows, answers, ended)]
            scored = self.rewards.score(tasks, full, [self.tok.decode(a) for a in answers], ended, list(map(len, rows)))
            for g, i in enumerate(idx):
                s = slice(g * r.group, (g + 1) * r.group)
                group = (i, answers[s], ended[s], scored.total[s], scored.checker[s],
                         None if scored.rm is None else scored.rm[s])
                informative = bool(group[3].max() > group[3].min())
                (kept if informative or not r.skip_zero_spread else spare).append(group)
            if len(kept) >= r.prompts:
                break
        groups = (kept + spare)[: r.prompts]
        task_of = [g[0] for g in groups for _ in range(r.group)]
        answers = [a for g in groups for a in g[1]]
        ended = [e for g in groups for e in g[2]]
        total = torch.cat([g[3] for g in groups])
        parts = {"checker": torch.cat([g[4] for g in groups]),
                 "rm": None if groups[0][5] is None else torch.cat([g[5] for g in groups])}
        return task_of, answers, ended, total, parts

    @torch.no_grad()
    def _rollout(self) -> None:
        r, obj, N = self.r, self.objective, self.n_rows
        task_of, answers, ended, total, parts = self._draw()
        roll = build_rollout([self.prompt_ids[i] for i in task_of], answers, ended,
                             self.tok.special_tokens["<|end|>"])
        x, targets = roll.x.to(self.device), roll.targets.to(self.device)
        mask = targets != -1
        lengths = mask.sum(1).float()
        old_logp, ref_logp, old_values = (torch.zeros(x.shape, device=self.device) for _ in range(3))
        for s in range(0, N, self.batch):  # the update's micro-batches, in its precision and mode
            rows = slice(s, s + self.batch)
            with self.amp():
                old_logp[rows] = gather_logprobs(obj.policy_logits(x[rows]), targets[rows], obj.valid_vocab)
                if r.algo == "ppo":
                    old_values[rows] = obj.values(x[rows])
                ref_logp[rows] = gather_logprobs(obj.reference_logits(x[rows]), targets[rows], obj.valid_vocab)
        kl_tok = torch.where(mask, old_logp - ref_logp, 0.0)
        seq_kl = kl_tok.sum(1)  # (N,) k1 per answer: an unbiased estimate of KL(π_old || ref) per answer
        total = total.to(self.device)
        stats: dict[str, float] = {"kl_coef": self.kl_ctl.value}
        if r.algo == "grpo":
            ga = group_advantages(total, r.group, r.scale_by_std)
            advantages = torch.where(mask, ga.advantages[:, None].expand_as(mask), 0.0)
            returns = torch.zeros_like(advantages)
            stats["zero_spread"] = float(ga.zero_spread.float().mean())
        elif r.algo == "rft":  # only accepted answers are trained on: their tokens' NLL (advantage 1, ratio 1)
            accepted = total >= r.rft_threshold
            targets = torch.where(accepted[:, None], targets, -1)
            mask = targets != -1
            advantages, returns = mask.float(), torch.zeros(mask.shape, device=self.device)
            stats["accepted"] = float(accepted.float().mean())
        else:
            token_rewards = -self.kl_ctl.value * kl_tok
            last = mask.float().cumsum(1).argmax(1)  # (N,) each answer's last token (the first max of the count)
            token_rewards[torch.arange(N, device=self.device), last] += total
            out = gae(token_rewards, old_values, mask, r.gamma, r.lam)
            advantages, returns = masked_whiten(out.advantages, mask), out.returns
            self.kl_ctl.update(float(seq_kl.mean()), N)
        y = torch.stack([targets.float(), old_logp, ref_logp, advantages, returns, old_values], dim=1)  # (N, 6, T)
        assert y.shape[1] == len(FIELDS)
        self.buffer = {"x": x.cpu(), "y": y.cpu()}
        self.plan = self._plan()
        self.pos = 0
        self.rollouts += 1
        stats.update(reward=float(total.mean()), reward_std=float(total.std()) if N > 1 else 0.0,
                     accuracy=float(parts["checker"].mean()), kl_ref=float(seq_kl.mean()),
                     length=float(lengths.mean()), ended=float(sum(ended) / N), rollout=float(self.rollouts),
                     early_stops=float(self.early_stops))
        if parts["rm"] is not None:
            stats["rm_score"] = float(parts["rm"].mean())
        obj.rollout_stats = stats

    def _plan(self) -> torch.Tensor:
        """(epochs x minibatches x grad_accum, batch_size) row indices: epoch 0 in rollout order (the
        micro-batches the old log-probabilities were computed in), later epochs shuffled."""
        r, N = self.r, self.n_rows
        epochs = [torch.arange(N)]
        for e in range(1, r.epochs):
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.rollouts * 101 + e)
            epochs.append(torch.randperm(N, generator=g))
        plan = torch.cat(epochs).view(-1, self.batch)
        steps = len(plan) // self.accum
        if steps * self.accum != len(plan):
            raise UserError(f"a rollout of {N} answers gives {len(plan)} micro-batches per pass set, not a multiple of "
                            f"train.grad_accum={self.accum}", fix="let rl derive train.grad_accum (leave it at 1)")
        return plan
