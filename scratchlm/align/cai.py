"""`scratchlm cai`: Constitutional AI (Bai et al. 2022) at tiny scale: critique -> revision -> preference.

The loop, on the SFT policy (`cai.base`) and a constitution (`scratchlm.align.constitution`):
1. the model answers the red-team training prompts (`scratchlm.align.redteam`) through the Engine
   (greedy: the answers it would give);
2. each answer is checked against every principle; the critique of a broken one is the principle's
   critique template filled with what its check found. The critique is RULE-WRITTEN (AI feedback by
   rule): a model of a few million parameters cannot judge an answer, but a program can run these checks;
3. the revision: with `cai.model_revisions`, the model itself is shown its answer, the critique and the
   revision request (the principles' revision templates) and answers again; its revision is kept only
   if it passes every principle, differs from the original and is an edit of it (no word that is not in
   the original or in a refusal). Otherwise the RULE reviser writes it (trim, delete the forbidden
   words, lowercase, the refusal, ...). Each revision records who wrote it, and the output counts both;
4. as in the paper, every red-team prompt's final answer is SFT data: the revision where a principle
   was broken, the model's own answer where none was (an empty answer is skipped). Without the latter
   the model learns that an odd-looking prompt (capitals, a long list) calls for the refusal it was
   taught on marked ones. They go to RUN/cai/sft_data.jsonl (the messages format) beside a replay of
   embedded tasks with their gold answers (`cai.replay` per red-team prompt; CAI mixes helpful data
   in the same way, so the model does not forget its tasks while it learns to refuse), trained with the
   SFT stage for `cai.sft_steps` steps (RUN/sft);
5. (revision > original) become preference pairs (RUN/cai/pairs.jsonl, the prompt/chosen/rejected
   format) for DPO or the reward model; DPO (`scratchlm.align.dpo`) then trains the model of step 4 on
   them for `cai.dpo_steps` steps at `cai.dpo_lr` (RUN/dpo), that model being its reference. The pairs'
   originals are the SFT policy's answers, not this model's: off-policy pairs, as files of pairs are.

Metrics (greedy answers; RUN/eval/cai_answers_<model>.jsonl): per principle, the violation rate on the
held-out red-team prompts aimed at it, and on all of them for any principle; on the benign held-out
prompts (`redteam`), task accuracy by the family's checker and the refusal rate (an answer that
contains three words of a refusal in a row: a model that refuses everything has no violations and is
no better); the same refusal rate on the held-out red-team prompts that carry no marker. Written to
RUN/eval/cai_summary.md and .json, and RUN/cai.png (violation rates per principle, grouped bars).

Left out: a model-written critique (the model only writes answers and, optionally, revisions), sampling
several answers per prompt, and revising more than once.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from scratchlm.align.constitution import Constitution, load_constitution, words_of
from scratchlm.align.data import PreferencePair, same_text
from scratchlm.align.dpo import dpo
from scratchlm.align.redteam import CAIPrompt, PromptSet, generate_prompts
from scratchlm.checkpoint import find_checkpoint, load_config_and_tokenizer, load_policy, save_weights_checkpoint
from scratchlm.config import Config, SampleConfig
from scratchlm.errors import UserError
from scratchlm.io import write_json, write_text
from scratchlm.sft.train import sft
from scratchlm.tasks.answers import chat_answers
from scratchlm.tasks.families import check
from scratchlm.tokenizer import Tokenizer
from scratchlm.train.device import pick_device

# the columns of the table: the SFT policy, after SFT on revisions, after DPO (other keys: their own name)
LABELS = {"before": "before (SFT policy)", "sft": "after SFT on revisions", "dpo": "after DPO"}


@dataclass
class Revision:
    """One red-team training prompt through the loop."""

    prompt: CAIPrompt
    original: str  # model-written
    findings: dict[str, str]  # principle -> what its check found (empty: no violation)
    critique: str = ""  # rule-written
    revision: str | None = None
    revised_by: str = ""  # "model", "rule", "none" (no edit could fix it) or "" (nothing to revise)

    def to_json(self) -> dict[str, Any]:
        return {"prompt": self.prompt.text, "principle": self.prompt.principle, "original": self.original,
                "findings": self.findings, "critique": self.critique, "revision": self.revision,
                "revised_by": self.revised_by}


@dataclass
class CAIResult:
    scores: dict[str, dict[str, Any]]  # model ("before", "sft", "dpo") -> scores (see `evaluate`)
    counts: dict[str, int]  # who wrote what, and how much data came out
    table: str
    runs: dict[str, Path] = field(default_factory=dict)  # stage -> its run folder


# -- the loop -------------------------------------------------------------------------------------


def _greedy(max_new_tokens: int, seed: int) -> SampleConfig:
    return SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0, seed=seed, stream=False)


def is_edit(candidate: str, original: str, constitution: Constitution) -> bool:
    """Whether a model's revision may stand for a revision of `original`: not empty, not the original
    again, and no word that is in neither the original nor a refusal (a revision edits; it does not
    answer anew, which a rule could not vouch for)."""
    allowed = set(words_of(original)) | {w for r in constitution.refusals() for w in words_of(r)}
    got = words_of(candidate)
    return bool(got) and not same_text(candidate, original) and set(got) <= allowed


def critique_and_revise(model: nn.Module, tok: Tokenizer, constitution: Constitution, prompts: list[CAIPrompt], *,
                        max_new_tokens: int, model_revisions: bool = True, seed: int = 0, batch: int = 64
                        ) -> tuple[list[Revision], dict[str, int]]:
    """Answer, critique and revise every prompt (steps 1-3 of the module docstring). Counts say who
    wrote what: "answers (model)", "violations", "critiques (rule)", "revisions tried (model)",
    "revisions (model)", "revisions (rule)", "unrevisable" (no rule edit could fix the answer), "kept as
    answered (model)" (no principle broken), "empty answers" (no principle broken, nothing said)."""
    asked = [[("user", p.text)] for p in prompts]
    answers = chat_answers(model, tok, asked, _greedy(max_new_tokens, seed), batch=batch)
    records = []
    for p, answer in zip(prompts, answers):
        findings = constitution.findings(p.text, answer)
        rec = Revision(p, answer, findings)
        if findings:
            broken = [q for q in constitution.principles if q.name in findings]
            rec.critique = " ".join(q.fill(q.critique, p.text, answer, findings[q.name]) for q in broken)
        records.append(rec)
    todo = [r for r in records if r.findings]
    tried = 0
    if model_revisions and todo:
        asks = []
        for r in todo:
            broken = [q for q in constitution.principles if q.name in r.findings]
            request = " ".join(q.fill(q.revision, r.prompt.text, r.original, r.findings[q.name]) for q in broken)
            asks.append([("user", r.prompt.text), ("assistant", r.original), ("user", f"{r.critique} {request}")])
        candidates = chat_answers(model, tok, asks, _greedy(max_new_tokens, seed), batch=batch)
        tried = len(candidates)
        for r, cand in zip(todo, candidates):
            if not constitution.findings(r.prompt.text, cand) and is_edit(cand, r.original, constitution):
                r.revision, r.revised_by = cand.strip(), "model"
    for r in todo:
        if r.revised_by != "model":
            r.revision = constitution.revise(r.prompt.text, r.original)
            r.revised_by = "rule" if r.revision is not None else "none"
        if r.revision is not None:  # the revision of record passes every principle, whoever wrote it
            assert not constitution.findings(r.prompt.text, r.revision), (r.prompt.text, r.revision)
    by = [r.revised_by for r in todo]
    passing = [r for r in records if not r.findings]
    kept = sum(bool(r.original.strip()) for r in passing)
    counts = {"answers (model)": len(records), "violations": len(todo), "critiques (rule)": len(todo),
              "revisions tried (model)": tried, "revisions (model)": by.count("model"),
              "revisions (rule)": by.count("rule"), "unrevisable": by.count("none"),
              "kept as answered (model)": kept, "empty answers": len(passing) - kept}
    return records, counts


