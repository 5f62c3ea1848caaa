"""`scratchlm dpo`: direct preference optimisation of the SFT policy (Rafailov et al. 2023), then
checker-verified exact match on held-out task prompts before and after.

Flow (`dpo`): load the SFT policy (`pref.base`; a LoRA fine-tune arrives merged); build the pairs
(`reward.build_pairs`: files, or embedded pairs on prompts the policy never trained on; on-policy
pairs are the target, `pref.kind=on_policy`, the `dpo-tiny` preset's choice); train `DPOObjective`
with the shared loop (with LoRA when `sft.lora_r > 0`, the adapters saved as sft does); then
score the held-out pairs' implicit rewards, and answer `dpo.eval_prompts` embedded task prompts
that neither the SFT run nor this one trained on, greedily, with the SFT policy and the DPO policy
(each family's checker judges). RUN/eval/summary.md and .json, the answers as JSONL, RUN/dpo.png,
and the pairs trained on and held out (RUN/pairs_train.jsonl, pairs_held_out.jsonl: conversational
pairs that `--pref.data` reads back).

Choices:
- the reference is the SFT policy: a frozen copy (no gradients, eval mode, never saved), or with
  LoRA the policy itself with its adapters disabled (`adapters_disabled`: no second copy). Its
  log-probabilities are computed per batch under no_grad, in eval mode, before the policy's
  forward (a MoE keeps the policy's router losses). LoRA DPO trains the adapters only: token rows
  trained beside them would change the reference too (`sft.lora_embedding` is set to none).
- a batch is B pairs as 2B rows, chosen and rejected interleaved, right-padded to the batch's
  longest (`train.batch_size` counts pairs); x = ids[:-1], y = labels[1:], -1 off the responses.
  A response is a maximal run of counted targets in a row (`response_logprobs`): responses in
  row-major order alternate chosen, rejected. The same code reads packed rows (`packing=True`:
  several pairs' sequences in one row of 2·block_size tokens, attention kept inside each with
  `DocumentMask`, positions restarting), which give the same log-probabilities (a test).
- sigmoid DPO sums a response's log-probabilities, IPO averages them over its tokens (as in the
  losses' docstring); the loss is the mean over pairs and `count(y)` the pairs, so accumulated
  micro-batches weigh by pairs. Accuracy counts a pair right when its margin is > 0 (ties wrong).
- `dpo.rpo_alpha` > 0 adds α times the chosen answer's mean token NLL to each pair's loss (RPO,
  Pang et al. 2024, TRL's `rpo_alpha`): bench/dpo.py found plain DPO lowering the policy's exact
  match on its own near-miss pairs (the chosen's likelihood falls with the rejected's, Pal et al.
  2024), and the NLL term turning that into a gain; the bench's control (the NLL alone) says how
  much of the gain is the preference term's.
- logged per step and on validation: implicit rewards β·(log π − log π_ref) of chosen and
  rejected, their margin and accuracy, and the policy's summed (IPO: mean) log-probabilities of the
  chosen and rejected responses: DPO often lowers both while widening the gap (Rafailov et al.
  2024; Pal et al. 2024), so both are plotted.

Left out: precomputing the reference log-probabilities once (they are recomputed each batch), the
fused head (`linear_sequence_logprobs`: the models return logits, (2B, T, V) is small at our
scale), packing in the stage (pairs here are short: padding to the batch's longest wastes little;
the loader and a test keep it honest), and the other DPO-family losses (see scratchlm/losses.py).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from scratchlm import checkpoint as ckpt_io
from scratchlm.align.data import PreferencePair, TokenizedPair, prompt_key, tokenize_pairs
from scratchlm.align.reward import build_pairs, embedded_tasks, trained_prompts
from scratchlm.checkpoint.adapters import adapt_beside_reference
from scratchlm.config import Config
from scratchlm.data.order import EpochOrder
from scratchlm.errors import UserError
from scratchlm.io import write_json, write_text
from scratchlm.losses import DPOOutput, dpo_loss, sequence_logprobs
from scratchlm.model.base import LanguageModel
from scratchlm.model.layers import DocumentMask
from scratchlm.model.lora import adapters_disabled, lora_layers
from scratchlm.tasks import answers
from scratchlm.tasks.families import Task, generate_tasks
from scratchlm.tasks.metrics import format_summary
from scratchlm.train.device import pick_device
from scratchlm.train.instruments import plot_panels
from scratchlm.train.loop import Batches, RunResult, train_model
from scratchlm.train.objective import Objective

# -- log-probabilities of responses ---------------------------------------------------------------


def response_starts(targets: torch.Tensor) -> torch.Tensor:
    """(R, T) bool: where a response (a run of targets != -1 within a row) begins."""
    counted = targets != -1
    starts = counted.clone()
    starts[:, 1:] &= ~counted[:, :-1]
    return starts


def response_lengths(targets: torch.Tensor) -> torch.Tensor:
    """(N,) the counted tokens of each response, in row-major order (see `response_logprobs`)."""
    starts, keep = response_starts(targets).flatten(), (targets != -1).flatten()
    return torch.bincount((starts.cumsum(0) - 1)[keep], minlength=int(starts.sum()))


def response_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """logits (R, T, V), targets (R, T) aligned with them (-1 = not counted) -> (N,): the summed (or
    mean) log-probability of each of the N responses, in row-major order. One response per row
    gives `sequence_logprobs(logits, targets)`; a packed row holds several."""
    starts = response_starts(targets).flatten()  # (R*T,)
    run = starts.cumsum(0) - 1  # (R*T,) each position's response (meaningful where counted)
    keep = (targets != -1).flatten()
    # one "row" per position: sequence_logprobs gives each counted position its log p(target) in
    # fp32 (float64 for float64 logits) and 0 elsewhere
    tok = sequence_logprobs(logits.flatten(0, 1)[:, None], targets.flatten()[:, None])  # (R*T,)
    n = int(starts.sum())
    total = torch.zeros(n, dtype=tok.dtype, device=tok.device).index_add(0, run[keep], tok[keep])  # (N,)
    if not average:
        return total
    return total / torch.bincount(run[keep], minlength=n).to(total.dtype)


# -- the objective --------------------------------------------------------------------------------


class DPOObjective(Objective):
    """forward(x (R, T), y (R, T) targets with -1 off the responses, doc_mask for packed rows)
    -> (None, mean DPO loss over the pairs); responses alternate chosen, rejected (see the module
    docstring). `score` gives the per-pair `DPOOutput` and the policy's log-probabilities."""

    def __init__(self, network: LanguageModel, *, beta: float = 0.1, loss: str = "sigmoid",
                 label_smoothing: float = 0.0, rpo_alpha: float = 0.0) -> None:
        super().__init__(network)
        if beta <= 0:
            raise UserError(f"dpo.beta={beta} must be > 0", fix="use e.g. --dpo.beta=0.1")
        self.beta, self.kind, self.label_smoothing, self.rpo_alpha = beta, loss, label_smoothing, rpo_alpha
        self.average = loss == "ipo"  # IPO on length-averaged log-probabilities (Azar et al. 2023)
        # With LoRA the reference is the network with its adapters off; else a frozen copy, taken now.
        self.reference = None if lora_layers(network) else copy.deepcopy(network).requires_grad_(False).eval()

    def train(self, mode: bool = True) -> DPOObjective:
        super().train(mode)
        if self.reference is not None:
            self.reference.eval()  # the reference never drops out
        return self

    def count(self, y: torch.Tensor) -> int:
        n = int(response_starts(y).sum())
        if n % 2:
            raise ValueError(f"{n} responses in the batch: pairs need an even number (chosen, rejected)")
        return n // 2

    @torch.no_grad()
    def reference_logprobs(self, x: torch.Tensor, y: torch.Tensor, doc_mask: DocumentMask | None = None
                           ) -> torch.Tensor:
        """(2P,) the reference's log-probabilities of the batch's responses (eval mode, no gradient)."""
        if self.reference is not None:
            logits, _ = self.reference(x, doc_mask=doc_mask)
        else:
            was_training = self.network.training
            self.network.eval()
            try:
                with adapters_disabled(self.network):
                    logits, _ = self.network(x, doc_mask=doc_mask)
            finally:
                self.network.train(was_training)
        return response_logprobs(logits, y, average=self.average)

    def score(self, x: torch.Tensor, y: torch.Tensor, doc_mask: DocumentMask | None = None
              ) -> tuple[DPOOutput, torch.Tensor]:
        """(per-pair DPOOutput, the policy's log-probabilities (2P,) with their gradient)."""
        ref = self.reference_logprobs(x, y, doc_mask)  # first: a MoE keeps the policy's router losses
        logits, _ = self.network(x, doc_mask=doc_mask)
        policy = response_logprobs(logits, y, average=self.average)
        if policy.numel() % 2:
            raise ValueError(f"{policy.numel()} responses in the batch: pairs need an even number")
        out = dpo_loss(policy[0::2], policy[1::2], ref[0::2], ref[1::2], self.beta, self.kind, self.label_smoothing)
        return out, policy

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None, *, doc_mask: DocumentMask | None = None
                ) -> tuple[None, torch.Tensor]:
        if y is None:
            raise ValueError("DPO needs targets: y (R, T) with -1 off the responses")
        out, policy = self.score(x, y, doc_mask)
        losses = out.losses  # (P,)
        if self.rpo_alpha:  # the chosen answers' mean token NLL, per pair (IPO's log-probs are means already)
            chosen = policy[0::2] if self.average else policy[0::2] / response_lengths(y)[0::2]
            losses = losses - self.rpo_alpha * chosen
        logp = policy.detach()
        self.record(out.losses.numel(), reward_chosen=out.chosen_rewards.mean(),
                    reward_rejected=out.rejected_rewards.mean(), margin=out.margins.mean(),
                    accuracy=(out.margins > 0).float().mean(), logp_chosen=logp[0::2].mean(),
                    logp_rejected=logp[1::2].mean())
        # the loop's convention: a model's loss includes its auxiliary loss (a MoE's router losses)
        return None, losses.mean() + self.network.aux_loss()

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """The policy's forward and backward (6N) plus the reference's forward (2N)."""
        return self.network.flops_per_token(seq_len) * 8 / 6


