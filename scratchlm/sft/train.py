"""`scratchlm sft`: fine-tune a pretrained checkpoint on instruction data, then score it on gold answers.

Flow: load the base checkpoint (its architecture and tokenizer); add the chat special tokens if
the tokenizer lacks them, growing the embedding; read the data (files, or the embedded
verifiable tasks); hold out `val_fraction` for validation and gold evaluation; render and pack
the rest; optionally wrap the model with LoRA (on a quantized base for QLoRA); train with the
shared loop (`train_model`: accumulation, precision, schedules, checkpoints, resume, logging);
then generate answers for the held-out prompts, write them to JSONL beside the gold ones and
score exact match, token F1, ROUGE-L and, for the embedded tasks, each family's checker.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from scratchlm.config import Config, SampleConfig
from scratchlm.errors import UserError
from scratchlm.eval.gold import exact_match, format_summary, rouge_l, summarise, token_f1
from scratchlm.infer.sample import generate
from scratchlm.io import write_text
from scratchlm.model import build_model
from scratchlm.sft.data import (
    Conversation,
    SFTLoader,
    build_examples,
    ensure_chat_specials,
    order_examples,
    read_conversations,
    render,
    resize_embeddings,
    task_conversations,
)
from scratchlm.sft.tasks import check
from scratchlm.tokenizer import Tokenizer
from scratchlm.train import checkpoint as ckpt_io
from scratchlm.train.pretrain import Batches, RunResult, train_model


def adapt_model(model: nn.Module, cfg: Config) -> list[str]:
    """Apply the config's LoRA (and QLoRA quantization) to a freshly built model; [] when full fine-tuning.
    Inference calls this too, so a LoRA checkpoint loads into the same structure it was saved from."""
    s = cfg.sft
    if s.lora_r <= 0:
        if s.quant_bits:
            raise UserError("sft.quant_bits needs LoRA (QLoRA trains adapters on a frozen quantized base)",
                            fix="set --sft.lora_r=8 (or drop --sft.quant_bits)")
        return []
    from scratchlm.sft.lora import apply_lora, default_targets, prepare_qlora

    targets = s.lora_targets or default_targets(model)
    if s.quant_bits:
        if s.quant_bits not in (4, 8):
            raise UserError(f"sft.quant_bits={s.quant_bits} is not supported", fix="use 4 or 8")
        return prepare_qlora(model, s.quant_bits, 64, targets, s.lora_r, s.lora_alpha, s.lora_dropout)
    return apply_lora(model, targets, s.lora_r, s.lora_alpha, s.lora_dropout)


@dataclass
class SFTResult:
    run: RunResult
    scores: dict[str, dict[str, dict[str, float]]]  # model label -> family -> metric -> value
    table: str


def load_sft_data(cfg: Config) -> list[Conversation]:
    if cfg.sft.data:
        return read_conversations(cfg.sft.data, cfg.sft.format)
    return task_conversations(cfg.sft.n_tasks, cfg.seed)


def split(convs: list[Conversation], fraction: float, seed: int) -> tuple[list[Conversation], list[Conversation]]:
    if not 0 < fraction < 1:
        raise UserError(f"sft.val_fraction={fraction} must be between 0 and 1")
    order = list(range(len(convs)))
    random.Random(seed).shuffle(order)
    n_val = max(1, round(fraction * len(convs)))
    if n_val >= len(convs):
        raise UserError(f"only {len(convs)} SFT examples: nothing left to train on after holding out {n_val}")
    val = sorted(order[:n_val])
    held = set(val)
    return [convs[i] for i in range(len(convs)) if i not in held], [convs[i] for i in val]


@torch.no_grad()
def gold_eval(model: nn.Module, tok: Tokenizer, convs: list[Conversation], max_new_tokens: int,
              out_jsonl: Path | None = None, batch: int = 32) -> dict[str, dict[str, float]]:
    """Greedy answers for each conversation's last user turn, scored against its gold answer."""
    end = tok.special_tokens["<|end|>"]
    block = model.config.block_size
    rows: list[dict[str, Any]] = []
    sample_cfg = SampleConfig(max_new_tokens=max_new_tokens, temperature=0.0, stream=False)
    for i in range(0, len(convs), batch):
        chunk = convs[i : i + batch]
        prompts = [render(tok, c.turns[:-1], add_generation_prompt=True)[0][-(block - max_new_tokens):]
                   for c in chunk]
        outs = generate(model, prompts, sample_cfg, valid_vocab=tok.vocab_size, eos_id=end)
        for c, ids in zip(chunk, outs):
            pred, gold = tok.decode(ids), c.turns[-1][1]
            row = {"source": c.source, "family": c.meta.get("family", "all"), "prompt": c.turns[-2][1],
                   "gold": gold, "generated": pred, "exact": exact_match(pred, gold), "f1": token_f1(pred, gold),
                   "rouge_l": rouge_l(pred, gold)}
            if "family" in c.meta:
                row["checked"] = float(check(c.meta["family"], gold, pred))
            rows.append(row)
    if out_jsonl is not None:
        write_text(out_jsonl, "".join(json.dumps(r) + "\n" for r in rows))
    return summarise(rows)


