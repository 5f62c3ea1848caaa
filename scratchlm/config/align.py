"""The preference-alignment sections: the pairs (`pref`), the reward model (`rm`), DPO (`dpo`) and
Constitutional AI (`cai`). Stages: scratchlm/align/."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Annotated, Literal

from scratchlm.config.fields import TEXTS, Range, check_fields
from scratchlm.errors import UserError


@dataclass
class PrefConfig:
    """Preference pairs (`scratchlm rm train`, `scratchlm dpo`): read from files, or made from the embedded tasks."""

    base: str = ""  # the SFT run or checkpoint the stage starts from (a path: checked when opened)
    data: Annotated[list[str], TEXTS] = field(default_factory=list)  # JSON/JSONL pair files; empty = embedded pairs
    format: Literal["auto", "prompt", "alpaca", "conversational", "hh"] = "auto"
    identical: Literal["error", "drop"] = "error"  # pairs whose chosen and rejected are the same text
    overlong: Literal["drop", "error"] = "drop"  # a response longer than the context (prompts are cut from the left)
    val_fraction: Annotated[float, Range("(0, 1)")] = 0.1  # prompts held out (all their pairs) for evaluation
    # embedded pairs: corrupted = the right answer vs a wrong one of the same form; on_policy = a right and a
    # wrong sample of the SFT model itself (judged by the family's checker); both = the two mixed
    kind: Literal["corrupted", "on_policy", "both"] = "both"
    n_prompts: Annotated[int, Range(">= 2")] = 2000  # embedded task prompts the pairs are made from
    samples: Annotated[int, Range("[2, 64]")] = 8  # on_policy: samples drawn per prompt
    temperature: Annotated[float, Range("> 0")] = 1.0  # on_policy: sampling temperature

    def validate(self) -> None:
        check_fields(self, "pref.")


@dataclass
class RMConfig:
    """The reward model (`scratchlm rm train`): the SFT trunk with a scalar head, Bradley-Terry loss."""

    # weight of mean((r_chosen + r_rejected)^2), which keeps rewards near 0 (Eisenstein et al. 2023); 0 = off
    center_coef: Annotated[float, Range(">= 0", "0 = off")] = 0.01
    use_margin: bool = True  # subtract a pair's own "margin" field (files that carry one) inside the sigmoid
    # add the response's mean token log-probability under the policy's own LM head (kept, trained with the
    # scalar head; SimPO's implicit reward) to the last-token score: scratchlm/model/reward.py says why
    likelihood: bool = True

    def validate(self) -> None:
        check_fields(self, "rm.")


@dataclass
class DPOConfig:
    """Direct preference optimisation (`scratchlm dpo`)."""

    beta: Annotated[float, Range("> 0")] = 0.1  # strength of the implicit KL to the reference model
    loss: Literal["sigmoid", "ipo"] = "sigmoid"  # sigmoid = DPO (Rafailov et al. 2023), ipo = Azar et al. 2023
    # conservative DPO: the labels are flipped with this probability (sigmoid only)
    label_smoothing: Annotated[float, Range("[0, 0.5)")] = 0.0
    # weight of the chosen answers' mean token NLL beside the DPO loss (RPO, Pang et al. 2024; TRL's rpo_alpha)
    rpo_alpha: Annotated[float, Range(">= 0", "0 = off")] = 0.0
    eval_max_new_tokens: Annotated[int, Range(">= 1")] = 24
    # embedded task prompts the gold evaluation asks before and after, none the SFT or DPO run trained on
    eval_prompts: Annotated[int, Range(">= 1")] = 500

    def validate(self) -> None:
        check_fields(self, "dpo.")
        if self.loss == "ipo" and self.label_smoothing:
            raise UserError(f"dpo.label_smoothing={self.label_smoothing} applies to the sigmoid loss only",
                            fix="drop --dpo.label_smoothing or use --dpo.loss=sigmoid")


@dataclass
class CAIConfig:
    """Constitutional AI (`scratchlm cai`): critique, revision, then SFT on the revisions and DPO on
    (revision > original)."""

    base: str = ""  # the SFT run or checkpoint that answers, is revised and trained (a path: checked when opened)
    constitution: str = ""  # a constitution file (JSON); empty = the embedded one
    n_prompts: Annotated[int, Range(">= 2")] = 600  # red-team prompts generated (benign: n_prompts x val_fraction)
    val_fraction: Annotated[float, Range("(0, 1)")] = 0.25  # held out for the before/after violation rates
    max_new_tokens: Annotated[int, Range(">= 1")] = 32
    replay: Annotated[float, Range(">= 0", "0 = none")] = 1.0  # embedded tasks trained per red-team training prompt
    model_revisions: bool = True  # also ask the model to revise (kept only where it passes every check)
    sft_steps: Annotated[int, Range(">= 1")] = 200  # SFT on the revisions (train.max_steps of that stage)
    dpo_steps: Annotated[int, Range(">= 0", "0 = no DPO")] = 100  # DPO on (revision > original) after that SFT
    # DPO's learning rate (its min_lr a tenth of it); bench/cai.py: 1e-4 or 3e-5 cost the task accuracy
    dpo_lr: Annotated[float, Range("> 0")] = 1e-5

    def validate(self) -> None:
        check_fields(self, "cai.")
