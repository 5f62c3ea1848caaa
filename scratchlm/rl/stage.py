"""`scratchlm rl`: PPO or GRPO on the SFT policy, with held-out checker accuracy before and after.

Flow (`rl`): load the SFT policy (`rl.base`) and, for rewards from a reward model, that model (same
tokenizer, checked); draw the embedded task prompts: `rl.n_prompts` to train on and
`rl.eval_prompts` held out, none of them a prompt the SFT run trained on, and disjoint from each
other (asserted); score the held-out prompts greedily with each family's checker (and pass@k with
`rl.eval_samples`); train `RLObjective` on `RolloutLoader`'s rollouts with the shared loop; score
again, and measure the KL of the trained policy to the SFT policy on the held-out prompts. Writes
RUN/eval/summary.md and .json, the answers as JSONL, and RUN/rl.png (the curves).

Settings the stage fixes: dropout is off (a ratio of two dropout masks is not a probability ratio),
the precision is resolved once ("auto" is measured here) so the rollout's forwards and the update's
match, and train.grad_accum is derived: a minibatch is rl.prompts x rl.group / rl.minibatches rows.
The loop's tokens/s counts the positions of the padded rollout rows it trains on; the rollout's own
time is inside each step that starts one. torch.compile is off: the rollout's forwards run eager, and
the ratio of a compiled to an eager forward is not exactly 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm import checkpoint as ckpt_io
from scratchlm.align.reward import trained_prompts
from scratchlm.checkpoint.adapters import adapt_beside_reference
from scratchlm.config import Config, load_config
from scratchlm.errors import UserError
from scratchlm.io import write_json, write_text
from scratchlm.model.lora import adapters_disabled
from scratchlm.rl.loader import RolloutLoader
from scratchlm.rl.objective import RLObjective
from scratchlm.rl.rewards import RewardSource, load_reward_model_for
from scratchlm.rl.rollout import build_rollout, gather_logprobs, prompt_ids, sample_answers
from scratchlm.tasks import answers as gold
from scratchlm.tasks.families import FAMILIES, Task, check, generate_tasks
from scratchlm.tasks.metrics import format_summary
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.device import autocast_ctx, linear_shapes, pick_device, pick_precision
from scratchlm.train.instruments import plot_panels
from scratchlm.train.loop import Batches, RunResult, train_model

# -- prompts --------------------------------------------------------------------------------------


def sft_prompts(run: str | Path) -> set[str]:
    """The embedded task prompts a policy run trained on, followed back through the runs it started
    from: an RL run's own training prompts, plus what `trained_prompts` finds for SFT and preference runs."""
    cfg = load_config(ckpt_io.find_checkpoint(run) / "config.json")
    if not cfg.rl.base:
        return trained_prompts(run)
    seen = sft_prompts(cfg.rl.base)
    train, _ = split_prompts(cfg, seen)
    return seen | {t.instruction for t in train}


def families_of(cfg: Config) -> tuple[str, ...]:
    names = tuple(FAMILIES) if cfg.rl.families == "all" else tuple(f.strip() for f in cfg.rl.families.split(","))
    unknown = [f for f in names if f not in FAMILIES]
    if unknown or not names:
        raise UserError(f"rl.families={cfg.rl.families!r}: unknown family {unknown[0] if unknown else '(none)'}",
                        fix=f"use all or a comma-separated list of: {', '.join(FAMILIES)}")
    return names


def split_prompts(cfg: Config, seen: set[str]) -> tuple[list[Task], list[Task]]:
    """(training tasks, held-out tasks): rl.n_prompts then rl.eval_prompts tasks of `rl.families`, none
    in `seen`; the two sets share no prompt (asserted). Drawn from all families at cfg.seed (whose first
    tasks are an SFT run's own at that seed), then filtered to `rl.families`."""
    r = cfg.rl
    want = r.n_prompts + r.eval_prompts
    fams = families_of(cfg)
    n = len(seen) + math.ceil((want + 500) * len(FAMILIES) / len(fams))
    try:
        drawn = generate_tasks(n, cfg.seed)
    except UserError:  # a family ran out of distinct prompts
        raise UserError(f"rl.n_prompts + rl.eval_prompts = {want} prompts of {', '.join(fams)} beyond the "
                        f"{len(seen)} the base trained on: the task families hold too few distinct prompts",
                        fix="lower --rl.n_prompts or --rl.eval_prompts") from None
    tasks = [t for t in drawn if t.family in fams and t.instruction not in seen][:want]
    if len(tasks) < want:
        raise UserError(f"only {len(tasks)} new task prompts for rl.n_prompts + rl.eval_prompts = {want}",
                        fix="lower --rl.n_prompts or --rl.eval_prompts")
    train, held = tasks[: r.n_prompts], tasks[r.n_prompts :]
    assert not {t.instruction for t in train} & {t.instruction for t in held}, "RL train and held-out prompts overlap"
    return train, held