def sft(cfg: Config, *, progress: bool = True, resume: bool = False, stop_at_step: int | None = None) -> SFTResult:
    run_dir = Path(cfg.out_dir)
    if not cfg.sft.base:
        raise UserError("sft.base is not set", fix="pass --base RUN (a pretrained run or checkpoint folder)")
    base = ckpt_io.find_checkpoint(cfg.sft.base)
    base_cfg, tok = ckpt_io.load_config_and_tokenizer(base)
    cfg.model = replace(base_cfg.model)
    tok, added = ensure_chat_specials(tok)

    torch.manual_seed(cfg.seed)
    model = build_model(replace(base_cfg.model))
    ckpt_io.load_weights(model, base)
    if tok.vocab_size > model.config.vocab_size:
        resize_embeddings(model, tok.vocab_size)
    cfg.model.vocab_size = model.config.vocab_size
    if added:
        print(f"added chat tokens {', '.join(added)} to the tokenizer (vocab {tok.vocab_size})")

    convs = load_sft_data(cfg)
    train_convs, val_convs = split(convs, cfg.sft.val_fraction, cfg.seed)
    block = cfg.model.block_size
    train_ex, counts = build_examples(train_convs, tok, block, cfg.sft.overlong)
    val_ex, _ = build_examples(val_convs, tok, block, cfg.sft.overlong)
    if counts["truncated"] or counts["dropped"]:
        print(f"examples longer than the context ({block} tokens): {counts['truncated']} truncated, "
              f"{counts['dropped']} dropped (--sft.overlong)")
    train_ex = order_examples(train_ex, cfg.sft.curriculum, cfg.seed)
    t = cfg.train
    device = "cuda" if torch.cuda.is_available() and t.device in ("auto", "cuda") else "cpu"
    batches = Batches(
        train=SFTLoader(train_ex, block, t.batch_size, packing=cfg.sft.packing,
                        shuffle=cfg.sft.curriculum == "none", seed=cfg.seed, device=device),
        make_val=lambda: SFTLoader(val_ex, block, t.batch_size, packing=cfg.sft.packing, shuffle=False, device=device),
    )
    scores: dict[str, dict[str, dict[str, float]]] = {}
    eval_dir = run_dir / "eval"
    if not resume:
        scores["base"] = gold_eval(model.eval(), tok, val_convs, cfg.sft.eval_max_new_tokens,
                                   eval_dir / "answers_base.jsonl")
    wrapped = adapt_model(model, cfg)
    if wrapped:
        print(f"LoRA r={cfg.sft.lora_r} on {len(wrapped)} layers" + (f", base quantized to int{cfg.sft.quant_bits}"
                                                                   if cfg.sft.quant_bits else ""))
    latest = ckpt_io.find_checkpoint(run_dir) if resume else None
    result = train_model(cfg, model.train(), tok, batches, resume_from=latest, progress=progress,
                         stop_at_step=stop_at_step, desc="sft")
    if wrapped:
        from scratchlm.sft.lora import save_adapters

        save_adapters(model, run_dir / "adapters.safetensors", {"base": str(base)})
    scores["sft"] = gold_eval(model.eval(), tok, val_convs, cfg.sft.eval_max_new_tokens,
                              eval_dir / "answers_sft.jsonl")
    table = format_summary(scores)
    write_text(eval_dir / "summary.md", table + "\n")
    print(table)
    return SFTResult(result, scores, table)
