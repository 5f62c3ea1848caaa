"""`scratchlm sft`: fine-tune a pretrained checkpoint on instruction data, then score it on gold answers.

Flow: load the base checkpoint (its architecture and tokenizer); add the chat special tokens if
the tokenizer lacks them, growing the embedding; read the data (files, or the embedded
verifiable tasks); drop exact duplicates and hold out `val_fraction` of the distinct prompts for
validation and gold evaluation (no held-out prompt is trained on); render and pack
the rest; optionally wrap the model with LoRA (on a quantized base for QLoRA); train with the
shared loop (`train_model`: accumulation, precision, schedules, checkpoints, resume, logging);
then generate answers for the held-out prompts, write them to JSONL beside the gold ones and
score exact match, token F1, ROUGE-L and, for the embedded tasks, each family's checker.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import nn

from scratchlm import checkpoint as ckpt_io
from scratchlm.checkpoint import ADAPTER_TENSORS, base_fingerprint, save_adapters
from scratchlm.config import Config
from scratchlm.errors import UserError
from scratchlm.io import write_text
from scratchlm.model import build_model, resize_embeddings
from scratchlm.model.lora import adapt_model
from scratchlm.sft.data import (
    Conversation,
    SFTLoader,
    build_examples,
    drop_duplicates,
    order_examples,
    read_conversations,
    split_by_prompt,
    task_conversations,
)
from scratchlm.tasks import answers
from scratchlm.tasks.metrics import format_summary
from scratchlm.tokenizer import Tokenizer
from scratchlm.tokenizer.chat import ensure_chat_specials
from scratchlm.train.device import pick_device
from scratchlm.train.distributed import place
from scratchlm.train.loop import Batches, RunResult, train_model


@dataclass
class SFTResult:
    run: RunResult
    scores: dict[str, dict[str, dict[str, float]]]  # model label -> family -> metric -> value
    table: str


def load_sft_data(cfg: Config) -> list[Conversation]:
    if cfg.sft.data:
        return read_conversations(cfg.sft.data, cfg.sft.format)
    return task_conversations(cfg.sft.n_tasks, cfg.seed)


def split(convs: list[Conversation], fraction: float, seed: int
          ) -> tuple[list[Conversation], list[Conversation], int]:
    """(train, held out, duplicates dropped): exact duplicates dropped first, then `fraction` of the
    distinct prompts held out, so the gold evaluation never scores a prompt the model trained on."""
    if not 0 < fraction < 1:
        raise UserError(f"sft.val_fraction={fraction} must be between 0 and 1")
    distinct, dropped = drop_duplicates(convs)
    train, val = split_by_prompt(distinct, fraction, seed)
    return train, val, dropped


def gold_eval(model: nn.Module, tok: Tokenizer, convs: list[Conversation], max_new_tokens: int,
              out_jsonl: Path | None = None, batch: int = 32) -> dict[str, dict[str, float]]:
    """Greedy answers for each conversation's last user turn, scored against its gold answer."""
    return answers.gold_eval(model, tok, [c.turns[:-1] for c in convs], [c.turns[-1][1] for c in convs],
                             [{"source": c.source, **c.meta} for c in convs], max_new_tokens, out_jsonl, batch)


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
    base_vocab = model.config.vocab_size
    if cfg.sft.lora_r > 0:  # recorded with the adapters: they refuse to load onto any other base
        fingerprint = base_fingerprint(model)
    if tok.vocab_size > model.config.vocab_size:
        resize_embeddings(model, tok.vocab_size)
    cfg.model.vocab_size = model.config.vocab_size
    if added:
        print(f"added chat tokens {', '.join(added)} to the tokenizer (vocab {tok.vocab_size})")

    convs = load_sft_data(cfg)
    train_convs, val_convs, dropped = split(convs, cfg.sft.val_fraction, cfg.seed)
    if dropped:
        print(f"dropped {dropped} duplicate SFT examples (same prompt and answer as an earlier one)")
    block = cfg.model.block_size
    train_ex, counts = build_examples(train_convs, tok, block, cfg.sft.overlong)
    val_ex, _ = build_examples(val_convs, tok, block, cfg.sft.overlong)
    if counts["truncated"] or counts["dropped"]:
        print(f"examples longer than the context ({block} tokens): {counts['truncated']} truncated, "
              f"{counts['dropped']} dropped (--sft.overlong)")
    train_ex = order_examples(train_ex, cfg.sft.curriculum, cfg.seed)
    t = cfg.train
    device = pick_device(t.device)
    batches = Batches(
        train=SFTLoader(train_ex, block, t.batch_size, packing=cfg.sft.packing,
                        shuffle=cfg.sft.curriculum == "none", seed=cfg.seed, device=device,
                        rank=place().rank, world_size=place().world_size),  # torchrun: one global stream
        make_val=lambda: SFTLoader(val_ex, block, t.batch_size, packing=cfg.sft.packing, shuffle=False, device=device),
    )
    scores: dict[str, dict[str, dict[str, float]]] = {}
    writer = place().rank == 0  # under torchrun every rank evaluates (FSDP's forward needs them all); rank 0 writes
    eval_dir = run_dir / "eval"

    def answers_file(name: str) -> Path | None:
        return eval_dir / name if writer else None

    if not resume:
        scores["base"] = gold_eval(model.eval(), tok, val_convs, cfg.sft.eval_max_new_tokens,
                                   answers_file("answers_base.jsonl"))
    wrapped = adapt_model(model, cfg, tok)
    if wrapped:
        s = cfg.sft
        print(f"LoRA r={s.lora_r} alpha={s.lora_alpha:g} on {len(wrapped)} layers, lr x{s.lora_lr_mult:g}"
              + (f", base quantized to int{s.quant_bits}" if s.quant_bits else "")
              + {"all": ", the token embedding trains too", "chat": ", the chat markers' embedding rows train too",
                 "none": ""}[s.lora_embedding]
              + (f" (lr x{s.lora_embedding_lr_mult:g})" if s.lora_embedding != "none" else ""))
    latest = ckpt_io.find_checkpoint(run_dir) if resume else None
    result = train_model(cfg, model.train(), tok, batches, resume_from=latest, progress=progress,
                         stop_at_step=stop_at_step, desc="sft")
    if wrapped and writer:
        save_adapters(model, run_dir / ADAPTER_TENSORS, base=str(base), base_fingerprint=fingerprint,
                      base_vocab_size=base_vocab, added_tokens={n: tok.special_tokens[n] for n in added})
    scores["sft"] = gold_eval(model.eval(), tok, val_convs, cfg.sft.eval_max_new_tokens,
                              answers_file("answers_sft.jsonl"))
    table = format_summary(scores)
    if writer:
        write_text(eval_dir / "summary.md", table + "\n")
    print(table)
    return SFTResult(result, scores, table)