# -- measuring a policy ---------------------------------------------------------------------------


def checker_scores(model: nn.Module, tok: Tokenizer, tasks: list[Task], max_new_tokens: int,
                   out_jsonl: Path | None = None) -> dict[str, dict[str, float]]:
    """Greedy answers to the tasks, per family: exact match and each family's checker."""
    return gold.gold_eval(model, tok, [[("user", t.instruction)] for t in tasks], [t.answer for t in tasks],
                          [{"family": t.family} for t in tasks], max_new_tokens, out_jsonl, batch=256)


def reward_hacking(history: list[dict[str, float]], scores: dict[str, dict]) -> str | None:
    """A line when a learned reward rose over the run (its mean over the second half of the logged
    rollouts above the first half's) while the checker's accuracy fell, on the training rollouts or on
    the held-out prompts (scores["sft"] -> scores["rl"]); None otherwise, or with under 4 rollouts logged."""
    if len(history) < 4:
        return None
    half = len(history) // 2
    mean = lambda rows, k: sum(h[k] for h in rows) / len(rows)  # noqa: E731
    first, last = history[:half], history[half:]
    if mean(last, "reward") <= mean(first, "reward"):
        return None
    if mean(last, "accuracy") < mean(first, "accuracy"):
        return "REWARD HACKING: the reward rose while the checker's accuracy fell over the run"
    before, after = scores["sft"]["all"]["checked"], scores["rl"]["all"]["checked"]
    if after < before:
        return (f"REWARD HACKING: the reward rose over the run while the checker's held-out accuracy fell "
                f"({before:.1%} -> {after:.1%})")
    return None


@torch.no_grad()
def pass_at_k(model: nn.Module, tok: Tokenizer, tasks: list[Task], k: int, max_new_tokens: int, seed: int
              ) -> dict[str, float]:
    """Per family and "all": the share of tasks with at least one right answer among k samples at temperature 1."""
    ids, _ = prompt_ids(tok, [t.instruction for t in tasks], model.config.block_size, max_new_tokens)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    rows = [p for p in ids for _ in range(k)]
    outs: list[list[int]] = []
    for s in range(0, len(rows), 512):
        outs += sample_answers(model, tok, rows[s : s + 512], max_new_tokens, gen)[0]
    hit: dict[str, list[float]] = {}
    for i, t in enumerate(tasks):
        right = any(check(t.family, t, tok.decode(a)) for a in outs[i * k : (i + 1) * k])
        hit.setdefault(t.family, []).append(float(right))
        hit.setdefault("all", []).append(float(right))
    return {f: sum(v) / len(v) for f, v in hit.items()}


@torch.no_grad()
def kl_to_reference(policy: nn.Module, reference: nn.Module | None, tok: Tokenizer, tasks: list[Task],
                    max_new_tokens: int, seed: int, batch: int = 64) -> float:
    """KL(policy || reference) per answer, in nats: the mean over answers sampled from the policy at
    temperature 1 of Σ_t log π(a_t) - log π_ref(a_t) (an unbiased estimate). `reference=None`: the
    policy with its LoRA adapters disabled. fp32, eval mode."""
    was = policy.training
    policy.eval()
    ids, _ = prompt_ids(tok, [t.instruction for t in tasks], policy.config.block_size, max_new_tokens)
    gen = torch.Generator(device=next(policy.parameters()).device).manual_seed(seed)
    end = tok.special_tokens["<|end|>"]
    total, n = 0.0, 0
    for s in range(0, len(ids), batch):
        rows = ids[s : s + batch]
        answers, ended = sample_answers(policy, tok, rows, max_new_tokens, gen)
        roll = build_rollout(rows, answers, ended, end)
        x, targets = roll.x.to(gen.device), roll.targets.to(gen.device)
        logp = gather_logprobs(policy(x)[0], targets, tok.vocab_size)
        if reference is None:
            with adapters_disabled(policy):
                ref = gather_logprobs(policy(x)[0], targets, tok.vocab_size)
        else:
            ref = gather_logprobs(reference(x)[0], targets, tok.vocab_size)
        total += float((logp - ref).sum())
        n += len(rows)
    policy.train(was)
    return total / n