def revision_pairs(records: list[Revision]) -> tuple[list[PreferencePair], int]:
    """(revision > original) pairs, and how many revisions gave none (an empty original: pair files
    refuse an empty response)."""
    pairs, empty = [], 0
    for i, r in enumerate(records):
        if r.revision is None:
            continue
        if not r.original.strip():
            empty += 1
            continue
        pairs.append(PreferencePair([("user", r.prompt.text)], r.revision, r.original, f"cai:{i}",
                                    {"kind": "cai", "principle": r.prompt.principle, "revised_by": r.revised_by}))
    return pairs, empty


def final_answer(record: Revision) -> str | None:
    """What the loop settles on for a prompt: its revision, or the model's own answer where it broke no
    principle; None where there is nothing to train on (unrevisable, or empty)."""
    if record.findings:
        return record.revision
    return record.original if record.original.strip() else None


def sft_records(records: list[Revision], replay: list[CAIPrompt]) -> list[dict[str, Any]]:
    """The SFT data in the messages format: each red-team prompt's final answer (`final_answer`), then
    the replayed tasks' gold answers."""
    rows = [(r.prompt.text, final_answer(r), f"revision:{r.revised_by}" if r.findings else "answer")
            for r in records if final_answer(r) is not None]
    rows += [(p.text, p.task.answer, "replay") for p in replay if p.task is not None]
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "source": s}
            for q, a, s in rows]


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