# -- batches --------------------------------------------------------------------------------------

Row = tuple[list[int], list[int], list[int]]  # ids, labels, document ids


def pack_pairs(pairs: list[TokenizedPair], block_size: int) -> list[list[Row]]:
    """Greedy in-order packing of whole pairs (chosen then rejected, two documents) into rows of at
    most 2·block_size tokens, which the longest pair fits. One unit (a one-row list) per row."""
    width, rows, cur = 2 * block_size, [], ([], [], [])
    for p in pairs:
        need = len(p.chosen_ids) + len(p.rejected_ids)
        if cur[0] and len(cur[0]) + need > width:
            rows.append([cur])
            cur = ([], [], [])
        for ids, labels in ((p.chosen_ids, p.chosen_labels), (p.rejected_ids, p.rejected_labels)):
            doc = cur[2][-1] + 1 if cur[2] else 0
            cur = (cur[0] + ids, cur[1] + labels, cur[2] + [doc] * len(ids))
    if cur[0]:
        rows.append([cur])
    return rows


class DPOLoader:
    """next_batch() -> (x, y) of B pairs as 2B interleaved chosen/rejected rows, right-padded to the
    batch's longest; or, packed, (x, y, doc_ids) of B rows of whole pairs (`pack_pairs`; padding
    has doc id -2 and attends only to itself). Shuffled per epoch by (seed, epoch), or in order;
    `fill=False` ends an epoch with a short batch (one pass reads each pair once). Resumable."""

    def __init__(self, pairs: list[TokenizedPair], batch_size: int, *, packing: bool = False,
                 block_size: int | None = None, shuffle: bool = True, fill: bool = True, seed: int = 0,
                 device: str | torch.device = "cpu") -> None:
        if not pairs:
            raise ValueError("no pairs to batch")
        if packing and block_size is None:
            raise ValueError("packing needs the block size")
        self.packing = packing
        self.units: list[list[Row]] = pack_pairs(pairs, block_size) if packing else [
            [(p.chosen_ids, p.chosen_labels, []), (p.rejected_ids, p.rejected_labels, [])] for p in pairs]
        self.batch_size, self.device = batch_size, device
        self.order = EpochOrder(len(self.units), shuffle=shuffle, fill=fill, seed=seed)

    def __len__(self) -> int:
        """Batches in one pass."""
        return math.ceil(len(self.units) / self.batch_size)

    def next_batch(self) -> tuple[torch.Tensor, ...]:
        rows = [row for i in self.order.take(self.batch_size) for row in self.units[i]]
        T = max(len(ids) for ids, _, _ in rows)
        ids = torch.tensor([r[0] + [0] * (T - len(r[0])) for r in rows])  # (R, T)
        labels = torch.tensor([r[1] + [-1] * (T - len(r[1])) for r in rows])
        x, y = ids[:, :-1].to(self.device), labels[:, 1:].to(self.device)  # the next token is the target
        if not self.packing:
            return x, y
        docs = torch.tensor([r[2] + [-2] * (T - len(r[2])) for r in rows])[:, :-1]  # -2: padding
        return x, y, docs.to(self.device)

    def state_dict(self) -> dict[str, int]:
        return self.order.state_dict("units")

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.order.load_state_dict(state, "units", "preference pairs", "use the same data and pref settings")


