"""The online-RL section (`scratchlm rl`): PPO and GRPO on the SFT policy. Stage: scratchlm/rl/."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Literal

from scratchlm.config.fields import Range, check_fields
from scratchlm.errors import UserError


@dataclass
class RLConfig:
    """Online RL: rollouts of the policy through the engine, scored, then PPO or GRPO updates.

    One rollout = `prompts` prompts x `group` samples, answered at temperature 1 from the unfiltered
    policy; then `epochs` passes over it in `minibatches` optimizer steps each (train.batch_size
    sequences per micro-batch; train.grad_accum is derived). train.max_steps counts optimizer steps."""

    base: str = ""  # the SFT run or checkpoint the policy (and the frozen reference) start from
    # rft = rejection-sampling fine-tuning, the baseline RL must beat: SFT on the policy's own answers whose
    # reward reaches rft_threshold (no baseline, ratio, clipping or KL)
    algo: Literal["grpo", "ppo", "rft"] = "grpo"
    rft_threshold: float = 1.0  # rft: the reward an answer needs to be trained on (checker: 1 = right)
    # checker = each task family's own checker (1 right, 0 wrong); rm = the reward model `reward_model`;
    # both = checker + rm_weight x the reward model's score
    reward: Literal["checker", "rm", "both"] = "checker"
    reward_model: str = ""  # a run of `scratchlm rm train` (reward=rm or both)
    rm_weight: Annotated[float, Range("> 0")] = 1.0
    format_reward: Annotated[float, Range(">= 0", "0 = off")] = 0.0  # added when the answer ends with <|end|>
    reward_clip: Annotated[float, Range(">= 0", "0 = off")] = 0.0  # rewards clipped to [-c, c]
    n_prompts: Annotated[int, Range(">= 1")] = 4000  # embedded task prompts trained on (none the SFT run saw)
    families: str = "all"  # comma-separated task families to train on, or all
    prompts: Annotated[int, Range(">= 1")] = 16  # prompts per rollout
    group: Annotated[int, Range("[1, 256]")] = 8  # samples per prompt (GRPO's G, >= 2)
    max_new_tokens: Annotated[int, Range(">= 1")] = 24
    epochs: Annotated[int, Range(">= 1")] = 1  # passes over each rollout
    minibatches: Annotated[int, Range(">= 1")] = 1  # optimizer steps per pass
    clip_eps: Annotated[float, Range("> 0")] = 0.2  # the ratio's clip range [1 - eps, 1 + eps]
    # token = mean over all response tokens (DAPO); sequence = per-answer mean, then over answers (GRPO);
    # constant = sum over tokens / (answers x max_new_tokens) (Dr. GRPO)
    loss_agg: Literal["token", "sequence", "constant"] = "token"
    kl_coef: Annotated[float, Range(">= 0", "0 = no KL term")] = 0.04  # GRPO's beta; PPO's initial coefficient
    kl_estimator: Literal["k1", "k2", "k3"] = "k3"  # GRPO's KL term (PPO's per-token penalty is k1)
    # PPO: fixed = kl_coef throughout; adaptive = Ziegler et al.'s controller steering the KL to kl_target
    kl_control: Literal["fixed", "adaptive"] = "fixed"
    kl_target: Annotated[float, Range(">= 0")] = 1.0  # PPO, adaptive: KL to the reference, nats per answer (> 0)
    kl_horizon: Annotated[int, Range(">= 1")] = 10000  # PPO, adaptive: the controller's horizon, in answers
    scale_by_std: bool = True  # GRPO: divide by the group's std (false = Dr. GRPO)
    skip_zero_spread: bool = False  # GRPO: drop groups whose rewards are all equal (dynamic sampling)
    value_head: Literal["shared", "separate"] = "shared"  # PPO: on the policy's trunk, or a critic from the RM
    value_coef: Annotated[float, Range(">= 0")] = 0.5  # PPO: weight of the value loss
    value_clip: Annotated[float, Range("> 0")] = 0.2  # PPO: clip range of the value update
    gamma: Annotated[float, Range("[0, 1]")] = 1.0  # PPO: discount
    lam: Annotated[float, Range("[0, 1]")] = 0.95  # PPO: GAE's lambda
    target_kl: Annotated[float, Range(">= 0", "0 = off")] = 0.0  # stop a rollout's epochs once approx KL exceeds it
    eval_prompts: Annotated[int, Range(">= 1")] = 500  # held-out prompts scored greedily before and after
    eval_samples: Annotated[int, Range(">= 0", "0 = off")] = 0  # pass@k on the held-out prompts: k samples each

    def validate(self) -> None:
        check_fields(self, "rl.")
        if self.algo == "grpo" and self.group < 2:
            raise UserError(f"rl.group={self.group}: GRPO compares samples within a group and needs at least 2",
                            fix="use --rl.group=8")
        if self.kl_control == "adaptive" and self.kl_target <= 0:
            raise UserError(f"rl.kl_target={self.kl_target}: the adaptive KL controller needs a target above 0",
                            fix="use e.g. --rl.kl_target=1 (nats per answer), or --rl.kl_control=fixed")
        if self.skip_zero_spread and self.algo != "grpo":
            raise UserError(f"rl.skip_zero_spread is GRPO's dynamic sampling (a group whose rewards are all equal "
                            f"teaches GRPO nothing); rl.algo={self.algo} learns from such groups",
                            fix="drop --rl.skip_zero_spread, or use --rl.algo=grpo")
        if self.reward in ("rm", "both") and not self.reward_model:
            raise UserError(f"rl.reward={self.reward} needs a reward model",
                            fix="pass --reward rm:RUN/rm (or --rl.reward_model=RUN/rm)")
        if self.value_head == "separate" and self.algo == "ppo" and not self.reward_model:
            raise UserError("rl.value_head=separate starts the critic from a reward model, and none is given",
                            fix="pass --rl.reward_model=RUN/rm, or use --rl.value_head=shared")