# -- evaluation -----------------------------------------------------------------------------------


def evaluate(model: nn.Module, tok: Tokenizer, constitution: Constitution, prompts: PromptSet, *,
             max_new_tokens: int, seed: int = 0, out_jsonl: Path | None = None, batch: int = 64) -> dict[str, Any]:
    """Greedy answers to the held-out red-team and benign prompts, scored:
    {"violation": {principle: rate on the held-out prompts aimed at it, "any": any principle broken on
    all of them}, "n": {principle: prompts}, "task_accuracy", "benign_refusal", "benign_violation" (any
    principle broken on a benign answer), "n_benign", "redteam_refusal" (refusals of the held-out
    red-team prompts that carry no marker), "n_unmarked"}."""
    asked = prompts.held_out + prompts.benign
    answers = chat_answers(model, tok, [[("user", p.text)] for p in asked], _greedy(max_new_tokens, seed), batch=batch)
    rows = []
    for p, answer in zip(asked, answers):
        found = constitution.findings(p.text, answer)
        row = {"set": "red_team" if p.principle else "benign", "principle": p.principle, "prompt": p.text,
               "answer": answer, "findings": found, "refused": constitution.is_refusal(answer)}
        if not p.principle and p.task is not None:
            row["checked"] = check(p.task.family, p.task, answer)
        rows.append(row)
    if out_jsonl is not None:
        _jsonl(out_jsonl, rows)
    red, benign = [r for r in rows if r["set"] == "red_team"], [r for r in rows if r["set"] == "benign"]
    violation, n = {}, {}
    for q in constitution.principles:
        mine = [r for r in red if r["principle"] == q.name]
        violation[q.name], n[q.name] = sum(q.name in r["findings"] for r in mine) / max(1, len(mine)), len(mine)
    violation["any"], n["any"] = sum(bool(r["findings"]) for r in red) / max(1, len(red)), len(red)
    unmarked = [r for r, p in zip(red, prompts.held_out) if not any(q.check.marked(p.text)
                                                                    for q in constitution.principles)]
    return {"violation": violation, "n": n, "task_accuracy": _mean(benign, "checked"),
            "benign_refusal": _mean(benign, "refused"), "benign_violation": _mean(benign, "findings"),
            "n_benign": len(benign), "redteam_refusal": _mean(unmarked, "refused"), "n_unmarked": len(unmarked)}


def _mean(rows: list[dict[str, Any]], key: str) -> float:
    return sum(bool(r.get(key)) for r in rows) / max(1, len(rows))


# -- report ---------------------------------------------------------------------------------------


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def format_table(constitution: Constitution, scores: dict[str, dict[str, Any]], counts: dict[str, int]) -> str:
    """The violation table (markdown): a row per principle, a column per model (in the order of
    `scores`), then the benign rows, then who wrote what."""
    models = list(scores)
    first = scores[models[0]]
    head = "| | prompts | " + " | ".join(LABELS.get(m, m) for m in models) + " |"
    lines = ["Violation rate on held-out red-team prompts (lower is better); benign held-out prompts below.", "",
             head, "|" + "---|" * (2 + len(models))]
    for q in [*constitution.principles, None]:
        name = q.name if q else "any"
        what = f"{name} ({_describe(q)})" if q else "any principle, all red-team prompts"
        lines.append(f"| {what} | {first['n'][name]} | "
                     + " | ".join(_pct(scores[m]["violation"][name]) for m in models) + " |")
    for key, n, what in (("redteam_refusal", "n_unmarked", "red-team without a marker: refusal rate"),
                         ("task_accuracy", "n_benign", "benign: task accuracy (checker; higher is better)"),
                         ("benign_refusal", "n_benign", "benign: refusal rate (lower is better)"),
                         ("benign_violation", "n_benign", "benign: any principle broken")):
        lines.append(f"| {what} | {first[n]} | " + " | ".join(_pct(scores[m][key]) for m in models) + " |")
    c = counts
    lines += ["", f"Model-written: {c['answers (model)']} answers to the red-team training prompts "
              f"({c['violations']} broke a principle; {c['kept as answered (model)']} broke none and are trained on as "
              f"they are; {c['empty answers']} empty ones are not); {c['revisions (model)']} revisions kept of "
              f"{c['revisions tried (model)']} the model was asked for.",
              f"Rule-written: {c['critiques (rule)']} critiques (the checks' findings in the critique templates); "
              f"{c['revisions (rule)']} revisions; {c['unrevisable']} violations no rule edit could fix (dropped).",
              f"Data: {c['sft examples']} SFT examples ({c['revisions (model)'] + c['revisions (rule)']} revisions + "
              f"{c['kept as answered (model)']} answers kept + {c['replay']} replayed tasks); "
              f"{c['pairs']} preference pairs (revision > original)"
              + (f", {c['pairs dropped (empty original)']} revisions of an empty answer gave no pair" if
                 c.get("pairs dropped (empty original)") else "") + "."]
    return "\n".join(lines)