@torch.no_grad()
def heldout_rewards(objective: DPOObjective, pairs: list[TokenizedPair], batch_size: int,
                    device: str | torch.device = "cpu") -> dict[str, float]:
    """Implicit-reward accuracy (margin > 0) and mean margin over every pair, in eval mode."""
    was_training = objective.training
    objective.eval()
    loader = DPOLoader(pairs, batch_size, shuffle=False, fill=False, device=device)
    margins = torch.cat([objective.score(*loader.next_batch())[0].margins.float().cpu() for _ in range(len(loader))])
    objective.train(was_training)
    return {"n": len(margins), "accuracy": (margins > 0).float().mean().item(), "margin": margins.mean().item()}


# -- held-out task prompts ------------------------------------------------------------------------


def gold_tasks(cfg: Config, asked: set[str], n: int) -> list[Task]:
    """n embedded tasks at cfg.seed asking none of `asked`: the tasks after the first len(asked) of
    generate_tasks(len(asked) + n, seed) with `asked` filtered out (at the SFT run's seed, exactly
    the tasks after its prompts and this run's; see `reward.embedded_tasks`)."""
    return [t for t in generate_tasks(len(asked) + n, cfg.seed) if t.instruction not in asked][:n]


def _eval_set(cfg: Config, seen: set[str], train_pairs: list[PreferencePair], held_pairs: list[PreferencePair]
              ) -> tuple[list[list[tuple[str, str]]], list[str], list[dict[str, Any]]]:
    """(prompts, gold answers, metas) of the gold evaluation: `gold_tasks` for embedded pairs (every
    prompt of this run's tasks counted as asked), the held-out pairs' chosen answers for files."""
    if cfg.pref.data:
        return ([p.prompt for p in held_pairs], [p.chosen for p in held_pairs],
                [{"source": p.source} for p in held_pairs])
    asked = seen | {t.instruction for t in embedded_tasks(cfg, seen)}
    tasks = gold_tasks(cfg, asked, cfg.dpo.eval_prompts)
    trained = {prompt_key(p) for p in train_pairs}
    leaked = [t.instruction for t in tasks if t.instruction in asked or (("user", t.instruction),) in trained]
    assert not leaked, f"{len(leaked)} gold-evaluation prompts were trained on (first: {leaked[0]!r})"
    return ([[("user", t.instruction)] for t in tasks], [t.answer for t in tasks],
            [{"source": f"gold:{i}", "family": t.family, "difficulty": t.difficulty} for i, t in enumerate(tasks)])


