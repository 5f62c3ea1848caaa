"""`scratchlm rm train` / `rm score`: a reward model grown from the SFT policy, trained on preference
pairs with the Bradley-Terry loss, then checked on held-out pairs.

Flow (`train_reward_model`): load the SFT policy (`pref.base`; a LoRA fine-tune arrives merged, a
reward model or classifier is refused); build the pairs (`build_pairs`: files, or pairs made from the
embedded tasks on prompts the policy never trained on) and hold out `pref.val_fraction` of the
prompts; tokenize them with the chat template (prompts cut from the left, responses whole); put one
score head on the last token (`RewardModel`, InstructGPT's recipe), plus the response's mean token
log-probability under the policy's own LM head when `rm.likelihood` (scratchlm/model/reward.py says
why), with LoRA on the trunk when `sft.lora_r > 0` (the head and the term's scale always train; an
untied LM head stays frozen like the body); train `RewardObjective` with the shared loop (checkpoints
hold the RewardModel: `load_reward_model` reads them); then score every held-out pair and report
accuracy per kind and family beside two surface-cue baselines, the rewards, their correlation with
length and a few examples (`rm_checks.py`: RUN/rm_checks.png, RUN/eval/rm_summary.json and .md).

Choices:
- a batch is B pairs as 2B rows, chosen and rejected interleaved (row 2i chosen, 2i+1 rejected),
  padded with -1 to the batch's longest; `train.batch_size` counts pairs. y is (B,): each pair's
  margin (a file's "margin" field, 0 without one), subtracted inside the sigmoid when
  `rm.use_margin` (Llama 2); `rm.center_coef` keeps the rewards near zero (Eisenstein et al. 2023).
- the loss is a mean over pairs, and `count(y)` = B, so accumulated micro-batches weigh by pairs.
- logged per step and on validation: pairwise accuracy, the mean margin r_c - r_r, the mean chosen
  and rejected rewards. Validation reads the held-out pairs once per evaluation.
- embedded pairs never ask a prompt the policy trained on (`trained_prompts`, read from the base
  run's config), so held-out accuracy is not memory.

Left out: K-wise rankings (InstructGPT's all pairs of K responses in one batch), ensembles,
normalising rewards after training (the centering term stands in), packing pairs into rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from scratchlm import checkpoint as ckpt_io
from scratchlm.align import rm_checks
from scratchlm.align.data import (
    PreferencePair,
    ResponseTooLong,
    TokenizedPair,
    assert_prompts_disjoint,
    corrupted_pairs,
    read_pairs,
    split_pairs_by_prompt,
    tokenize_pair,
    tokenize_pairs,
)
from scratchlm.align.pairs import on_policy_pairs
from scratchlm.config import Config, load_config
from scratchlm.data.order import EpochOrder
from scratchlm.errors import UserError
from scratchlm.io import write_json, write_text
from scratchlm.losses import bradley_terry_loss
from scratchlm.model.lora import adapt_model
from scratchlm.model.reward import RewardModel, pad_rows
from scratchlm.tasks.families import Task, generate_tasks
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.chat import CHAT_SPECIALS
from scratchlm.train.device import pick_device
from scratchlm.train.loop import Batches, RunResult, train_model
from scratchlm.train.objective import Objective

# -- the objective and its batches ----------------------------------------------------------------


class RewardObjective(Objective):
    """forward(x (2B, T) chosen/rejected rows interleaved, -1 padded; y (B,) margins) -> (rewards (2B,),
    Bradley-Terry loss); records accuracy, margin, reward_chosen, reward_rejected per pair."""

    def __init__(self, network: RewardModel, *, center_coef: float = 0.0, use_margin: bool = True) -> None:
        super().__init__(network)
        self.center_coef, self.use_margin = center_coef, use_margin

    def count(self, y: torch.Tensor) -> int:
        return int(y.numel())

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, doc_mask=None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if doc_mask is not None:
            raise ValueError("reward-model batches are padded pairs, not packed documents")
        rewards, _ = self.network(x)  # (2B,) fp32
        if y is None:
            return rewards, None
        r_c, r_r = rewards[0::2], rewards[1::2]  # (B,) each
        margin = y.to(rewards.dtype) if self.use_margin else None
        # The loop's convention: a model's loss includes its auxiliary loss (a MoE trunk's router losses).
        loss = bradley_terry_loss(r_c, r_r, margin, self.center_coef) + self.network.aux_loss()
        gap = (r_c - r_r).detach()
        self.record(len(gap), accuracy=((gap > 0).float() + 0.5 * (gap == 0).float()).mean(), margin=gap.mean(),
                    reward_chosen=r_c.detach().mean(), reward_rejected=r_r.detach().mean())
        return rewards, loss


class PairLoader:
    """next_batch() -> (x (2B, T), y (B,)): B tokenized pairs as interleaved chosen/rejected rows,
    right-padded with -1 to the batch's longest row, and their margins (0 where a pair has none).
    Shuffled per epoch by (seed, epoch), or in order; `fill=False` ends each epoch with a short batch
    instead of wrapping into the next (validation then reads each pair once). Resumable."""

    def __init__(self, pairs: list[TokenizedPair], batch_size: int, *, shuffle: bool = True, fill: bool = True,
                 seed: int = 0, device: str | torch.device = "cpu") -> None:
        if not pairs:
            raise ValueError("no pairs to batch")
        self.pairs, self.batch_size, self.device = pairs, batch_size, device
        self.order = EpochOrder(len(pairs), shuffle=shuffle, fill=fill, seed=seed)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = [self.pairs[i] for i in self.order.take(self.batch_size)]
        x = pad_rows([row for p in chosen for row in (p.chosen_ids, p.rejected_ids)])  # (2B, T)
        y = torch.tensor([float(p.meta.get("margin", 0.0)) for p in chosen])  # (B,)
        return x.to(self.device), y.to(self.device)

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict("pairs")

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state, "pairs", "preference pairs", "use the same data and pref settings")


# -- the pairs ------------------------------------------------------------------------------------


def trained_prompts(run: str | Path) -> set[str]:
    """The embedded task prompts a policy run was trained on, as its saved config says: an SFT run on
    the embedded tasks saw generate_tasks(sft.n_tasks, seed) (its held-out share counted too, to be
    safe); a preference run (pref.base set: DPO) saw its base's prompts and its own embedded ones.
    A pretraining run, or one trained on files, saw none."""
    cfg = load_config(ckpt_io.find_checkpoint(run) / "config.json")
    if cfg.pref.base:
        seen = trained_prompts(cfg.pref.base)
        return seen | ({t.instruction for t in embedded_tasks(cfg, seen)} if not cfg.pref.data else set())
    if cfg.sft.base and not cfg.sft.data:
        return {t.instruction for t in generate_tasks(cfg.sft.n_tasks, cfg.seed)}
    return set()


def embedded_tasks(cfg: Config, seen: set[str]) -> list[Task]:
    """`pref.n_prompts` embedded tasks at `cfg.seed`, none asking a prompt in `seen`. Drawn as the
    tasks after the first len(seen) of generate_tasks(len(seen) + n, seed) with `seen` filtered out:
    at the SFT run's own seed the first len(seen) are exactly its prompts, so the rest are new."""
    n = cfg.pref.n_prompts
    return [t for t in generate_tasks(len(seen) + n, cfg.seed) if t.instruction not in seen][:n]