# -- the picture ----------------------------------------------------------------------------------

PANELS = [(("reward", "accuracy", "rm_score"), "reward and checker accuracy (per rollout)"),
          (("kl_ref",), "KL to the reference (nats per answer)"),
          (("entropy",), "policy entropy (nats per token)"),
          (("clip_frac", "approx_kl"), "clip fraction, approx KL to the rollout policy"),
          (("value_loss", "explained_variance"), "value loss, explained variance (PPO)"),
          (("zero_spread", "accepted", "ended"), "zero-spread groups (GRPO), accepted (RFT), answers that stopped")]


def plot_rl(metrics: Path, out: Path, kl_target: float = 0.0) -> None:
    """The per-step curves of metrics.jsonl, one panel per concern; the KL target as a dashed line."""
    plot_panels(metrics, out, PANELS, {"kl_ref": kl_target} if kl_target > 0 else None)


# -- the stage ------------------------------------------------------------------------------------


@dataclass
class RLResult:
    run: RunResult
    scores: dict[str, dict[str, dict[str, float]]]  # "sft" / "rl" -> family -> metric -> value
    summary: dict[str, Any]
    table: str


def no_dropout(*modules: nn.Module | None) -> None:
    """Every dropout off: `nn.Dropout` layers and the attention layers' own rate (passed to SDPA), in
    the policy, its LoRA layers and a critic: a ratio of two dropout masks is not a probability ratio."""
    for module in modules:
        for m in module.modules() if module is not None else ():
            if isinstance(m, nn.Dropout):
                m.p = 0.0
            elif isinstance(getattr(m, "dropout", None), float):
                m.dropout = 0.0


def _resolve(cfg: Config, policy: nn.Module, device: torch.device) -> str:
    r, t = cfg.rl, cfg.train
    if cfg.model.dropout:
        print(f"dropout {cfg.model.dropout} -> 0: a ratio of two dropout masks is not a probability ratio")
        cfg.model.dropout = 0.0
    if t.compile:
        print("train.compile -> false: the rollout's forwards run eager, and the first ratio must be exactly 1")
        t.compile = False
    if r.max_new_tokens >= cfg.model.block_size:
        raise UserError(f"rl.max_new_tokens={r.max_new_tokens} leaves no room for the prompt in the context "
                        f"(model.block_size={cfg.model.block_size})", fix="lower --rl.max_new_tokens")
    rows = r.prompts * r.group
    if rows % (r.minibatches * t.batch_size):
        raise UserError(f"a rollout of rl.prompts x rl.group = {rows} answers does not split into rl.minibatches="
                        f"{r.minibatches} minibatches of train.batch_size={t.batch_size} rows",
                        fix="make rl.prompts x rl.group a multiple of rl.minibatches x train.batch_size")
    t.grad_accum = rows // (r.minibatches * t.batch_size)
    precision, why = pick_precision(t.precision, device, linear_shapes(policy, t.batch_size * 64))
    print(f"precision {precision} ({why}) for rollouts and updates alike; a minibatch = {rows // r.minibatches} "
          f"answers = {t.grad_accum} micro-batches of {t.batch_size}")
    t.precision = precision
    return precision


