"""An EAGLE-style draft head, and `load_draft`: what `--draft RUN` names, made into a draft.

EAGLE (Li et al. 2024, "EAGLE: Speculative Sampling Requires Rethinking Feature Uncertainty") drafts
from the target's own features instead of a separate model. At position t the head reads the
target's final hidden state f_t (the input of its LM head) and the embedding of the token x_{t+1}
that followed, concatenated and projected back to the width, runs one decoder block over them, and
predicts f_{t+1}; the target's frozen LM head turns that into the distribution of x_{t+2}. Drafting
k tokens feeds the head its own predicted features (EAGLE-1): only the items whose f_t the target
has computed (the accepted text) are ever kept in the head's cache; each proposal rolls it back to
them. The head owns only the projection and the block (about 12·C² weights of a Llama block); the
token table and the LM head are the target's, so a head is tied to the target it was trained on
(a fingerprint of its weights is recorded and checked).

Choices: the features are the target's final *normed* hidden states (the input of its unembedding,
the same hook the RL value head reads), so the LM head applies to a prediction directly; the block is a
Llama block (RoPE, so its positions need no table) whatever the target's family. Training is the
`draft` stage (scratchlm/draft/).

A head may draft from a subset of the vocabulary: the `draft_vocab` tokens most frequent in its
training text (FR-Spec: Zhao et al. 2025, "Accelerating Large-Vocabulary Language Models via
Frequency-Ranked Speculative Sampling"). The LM head is the costliest part of a draft step at
small widths (8,192 x 512 weights against the block's 12 x 512^2), and the tokens a draft gets
accepted are nearly always frequent ones: on the 30M bench the 1,024 most frequent of 8,192 BPE
tokens cover 88% of the text and the mean accepted length did not change. The target still
verifies over its whole vocabulary, so greedy output stays identical and sampled output keeps the
target's distribution (rejection sampling is exact for any draft distribution q).

Left out: EAGLE-2's dynamic draft trees, and the noise EAGLE adds to training features.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from safetensors.torch import save as safetensors_save
from torch import nn

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.checkpoint.adapters import base_fingerprint
from scratchlm.config import LlamaConfig
from scratchlm.errors import UserError
from scratchlm.infer.kv_cache import KVCache
from scratchlm.infer.mtp import MTPDraft
from scratchlm.infer.speculative import Draft, ModelDraft, Pick
from scratchlm.io import atomic_open, write_json
from scratchlm.model.base import AttentionShape, LanguageModel
from scratchlm.model.layers import RoPE
from scratchlm.model.llama import TransformerBlock
from scratchlm.tokenizer import Tokenizer

FORMAT, VERSION = "scratchlm-eagle", 1
RECORD, WEIGHTS = "draft.json", "draft.safetensors"


def head_config(target: LanguageModel) -> LlamaConfig:
    """The head's block: the target's width, heads and context, one layer."""
    c = target.config
    return LlamaConfig(vocab_size=c.vocab_size, block_size=c.block_size, n_layer=1, n_head=c.n_head,
                       n_kv_head=getattr(c, "n_kv_head", 0), n_embd=c.n_embd, bias=False)


class EagleHead(nn.Module):
    """(target features f_t (B, T, C), embeddings of x_{t+1} (B, T, C)) -> predicted f_{t+1} (B, T, C)."""

    def __init__(self, cfg: LlamaConfig, draft_vocab: int = 0) -> None:
        """draft_vocab: the number of token ids the head drafts from (0 = the whole vocabulary); their ids
        are the buffer `vocab`, set by training (`set_vocab`)."""
        super().__init__()
        self.config = cfg
        C = cfg.n_embd
        self.fc = nn.Linear(2 * C, C, bias=True)
        self.layer = TransformerBlock(cfg)
        self.rope = RoPE(C // cfg.n_head, cfg.rope.theta)
        self.vocab: torch.Tensor | None
        self.register_buffer("vocab", torch.arange(draft_vocab) if draft_vocab else None)

    def set_vocab(self, counts: torch.Tensor, n: int) -> float:
        """Draft from the n ids with the highest counts (V,) (ties to the lower id; n = 0 or >= V: all);
        returns the fraction of the counted tokens they cover."""
        if not 0 < n < counts.numel():
            self.vocab = None
            return 1.0
        order = torch.sort(-counts.double(), stable=True).indices[:n]
        self.vocab = torch.sort(order).values.to(self.fc.weight.device)
        return float(counts[order].sum() / counts.sum().clamp(min=1))

    def attention_shape(self) -> AttentionShape:
        c = self.config
        return AttentionShape(1, c.n_kv_head or c.n_head, c.n_embd // c.n_head, 0, c.block_size)

    def forward(self, feats: torch.Tensor, tok_emb: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        B, T, _ = feats.shape
        x = self.fc(torch.cat([feats, tok_emb], dim=-1))  # (B, T, C)
        positions = None if cache is not None else torch.arange(T, device=x.device)[None]
        x = self.layer(x, self.rope, positions, 0, cache, None)
        if cache is not None:
            cache.advance(T)
        return x


class EagleDraft:
    """A `Draft` from an EagleHead on `target`'s features. The cache holds items base .. base+true-1
    (f_j, x_{j+1}) with the target's true features, then (while drafting) the head's own."""

    needs_features = True

    def __init__(self, head: EagleHead, target: LanguageModel) -> None:
        """The head may run in another dtype than the target (`load_draft` makes it bfloat16): features
        and embeddings are cast on the way in, predicted features back to the target's on the way out."""
        self.head, self.module, self.target = head, head, target
        self.context = head.config.block_size
        self.vocab_size = target.config.vocab_size
        self.dtype, self.target_dtype = head.fc.weight.dtype, next(target.parameters()).dtype
        lm_head = target.unembedding
        self.sub: tuple[torch.Tensor, torch.Tensor | None] | None = None  # the LM head's rows of the head's vocab
        if head.vocab is not None and type(lm_head) is nn.Linear:
            bias = lm_head.bias[head.vocab].detach() if lm_head.bias is not None else None
            self.sub = lm_head.weight[head.vocab].detach(), bias
        self.reset()

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """(1, C) predicted features -> (1, V) logits in the target's dtype: its LM head, or that head's
        rows of the head's vocabulary with -inf elsewhere (ids outside it are never drafted)."""
        h = h.to(self.target_dtype)
        vocab = self.head.vocab
        if vocab is None:
            return self.target.unembedding(h)
        z = F.linear(h, *self.sub) if self.sub is not None else self.target.unembedding(h)[..., vocab]
        return z.new_full((z.size(0), self.vocab_size), float("-inf")).index_copy_(1, vocab, z)

    def reset(self) -> None:
        self.cache: KVCache | None = None
        self.base = self.true = 0

    def propose(self, view: list[int], features: torch.Tensor | None, k: int, pick: Pick,
                ) -> tuple[list[int], list[torch.Tensor | None]]:
        n = len(view)
        if features is None or n < 2 or features.size(0) != n - 1:
            return [], []
        new = n - 1 - self.base - self.true  # items whose true features arrived since the last proposal
        if self.cache is None or new < 1 or self.cache.max_len - self.true < new + k - 1:
            self.base = max(0, n - 1 - (self.context - k + 1))
            self.cache, self.true = KVCache.for_model(self.head, 1, self.context), 0
            new = n - 1 - self.base
        else:
            self.cache.truncate([self.true])  # drop the items made of the head's own features
        start = self.base + self.true
        embed = self.target.embedding
        toks = torch.tensor([view[start + 1 : n]], device=features.device)  # (1, new)
        f = features[None, start : n - 1].to(self.dtype)
        h = self.head(f, embed(toks).to(self.dtype), self.cache)[:, -1:]  # (1, 1, C): f_{n-1}
        self.true += new
        tokens, dists, context = [], [], list(view)
        for j in range(k):
            t, q = pick(self.logits(h[:, -1]), context)
            tokens.append(t)
            dists.append(q)
            context.append(t)
            if j < k - 1:
                h = self.head(h, embed(torch.tensor([[t]], device=h.device)).to(self.dtype), self.cache)
        return tokens, dists