def build_pairs(cfg: Config, model: torch.nn.Module, tok: Tokenizer, *, seen: set[str] | None = None
                ) -> tuple[list[PreferencePair], list[PreferencePair], dict[str, int]]:
    """(train pairs, held-out pairs, counts) for a preference stage (the reward model, DPO).

    From `pref.data` files (`read_pairs`, identical pairs per `pref.identical`), or embedded: on
    `pref.n_prompts` task prompts the policy never trained on (`seen`, by default
    `trained_prompts(pref.base)`), `pref.kind` = corrupted (the right answer vs a wrong one of the
    same form), on_policy (a right and a wrong sample of `model`, `pref.samples` per prompt at
    `pref.temperature`) or both (both kinds on the same prompts). Then `pref.val_fraction` of the
    distinct prompts are held out with all their pairs (asserted disjoint). Counts: pairs, train,
    held_out, identical (dropped), and for on-policy pairs all_right / all_wrong prompts and samples."""
    p = cfg.pref
    counts: dict[str, int] = {}
    if p.data:
        pairs, read_counts = read_pairs(p.data, p.format, identical=p.identical)
        counts["identical"] = read_counts["identical"]
    else:
        if seen is None:
            seen = trained_prompts(p.base) if p.base else set()
        tasks = embedded_tasks(cfg, seen)
        pairs = []
        if p.kind in ("corrupted", "both"):
            asked = {t.instruction for t in tasks}  # corrupted_pairs draws the same tasks, then corrupts each
            pairs += [q for q in corrupted_pairs(len(seen) + p.n_prompts, cfg.seed) if q.prompt[-1][1] in asked]
        if p.kind in ("on_policy", "both"):
            drawn, op = on_policy_pairs(model, tok, tasks, samples=p.samples, temperature=p.temperature,
                                        max_new_tokens=cfg.sft.eval_max_new_tokens, seed=cfg.seed)
            pairs += drawn
            counts.update({f"on_policy_{k}": v for k, v in op.items()})
            if not drawn and p.kind == "on_policy":
                raise UserError(f"no on-policy pairs: of {len(tasks)} prompts the model got {op['all_right']} right "
                                f"in every sample and {op['all_wrong']} wrong in every one",
                                fix="raise --pref.samples or --pref.temperature, or use --pref.kind=both")
        leaked = [q.source for q in pairs if q.prompt[-1][1] in seen]
        assert not leaked, f"{len(leaked)} embedded pairs ask a prompt the policy trained on (first: {leaked[0]})"
    train, held_out = split_pairs_by_prompt(pairs, p.val_fraction, cfg.seed)
    assert_prompts_disjoint(train, held_out)
    counts.update(pairs=len(pairs), train=len(train), held_out=len(held_out))
    return train, held_out, counts