def write_pairs(path: Path, pairs: list[PreferencePair]) -> None:
    """JSONL in the conversational format (`read_pairs` reads it back), each pair's meta beside."""
    rows = [{"prompt": [{"role": r, "content": c} for r, c in p.prompt],
             "chosen": [{"role": "assistant", "content": p.chosen}],
             "rejected": [{"role": "assistant", "content": p.rejected}], "source": p.source, "meta": p.meta}
            for p in pairs]
    write_text(path, "".join(json.dumps(r) + "\n" for r in rows))


# -- the picture ----------------------------------------------------------------------------------


def plot_dpo(metrics: Path, out: Path) -> None:
    """Margins, accuracy, and the chosen and rejected log-probabilities against step (metrics.jsonl)."""
    plot_panels(metrics, out, [(("margin", "val_margin"), "implicit reward margin"),
                               (("accuracy", "val_accuracy"), "implicit reward accuracy"),
                               (("logp_chosen", "logp_rejected"), "policy log-probability")])


# -- the stage ------------------------------------------------------------------------------------


@dataclass
class DPOResult:
    run: RunResult
    scores: dict[str, dict[str, dict[str, float]]]  # "sft" / "dpo" -> family -> metric -> value
    heldout: dict[str, float]  # implicit-reward accuracy and margin on the held-out pairs
    summary: dict[str, Any]  # what RUN/eval/summary.json holds
    table: str
    train_pairs: list[PreferencePair]
    held_pairs: list[PreferencePair]