def save_head(out: Path, head: EagleHead, record: dict[str, Any]) -> None:
    """out/draft.safetensors (the head's weights) + out/draft.json (what it is and what it was trained on)."""
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in head.state_dict().items()}
    with atomic_open(out / WEIGHTS, "wb") as f:
        f.write(safetensors_save(tensors))
    c = head.config
    write_json(out / RECORD, {"format": FORMAT, "version": VERSION, "kind": "eagle",
                              "head": {"n_embd": c.n_embd, "n_head": c.n_head, "n_kv_head": c.n_kv_head,
                                       "block_size": c.block_size, "vocab_size": c.vocab_size,
                                       "draft_vocab": 0 if head.vocab is None else head.vocab.numel()},
                              **record})


def is_eagle(path: str | Path) -> bool:
    return (Path(path) / RECORD).is_file()


def load_head(path: str | Path, target: LanguageModel, tok: Tokenizer, dtype: torch.dtype | None = None,
              ) -> EagleHead:
    """The head saved at path, checked against the target it will draft for, in dtype (None: the target's)."""
    path = Path(path)
    rec = json.loads((path / RECORD).read_text(encoding="utf-8"))
    if rec.get("format") != FORMAT:
        raise UserError(f"{path / RECORD}: not a scratchlm draft head (format {rec.get('format')!r})")
    if rec.get("tokenizer_fingerprint") != tok.fingerprint():
        raise UserError(f"--draft {path}: its tokenizer (fingerprint {rec.get('tokenizer_fingerprint')}) differs from "
                        f"the target's ({tok.fingerprint()})",
                        fix="train a head on this target: scratchlm train-draft")
    if rec.get("target_fingerprint") != base_fingerprint(target):
        raise UserError(f"--draft {path}: this head was trained on another target ({rec.get('target', '?')})",
                        fix="a head drafts only for the model it was trained on: scratchlm train-draft --target "
                            "this checkpoint")
    h = rec["head"]
    cfg = LlamaConfig(vocab_size=h["vocab_size"], block_size=h["block_size"], n_layer=1, n_head=h["n_head"],
                      n_kv_head=h["n_kv_head"], n_embd=h["n_embd"], bias=False)
    head = EagleHead(cfg, h.get("draft_vocab", 0))
    head.load_state_dict(load_file(str(path / WEIGHTS)))
    p = next(target.parameters())
    return head.to(device=p.device, dtype=dtype or p.dtype).eval()