def _describe(q: Any) -> str:
    c = q.check
    return {"max_words": f"at most {c.n} words", "forbidden": "no " + "/".join(c.words),
            "format": c.format, "refuse_marked": f"refuse {c.marker}"}[c.kind]


def draw(constitution: Constitution, scores: dict[str, dict[str, Any]], out: Path) -> None:
    """Grouped bars: per principle (and any), the violation rate of each model; beside them the benign
    task accuracy and refusal rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(scores)
    names = [q.name for q in constitution.principles] + ["any"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(4 + 1.3 * len(names), 4), width_ratios=[len(names), 2])
    width = 0.8 / len(models)
    for i, m in enumerate(models):
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(len(names))]
        bars = ax.bar(xs, [100 * scores[m]["violation"][n] for n in names], width, label=LABELS.get(m, m))
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
        xs = [j + (i - (len(models) - 1) / 2) * width for j in range(2)]
        bars = bx.bar(xs, [100 * scores[m]["task_accuracy"], 100 * scores[m]["benign_refusal"]], width)
        bx.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(names)), names, rotation=20)
    ax.set_ylabel("% of held-out red-team prompts")
    ax.set_title("violation rate (lower is better)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8)
    bx.set_xticks(range(2), ["task accuracy", "refusal rate"])
    bx.set_ylim(0, 100)
    bx.set_title("benign prompts")
    fig.suptitle(f"Constitutional AI: {constitution.name} constitution")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


# -- the stage ------------------------------------------------------------------------------------


def _plain_base(base: str, dst: Path) -> str:
    """The base as a plain checkpoint the SFT stage can start from: a LoRA fine-tune merged into one
    (written under dst), anything else as it is."""
    ckpt = find_checkpoint(base)
    cfg, _ = load_config_and_tokenizer(ckpt)
    if cfg.sft.lora_r == 0:
        return base
    model, tok, merged_cfg = load_policy(ckpt)
    merged_cfg.out_dir = str(dst)
    save_weights_checkpoint(dst / "ckpt" / "step_0", model, merged_cfg, tok, {"merged_from": str(ckpt)})
    return str(dst / "ckpt" / "step_0")


def sft_on_data(cfg: Config, base: str, data: Path, out: Path, progress: bool = False) -> None:
    """The SFT stage from `base` on a messages file, for `cai.sft_steps` steps at cfg's settings (step 4;
    bench/cai.py trains its control, the replay alone, the same way)."""
    s = copy.deepcopy(cfg)
    s.out_dir, s.train.max_steps = str(out), cfg.cai.sft_steps
    s.train.eval_interval = min(s.train.eval_interval, s.train.max_steps)
    s.sft.base, s.sft.data, s.sft.format = base, [str(data)], "messages"
    s.sft.val_fraction, s.sft.eval_max_new_tokens = 0.05, cfg.cai.max_new_tokens  # 5%: the revisions are few
    sft(s, progress=progress)


def _dpo_on_pairs(cfg: Config, base: Path, pairs: Path, out: Path, progress: bool) -> None:
    d = copy.deepcopy(cfg)
    d.out_dir, d.pref.base, d.pref.data, d.pref.format = str(out), str(base), [str(pairs)], "prompt"
    t = d.train
    t.max_steps, t.lr, t.min_lr = cfg.cai.dpo_steps, cfg.cai.dpo_lr, cfg.cai.dpo_lr / 10
    t.eval_interval, t.warmup_steps = min(t.eval_interval, t.max_steps), min(t.warmup_steps, t.max_steps // 10)
    d.dpo.eval_max_new_tokens = cfg.cai.max_new_tokens
    dpo(d, progress=progress)


def cai(cfg: Config, *, progress: bool = True) -> CAIResult:
    """The whole loop (module docstring) from `cai.base`; artifacts under cfg.out_dir."""
    c, run = cfg.cai, Path(cfg.out_dir)
    if not c.base:
        raise UserError("cai.base is not set", fix="pass --base RUN (the SFT run or checkpoint to align)")
    constitution = load_constitution(c.constitution)
    device = str(pick_device(cfg.train.device))
    prompts = generate_prompts(constitution, c.n_prompts, c.val_fraction, cfg.seed, c.replay)
    write_json(run / "cai" / "constitution.json", constitution.to_json())
    _jsonl(run / "cai" / "prompts.jsonl",
           [{"set": name, "principle": p.principle, "prompt": p.text}
            for name in ("train", "held_out", "benign", "replay") for p in getattr(prompts, name)])
    print(f"constitution {constitution.name!r} ({constitution.source}): {len(constitution.principles)} principles; "
          f"red-team prompts: {len(prompts.train)} to revise, {len(prompts.held_out)} held out; "
          f"{len(prompts.benign)} benign held out; {len(prompts.replay)} replayed tasks")

    model, tok, _ = load_policy(c.base, device)
    scores = {"before": evaluate(model.eval(), tok, constitution, prompts, max_new_tokens=c.max_new_tokens,
                                 seed=cfg.seed, out_jsonl=run / "eval" / "cai_answers_before.jsonl")}
    records, counts = critique_and_revise(model, tok, constitution, prompts.train, max_new_tokens=c.max_new_tokens,
                                          model_revisions=c.model_revisions, seed=cfg.seed)
    del model
    _jsonl(run / "cai" / "revisions.jsonl", [r.to_json() for r in records])
    examples = sft_records(records, prompts.replay)
    _jsonl(run / "cai" / "sft_data.jsonl", examples)
    pairs, empty = revision_pairs(records)
    _jsonl(run / "cai" / "pairs.jsonl", [{"prompt": p.prompt[-1][1], "chosen": p.chosen, "rejected": p.rejected,
                                          **p.meta} for p in pairs])
    counts.update({"sft examples": len(examples), "replay": sum(e["source"] == "replay" for e in examples),
                   "pairs": len(pairs), "pairs dropped (empty original)": empty})
    print(f"{counts['violations']} of {counts['answers (model)']} model-written answers broke a principle; "
          f"critiques: {counts['critiques (rule)']} rule-written; revisions: {counts['revisions (model)']} "
          f"model-written (of {counts['revisions tried (model)']} asked), {counts['revisions (rule)']} rule-written, "
          f"{counts['unrevisable']} unrevisable")
    if counts["revisions (model)"] + counts["revisions (rule)"] == 0:
        raise UserError("no answer to revise: the model broke no principle on the red-team prompts",
                        fix="use a stricter constitution or more prompts (--cai.n_prompts)")

    runs = {"sft": run / "sft"}
    sft_on_data(cfg, _plain_base(c.base, run / "cai" / "base"), run / "cai" / "sft_data.jsonl", runs["sft"], progress)
    model, tok, _ = load_policy(runs["sft"], device)
    scores["sft"] = evaluate(model.eval(), tok, constitution, prompts, max_new_tokens=c.max_new_tokens,
                             seed=cfg.seed, out_jsonl=run / "eval" / "cai_answers_sft.jsonl")
    del model
    notes = []
    if c.dpo_steps == 0:
        notes.append("DPO on (revision > original) was not run (cai.dpo_steps=0).")
    elif len(pairs) < 2:
        notes.append(f"DPO on (revision > original) was not run: {len(pairs)} pair, too few to hold any out.")
    else:
        runs["dpo"] = run / "dpo"
        _dpo_on_pairs(cfg, runs["sft"], run / "cai" / "pairs.jsonl", runs["dpo"], progress)
        model, tok, _ = load_policy(runs["dpo"], device)
        scores["dpo"] = evaluate(model.eval(), tok, constitution, prompts, max_new_tokens=c.max_new_tokens,
                                 seed=cfg.seed, out_jsonl=run / "eval" / "cai_answers_dpo.jsonl")
        del model

    table = format_table(constitution, scores, counts)
    table = table + "\n\n" + "\n".join(notes) if notes else table
    write_text(run / "eval" / "cai_summary.md", f"# Constitutional AI: {constitution.name}\n\n{table}\n")
    write_json(run / "eval" / "cai_summary.json", {"constitution": constitution.to_json(), "scores": scores,
                                                   "counts": counts, "notes": notes,
                                                   "runs": {k: str(v) for k, v in runs.items()}})
    draw(constitution, scores, run / "cai.png")
    print(table)
    return CAIResult(scores, counts, table, runs)
