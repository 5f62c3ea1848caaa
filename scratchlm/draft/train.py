"""`scratchlm train-draft`: an EAGLE draft head trained on a frozen target's own features.

The target reads windows of text once per step (no gradients) and a hook keeps its final hidden
states f (the input of its LM head, `speculative.LastHidden`). The head sees (f_t, embedding of
x_{t+1}) for every position of the window at once (its block is causal, as at inference) and
predicts f_{t+1}. The loss is EAGLE's: a smooth-L1 regression of the features plus 0.1 x the
cross-entropy of the target's LM head applied to the prediction against the target's own next-token
distribution (soft labels: the head learns what the target would say, not what the text says).

A small dedicated loop rather than `train/loop.py`: the trainable module is not a language model
(no vocabulary logits of its own, a frozen second model feeding it), so the shared loop's
checkpointing, resume and bits-per-byte would need special cases; this stage saves only at the end.
Text: files, folders or JSONL (default: the embedded corpus), encoded with the target's tokenizer,
documents joined by its EOS token; the last `val_fraction` of the tokens is held out. Reported: the
held-out top-1 agreement of the head's token with the target's (given the target's true features:
the acceptance rate of the first drafted token under greedy decoding).

Left out: EAGLE's feature noise, resuming, mixed precision, a learning-rate schedule beyond warmup +
cosine.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.checkpoint.adapters import base_fingerprint
from scratchlm.data.sources import iter_documents
from scratchlm.errors import UserError
from scratchlm.infer.eagle import EagleHead, head_config, save_head
from scratchlm.infer.speculative import LastHidden
from scratchlm.model.base import LanguageModel
from scratchlm.tokenizer import Tokenizer


@dataclass
class DraftTrainSettings:
    steps: int = 300
    batch_size: int = 8
    seq_len: int = 0  # 0 = the target's block_size
    lr: float = 3e-3
    warmup: int = 20
    token_weight: float = 0.1  # EAGLE's weight of the token cross-entropy beside the feature regression
    max_chars: int = 2_000_000  # text read (0 = all)
    val_fraction: float = 0.05
    val_batches: int = 4
    seed: int = 0
    draft_vocab: int = 1024  # draft from the most frequent ids of the training text only (0 = all: `eagle.py`)


def token_stream(tok: Tokenizer, inputs: list[str] | None, max_chars: int) -> torch.Tensor:
    """The documents' ids, each followed by the EOS token (when the tokenizer has one), up to max_chars."""
    ids: list[int] = []
    total = 0
    for doc in iter_documents(inputs):
        text = doc.text if not max_chars else doc.text[: max_chars - total]
        ids.extend(tok.encode_ordinary(text))
        if tok.eot_id is not None:
            ids.append(tok.eot_id)
        total += len(text)
        if max_chars and total >= max_chars:
            break
    return torch.tensor(ids, dtype=torch.long)


def eagle_loss(head: EagleHead, target: LanguageModel, hidden: LastHidden, x: torch.Tensor, token_weight: float,
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """x (B, T) token ids -> (loss, top-1 agreement with the target) over the T - 1 predicted positions."""
    with torch.no_grad():
        logits, _ = target(x)  # (B, T, V)
        f = hidden.value  # (B, T, C)
    pred = head(f[:, :-1], target.embedding(x[:, 1:]))  # (B, T-1, C): predicts f[:, 1:]
    reg = F.smooth_l1_loss(pred, f[:, 1:])
    draft_logits = target.unembedding(pred).float()  # (B, T-1, V)
    p = F.softmax(logits[:, 1:].float(), dim=-1)
    ce = -(p * F.log_softmax(draft_logits, dim=-1)).sum(-1).mean()
    vocab = head.vocab
    drafted = draft_logits.argmax(-1) if vocab is None else vocab[draft_logits[..., vocab].argmax(-1)]
    agree = (drafted == logits[:, 1:].argmax(-1)).float().mean()
    return reg + token_weight * ce, agree


def train_draft(target_path: str | Path, inputs: list[str] | None, out: str | Path, s: DraftTrainSettings,
                device: str = "cpu", log: Callable[[str], object] = print) -> dict[str, Any]:
    """Train a head for the target at target_path; writes out/draft.safetensors + draft.json; returns the record."""
    target, tok, _ = load_model_for_inference(target_path, device)
    target.requires_grad_(False)
    T = s.seq_len or target.config.block_size
    if T > target.config.block_size or T < 2:
        raise UserError(f"--seq-len {T} must be between 2 and the target's block_size {target.config.block_size}")
    ids = token_stream(tok, inputs, s.max_chars)
    n_val = int(len(ids) * s.val_fraction)
    train, val = ids[: len(ids) - n_val], ids[len(ids) - n_val :]
    if len(train) <= T or len(val) <= T:
        raise UserError(f"the text gives {len(ids)} tokens: too few for windows of {T} tokens in both the training "
                        f"and the held-out part", fix="pass more text with --data, or a smaller --seq-len")
    g = torch.Generator().manual_seed(s.seed)
    torch.manual_seed(s.seed)
    if s.draft_vocab < 0:
        raise UserError(f"--draft-vocab {s.draft_vocab} must be >= 0", fix="e.g. 1024, or 0 for the whole vocabulary")
    head = EagleHead(head_config(target)).to(device)
    coverage = head.set_vocab(torch.bincount(train, minlength=target.config.vocab_size), s.draft_vocab)
    if head.vocab is not None:
        log(f"drafting from the {head.vocab.numel()} most frequent of {target.config.vocab_size} token ids "
            f"({coverage:.1%} of the training tokens)")
    head.train()
    opt = torch.optim.AdamW(head.parameters(), lr=s.lr, weight_decay=0.0)
    hidden = LastHidden(target)

    def windows(src: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
        starts = torch.randint(0, len(src) - T, (n,), generator=gen)
        return torch.stack([src[i : i + T] for i in starts.tolist()]).to(device)  # (n, T)

    val_batches = [windows(val, s.batch_size, torch.Generator().manual_seed(s.seed + 1 + i))
                   for i in range(s.val_batches)]
    t0, loss = time.time(), torch.tensor(float("nan"))
    try:
        for step in range(s.steps):
            lr = s.lr * min(1.0, (step + 1) / max(1, s.warmup))
            lr *= 0.5 * (1 + math.cos(math.pi * step / s.steps)) if step >= s.warmup else 1.0
            for group in opt.param_groups:
                group["lr"] = lr
            loss, agree = eagle_loss(head, target, hidden, windows(train, s.batch_size, g), s.token_weight)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(head.parameters(), 1.0)
            opt.step()
            if step % max(1, s.steps // 10) == 0 or step == s.steps - 1:
                log(f"step {step + 1}/{s.steps}  loss {loss.item():.4f}  top-1 agreement {agree.item():.3f}  "
                    f"{time.time() - t0:.0f}s")
        head.eval()
        with torch.no_grad():
            val_agree = sum(eagle_loss(head, target, hidden, x, s.token_weight)[1].item() for x in val_batches)
    finally:
        hidden.hook.remove()
    record = {"target": str(target_path), "target_fingerprint": base_fingerprint(target),
              "tokenizer_fingerprint": tok.fingerprint(), "settings": asdict(s), "train_tokens": len(train),
              "final_loss": loss.item(), "draft_vocab_coverage": round(coverage, 4),
              "val_top1_agreement": val_agree / len(val_batches),
              "seconds": round(time.time() - t0, 1)}
    save_head(Path(out), head, record)
    log(f"held-out top-1 agreement with the target {record['val_top1_agreement']:.3f}; wrote {out}")
    return record