def encode_kept(pairs: list[PreferencePair], tok: Tokenizer, block_size: int, overlong: str = "drop"
                ) -> tuple[list[PreferencePair], list[TokenizedPair]]:
    """As `tokenize_pairs`, keeping each tokenized pair's source pair beside it (the checks show its text)."""
    kept, encoded = [], []
    for pair in pairs:
        try:
            c_ids, c_labels, r_ids, r_labels, _ = tokenize_pair(pair, tok, block_size)
        except ResponseTooLong:
            if overlong == "error":
                raise
            continue
        kept.append(pair)
        encoded.append(TokenizedPair(c_ids, c_labels, r_ids, r_labels, {"source": pair.source, **pair.meta}))
    return kept, encoded


# -- scoring --------------------------------------------------------------------------------------


@torch.no_grad()
def reward_of_rows(rm: RewardModel, rows: list[list[int]], batch: int = 64) -> list[float]:
    """The reward of each token row (prompt + response in the chat template), in eval mode."""
    was_training = rm.training
    rm.eval()
    device = next(rm.parameters()).device
    out: list[float] = []
    for i in range(0, len(rows), batch):
        out += rm(pad_rows(rows[i : i + batch]).to(device))[0].tolist()
    rm.train(was_training)
    return out


def score(rm: RewardModel, tok: Tokenizer, prompt: str, response: str) -> float:
    """The reward of one response to one user prompt (`scratchlm rm score`); a prompt too long for the
    context loses tokens from the left, as in training."""
    if not prompt.strip() or not response.strip():
        raise UserError("nothing to score: the prompt and the response must both be non-empty",
                        fix='pass --prompt "..." --response "..."')
    missing = [s for s in CHAT_SPECIALS if s not in tok.special_tokens]
    if missing:
        raise UserError(f"the reward model's tokenizer lacks the chat tokens {', '.join(missing)}",
                        fix="pass a reward model trained by `scratchlm rm train`")
    pair = PreferencePair([("user", prompt)], response, response, "score")
    ids = tokenize_pair(pair, tok, rm.config.block_size)[0]
    return reward_of_rows(rm, [ids])[0]


def score_pairs(rm: RewardModel, pairs: list[PreferencePair], encoded: list[TokenizedPair]
                ) -> list[rm_checks.ScoredPair]:
    """Each pair's rewards (chosen, rejected) and response lengths in tokens, beside its text."""
    rewards = reward_of_rows(rm, [row for e in encoded for row in (e.chosen_ids, e.rejected_ids)])
    return [rm_checks.ScoredPair(p.source, p.meta.get("kind", "file"), p.meta.get("family", "all"), p.prompt[-1][1],
                                 p.chosen, p.rejected, rewards[2 * i], rewards[2 * i + 1],
                                 sum(t != -1 for t in e.chosen_labels) - 1, sum(t != -1 for t in e.rejected_labels) - 1)
            for i, (p, e) in enumerate(zip(pairs, encoded))]