def load_draft(path: str | Path, target: LanguageModel, tok: Tokenizer, device: str = "cpu",
               dtype: torch.dtype | None = torch.bfloat16) -> Draft:
    """--draft PATH: an EAGLE head folder (from `scratchlm train-draft`) or any scratchlm checkpoint
    whose tokenizer is the target's (refused by fingerprint otherwise); `mtp`: the target's own
    multi-token prediction modules (an arch=mla model with model.mtp_depth >= 1).

    A head or draft model runs in `dtype` (None: the target's). Its precision decides only which tokens
    are proposed, never what is output (the target verifies in its own), and a batch-1 draft step
    reads its weights once: bfloat16 halves the bytes. On a 2-core AVX2 CPU (no bf16 instructions) it
    raised the 30M bench's speed-up with the EAGLE head from 1.19x to 1.37x (k=4) at the same accepted
    length, and with the draft model from 0.96x to 1.06x."""
    if str(path) == "mtp":
        return MTPDraft(target)
    if not Path(path).exists():
        raise UserError(f"--draft {path}: no such file or directory", fix="pass a run or checkpoint folder")
    if is_eagle(path):
        return EagleDraft(load_head(path, target, tok, dtype), target)
    model, draft_tok, _ = load_model_for_inference(path, device)
    if draft_tok.fingerprint() != tok.fingerprint():
        raise UserError(f"--draft {path}: its tokenizer (fingerprint {draft_tok.fingerprint()}) differs from the "
                        f"target's ({tok.fingerprint()})",
                        fix="a draft model must be trained with the target's tokenizer")
    return ModelDraft(model.to(dtype=dtype or next(target.parameters()).dtype), vocab_size=target.config.vocab_size)