def rl(cfg: Config, *, progress: bool = True, resume: bool = False, stop_at_step: int | None = None) -> RLResult:
    """PPO or GRPO from `rl.base`, then the held-out evaluation (module docstring)."""
    run_dir, r = Path(cfg.out_dir), cfg.rl
    device = pick_device(cfg.train.device)
    policy, tok, base_cfg = ckpt_io.load_chat_policy(r.base, device, "rl.base")
    base = ckpt_io.find_checkpoint(r.base)
    cfg.model = replace(base_cfg.model)
    torch.manual_seed(cfg.seed)
    precision = _resolve(cfg, policy, device)

    seen = sft_prompts(base)
    train_tasks, held_tasks = split_prompts(cfg, seen)
    ids, cut = prompt_ids(tok, [t.instruction for t in train_tasks], cfg.model.block_size, r.max_new_tokens)
    if cut:
        print(f"{cut} prompts longer than the context less rl.max_new_tokens were cut from the left")
    rewards = RewardSource(r, tok, device)
    critic = None
    if r.algo == "ppo" and r.value_head == "separate":
        # the critic's values are its trunk and head at every position: the likelihood term is no part of them
        critic = load_reward_model_for(r.reward_model, tok, device)[0].drop_likelihood().requires_grad_(True).train()
    print(f"{len(train_tasks)} training prompts, {len(held_tasks)} held out (none seen by the SFT run); "
          f"reward: {r.reward}" + (f" ({r.reward_model})" if r.reward != "checker" else ""))

    eval_dir = run_dir / "eval"
    scores = {"sft": checker_scores(policy.eval(), tok, held_tasks, r.max_new_tokens, eval_dir / "answers_sft.jsonl")}
    passk = {"sft": pass_at_k(policy, tok, held_tasks, r.eval_samples, r.max_new_tokens, cfg.seed)} \
        if r.eval_samples else {}
    save_lora = adapt_beside_reference(policy, cfg, tok, "RL")
    no_dropout(policy, critic)
    objective = RLObjective(policy, r, critic, valid_vocab=tok.vocab_size)
    amp = lambda: autocast_ctx(precision, device)  # noqa: E731 - the loader opens a fresh context per forward
    loader = RolloutLoader(objective, tok, train_tasks, ids, rewards, cfg, amp, device)
    latest = ckpt_io.find_checkpoint(run_dir) if resume else None
    result = train_model(cfg, objective.train(), tok, Batches(train=loader, make_val=None), resume_from=latest,
                         progress=progress, stop_at_step=stop_at_step, desc=r.algo)
    if save_lora:
        save_lora(run_dir, base)

    policy.eval()
    scores["rl"] = checker_scores(policy, tok, held_tasks, r.max_new_tokens, eval_dir / "answers_rl.jsonl")
    if r.eval_samples:
        passk["rl"] = pass_at_k(policy, tok, held_tasks, r.eval_samples, r.max_new_tokens, cfg.seed)
    kl = kl_to_reference(policy, objective.reference, tok, held_tasks, r.max_new_tokens, cfg.seed + 1)
    table = format_summary(scores)
    lines = [table, "", f"{r.algo}, {result.steps} steps ({loader.rollouts} rollouts of {r.prompts} x {r.group}), "
             f"reward {r.reward}; KL to the SFT policy on the held-out prompts {kl:.3f} nats per answer"]
    if passk:
        lines.append(f"pass@{r.eval_samples}: " + ", ".join(
            f"{f} {passk['sft'][f]:.1%} -> {passk['rl'][f]:.1%}" for f in passk["sft"]))
    hacking = reward_hacking([h for h in result.history if "accuracy" in h], scores) if r.reward != "checker" else None
    if hacking:
        lines.append(hacking)
    summary = {"base": str(base), "algo": r.algo, "reward": r.reward, "steps": result.steps,
               "rollouts": loader.rollouts, "scores": scores, "pass_at_k": passk, "kl_to_sft": kl,
               "early_stops": loader.early_stops, "kl_coef": loader.kl_ctl.value}
    write_text(eval_dir / "summary.md", "\n".join(lines) + "\n")
    write_json(eval_dir / "summary.json", summary)
    plot_rl(run_dir / "metrics.jsonl", run_dir / "rl.png", r.kl_target if r.kl_control == "adaptive" else 0.0)
    print("\n".join(lines))
    print(f"-> {run_dir / 'rl.png'}, {eval_dir / 'summary.md'}")
    return RLResult(result, scores, summary, "\n".join(lines))