# -- the stage ------------------------------------------------------------------------------------


@dataclass
class RMResult:
    run: RunResult
    summary: dict[str, Any]  # what RUN/eval/rm_summary.json holds
    table: str
    scored: list[rm_checks.ScoredPair]  # the held-out pairs as scored after training


def train_reward_model(cfg: Config, *, progress: bool = True, resume: bool = False) -> RMResult:
    """Train a reward model from `pref.base` on `build_pairs`' pairs, then check it on the held-out
    ones; everything lands in cfg.out_dir (see the module docstring)."""
    run_dir = Path(cfg.out_dir)
    device = pick_device(cfg.train.device)  # where train_model will put the model; on-policy samples are drawn there
    policy, tok, base_cfg = ckpt_io.load_chat_policy(cfg.pref.base, device, "pref.base")
    cfg.model = replace(base_cfg.model)
    torch.manual_seed(cfg.seed)

    train_pairs, held_pairs, counts = build_pairs(cfg, policy, tok)
    if "on_policy_pairs" in counts:
        print(f"on-policy pairs: {counts['on_policy_pairs']} of {counts['on_policy_samples']} samples "
              f"({counts['on_policy_all_right']} prompts always right, {counts['on_policy_all_wrong']} always wrong)")
    if counts.get("identical"):
        print(f"dropped {counts['identical']} pairs whose chosen and rejected are the same text (--pref.identical)")
    block = cfg.model.block_size
    train_tp, tcounts = tokenize_pairs(train_pairs, tok, block, cfg.pref.overlong)
    held_pairs, held_tp = encode_kept(held_pairs, tok, block, cfg.pref.overlong)
    if not held_tp:
        raise UserError(f"no held-out pair fits the context ({block} tokens)", fix="raise --pref.val_fraction")
    dropped = tcounts["dropped"] + counts["held_out"] - len(held_tp)
    if tcounts["truncated"] or dropped:
        print(f"pairs longer than the context ({block} tokens): {tcounts['truncated']} training prompts cut from "
              f"the left, {dropped} pairs dropped (a response too long; --pref.overlong)")
    print(f"{len(train_tp)} training pairs, {len(held_tp)} held out")

    rm = RewardModel(policy, tok.special_tokens["<|assistant|>"] if cfg.rm.likelihood else None)
    wrapped = adapt_model(rm.body, cfg, tok)
    if wrapped and rm.response_start is not None and not rm.tied:
        rm.lm_head.requires_grad_(False)  # outside the body, so adapt_model left it trainable
    if wrapped:
        print(f"LoRA r={cfg.sft.lora_r} on {len(wrapped)} layers (+ the reward head)")
    t = cfg.train
    t.eval_iters = max(1, min(t.eval_iters, math.ceil(len(held_tp) / t.batch_size)))  # each held-out pair once
    batches = Batches(train=PairLoader(train_tp, t.batch_size, seed=cfg.seed, device=device),
                      make_val=lambda: PairLoader(held_tp, t.batch_size, shuffle=False, fill=False, device=device))
    objective = RewardObjective(rm, center_coef=cfg.rm.center_coef, use_margin=cfg.rm.use_margin)
    latest = ckpt_io.find_checkpoint(run_dir) if resume else None
    result = train_model(cfg, objective.train(), tok, batches, resume_from=latest, progress=progress, desc="rm")

    scored = score_pairs(rm, held_pairs, held_tp)
    summary = rm_checks.summarize(scored, [(p.chosen, p.rejected) for p in train_pairs])
    summary.update(step=result.steps, base=str(cfg.pref.base), data=list(cfg.pref.data) or f"embedded:{cfg.pref.kind}",
                   counts={**counts, "truncated": tcounts["truncated"], "dropped": dropped})
    table = rm_checks.format_checks(summary)
    eval_dir = run_dir / "eval"
    write_json(eval_dir / "rm_summary.json", summary)
    write_text(eval_dir / "rm_summary.md", table + "\n")
    rm_checks.plot_checks(scored, summary, run_dir / "rm_checks.png")
    print(table)
    print(f"-> {run_dir / 'rm_checks.png'}, {eval_dir / 'rm_summary.md'}")
    return RMResult(result, summary, table, scored)