def dpo(cfg: Config, *, progress: bool = True, resume: bool = False, stop_at_step: int | None = None) -> DPOResult:
    """DPO from `pref.base` on `build_pairs`' pairs, then the gold evaluation (module docstring)."""
    run_dir, d = Path(cfg.out_dir), cfg.dpo
    device = pick_device(cfg.train.device)
    policy, tok, base_cfg = ckpt_io.load_chat_policy(cfg.pref.base, device, "pref.base")
    base = ckpt_io.find_checkpoint(cfg.pref.base)
    cfg.model = replace(base_cfg.model)
    torch.manual_seed(cfg.seed)

    seen = set() if cfg.pref.data else trained_prompts(base)
    train_pairs, held_pairs, counts = build_pairs(cfg, policy, tok, seen=seen)
    if "on_policy_pairs" in counts:
        print(f"on-policy pairs: {counts['on_policy_pairs']} from {counts['on_policy_samples']} samples "
              f"({counts['on_policy_all_right']} prompts always right, {counts['on_policy_all_wrong']} always wrong)")
    write_pairs(run_dir / "pairs_train.jsonl", train_pairs)
    write_pairs(run_dir / "pairs_held_out.jsonl", held_pairs)
    block = cfg.model.block_size
    train_tp, tcounts = tokenize_pairs(train_pairs, tok, block, cfg.pref.overlong)
    held_tp, hcounts = tokenize_pairs(held_pairs, tok, block, cfg.pref.overlong)
    if tcounts["truncated"] or tcounts["dropped"]:
        print(f"pairs longer than the context ({block} tokens): {tcounts['truncated']} prompts cut from the left, "
              f"{tcounts['dropped']} pairs dropped (a response too long; --pref.overlong)")
    print(f"{len(train_tp)} training pairs, {len(held_tp)} held out")
    prompts, golds, metas = _eval_set(cfg, seen, train_pairs, held_pairs)

    eval_dir, batch = run_dir / "eval", 256
    scores = {"sft": answers.gold_eval(policy.eval(), tok, prompts, golds, metas, d.eval_max_new_tokens,
                                       eval_dir / "answers_sft.jsonl", batch)}
    save_lora = adapt_beside_reference(policy, cfg, tok, "DPO")
    objective = DPOObjective(policy, beta=d.beta, loss=d.loss, label_smoothing=d.label_smoothing,
                             rpo_alpha=d.rpo_alpha)
    t = cfg.train
    val = DPOLoader(held_tp, t.batch_size, shuffle=False, fill=False)
    t.eval_iters = max(1, min(t.eval_iters, len(val)))  # each held-out pair at most once per validation
    batches = Batches(train=DPOLoader(train_tp, t.batch_size, seed=cfg.seed, device=device),
                      make_val=lambda: DPOLoader(held_tp, t.batch_size, shuffle=False, fill=False, device=device))
    latest = ckpt_io.find_checkpoint(run_dir) if resume else None
    result = train_model(cfg, objective.train(), tok, batches, resume_from=latest, progress=progress,
                         stop_at_step=stop_at_step, desc="dpo")
    if save_lora:
        save_lora(run_dir, base)

    heldout = heldout_rewards(objective, held_tp, t.batch_size, device)
    scores["dpo"] = answers.gold_eval(policy.eval(), tok, prompts, golds, metas, d.eval_max_new_tokens,
                                      eval_dir / "answers_dpo.jsonl", batch)
    table = format_summary(scores)
    lines = [table, "", f"held-out implicit-reward accuracy {heldout['accuracy']:.1%} (mean margin "
             f"{heldout['margin']:.3f}) on {heldout['n']} pairs; {len(train_tp)} training pairs, {result.steps} "
             f"steps, beta {d.beta:g}, loss {d.loss}" + (f" + {d.rpo_alpha:g} x NLL" if d.rpo_alpha else "")]
    counts.update(train_tokenized=len(train_tp), held_tokenized=len(held_tp),
                  truncated=tcounts["truncated"] + hcounts["truncated"],
                  dropped=tcounts["dropped"] + hcounts["dropped"])
    summary = {"base": str(base), "data": list(cfg.pref.data) or f"embedded:{cfg.pref.kind}", "steps": result.steps,
               "beta": d.beta, "loss": d.loss, "label_smoothing": d.label_smoothing, "rpo_alpha": d.rpo_alpha,
               "scores": scores,
               "heldout": heldout, "counts": counts}
    write_text(eval_dir / "summary.md", "\n".join(lines) + "\n")
    write_json(eval_dir / "summary.json", summary)
    plot_dpo(run_dir / "metrics.jsonl", run_dir / "dpo.png")
    print("\n".join(lines))
    print(f"-> {run_dir / 'dpo.png'}, {eval_dir / 'summary.md'}")
    return DPOResult(result, scores, heldout, summary, "\n".join(lines), train_pairs, held_pairs)
