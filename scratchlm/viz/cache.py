"""Inference cache size against context length (`scratchlm viz cache`): what multi-head latent attention
saves over grouped-query attention, and what a recurrent hybrid (Jamba) holds instead.

`measure_cache` builds the engine's cache for a model (`KVCache.for_model`, which reads the model's
`attention_shape`: keys and values per head, or MLA's latent and RoPE key), prefills N tokens through the
model's cached forward (in chunks of block_size) and reads the bytes the cache then holds (`nbytes`: the
allocated key/value slots plus any recurrent states, such as Jamba's Mamba layers set during the forward),
for N from 1 to `max_blocks` x block_size. `draw` plots total bytes and bytes per token held against N for
several models on shared axes; `describe` says each model's per-token cost and the formula it comes from:

    GQA (and plain multi-head)   2 x layers x kv heads x head dim x bytes per element
    MLA                          layers x (latent width + RoPE key width) x bytes per element
    Jamba                        the attention layers' GQA cost per token + the Mamba states, constant in N

Past block_size the models run on positions they were not trained on: the bytes are the cache layout's,
which does not care. A GPT's position table ends at block_size, so its curve does too. Untrained tiny presets
stand in when no checkpoint is given (the title says so); bytes depend only on the layout and the dtype.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.config import get_preset
from scratchlm.errors import UserError
from scratchlm.infer.kv_cache import KVCache
from scratchlm.io import atomic_open
from scratchlm.model import build_model
from scratchlm.model.base import LanguageModel
from scratchlm.model.gpt import GPT

DEFAULT_PRESETS = ("llama-tiny", "mla-tiny", "jamba-tiny")


@dataclass
class CacheCurve:
    """One model's cache: `contexts` (tokens) and the `total` bytes held after prefilling each;
    `per_token` the bytes one more token costs, `state` the bytes that do not grow with the context;
    `layout` the formula in words."""

    name: str
    layout: str
    per_token: int
    state: int
    contexts: list[int]
    total: list[int]


def layout_formula(model: LanguageModel, cache: KVCache) -> str:
    """The per-token formula of this model's cache, with its numbers."""
    a = model.attention_shape()
    size = cache.k.element_size()
    if a.latent_dim:
        return f"{a.n_layer} layers x ({a.latent_dim} latent + {a.rope_dim} RoPE key) x {size} B"
    layers = "attention layers" if model.recurrent else "layers"
    return f"2 x {a.n_layer} {layers} x {a.n_kv_head} kv heads x {a.head_dim} dims x {size} B"


@torch.inference_mode()
def measure_cache(model: LanguageModel, name: str, max_blocks: int = 10) -> CacheCurve:
    """Prefill caches of 1 .. max_blocks x block_size tokens and read their bytes."""
    if model.attention_shape() is None:
        raise UserError(f"{name}: a {model.config.arch} model keeps no inference cache",
                        fix="pass checkpoints of attention models (gpt, llama, moe, mla, diff, nsa, jamba)")
    if max_blocks < 1:
        raise UserError(f"--max-blocks {max_blocks} must be >= 1", fix="use 1 or more (default 10)")
    was_training = model.training
    model.eval()
    block = model.config.block_size
    limit = block if isinstance(model, GPT) else max_blocks * block  # a GPT's position table ends at block_size
    contexts = [1] + [k * block for k in range(1, max_blocks + 1) if k * block <= limit]
    device = next(model.parameters()).device
    vocab = model.config.vocab_size
    totals, cache = [], None
    for n in contexts:
        cache = KVCache.for_model(model, 1, n)
        ids = torch.arange(n, device=device)[None] % vocab  # (1, n): the content does not change the bytes
        for start in range(0, n, block):
            model(ids[:, start : start + block], cache=cache)
        totals.append(cache.nbytes)
    model.train(was_training)
    state = sum(s.nelement() * s.element_size() for s in cache.states.values())
    layout = layout_formula(model, cache) + (f" + {state:,} B of recurrent state" if state else "")
    return CacheCurve(name, layout, cache.bytes_per_token(), state, contexts, totals)


def describe(curve: CacheCurve) -> str:
    """One line: the model, its bytes per token and its formula, and the total at the longest context."""
    return (f"{curve.name}: {curve.per_token:,} B/token = {curve.layout}; {curve.total[-1]:,} B "
            f"at {curve.contexts[-1]:,} tokens")


def draw(curves: list[CacheCurve], out: str | Path, untrained: bool) -> None:
    """Two panels: total cache bytes and bytes per held token against the context, one line per model."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.8), layout="constrained")
    total_ax, per_ax = fig.subplots(1, 2)
    for c in curves:
        label = f"{c.name}: {c.per_token:,} B/token" + (f" + {c.state:,} B state" if c.state else "")
        line, = total_ax.plot(c.contexts, [b / 1024 for b in c.total], marker="o", markersize=3, label=label)
        per_ax.plot(c.contexts, [b / n for b, n in zip(c.total, c.contexts)], marker="o", markersize=3,
                    color=line.get_color(), label=c.name)
    total_ax.set_xlabel("context (tokens held)")
    total_ax.set_ylabel("cache KiB (one sequence)")
    total_ax.set_title("inference cache held", fontsize=9)
    total_ax.legend(fontsize=7)
    per_ax.set_xlabel("context (tokens held)")
    per_ax.set_ylabel("bytes per token held")
    per_ax.set_xscale("log")
    per_ax.set_yscale("log")
    per_ax.set_title("bytes per token (a constant state spreads over more tokens)", fontsize=9)
    for ax in (total_ax, per_ax):
        ax.grid(alpha=0.3)
    fig.suptitle("inference cache size" + (" (untrained tiny presets: the bytes depend only on the layout)"
                                    if untrained else ""), fontsize=10)
    with atomic_open(out, "wb") as f:
        fig.savefig(f, format="png", dpi=110)


def draw_cache(ckpts: list[str | Path], out: str | Path, max_blocks: int = 10) -> list[str]:
    """Measure each checkpoint's cache (or, with none, the untrained DEFAULT_PRESETS on the CPU in fp32),
    draw them to `out`, and return one `describe` line per model."""
    models = []
    for ckpt in ckpts:
        model, _, cfg = load_model_for_inference(ckpt, "cpu")
        models.append((model, f"{Path(ckpt).name} ({cfg.model.arch})"))
    if not ckpts:
        for name in DEFAULT_PRESETS:
            cfg = get_preset(name)
            torch.manual_seed(0)
            models.append((build_model(replace(cfg.model, vocab_size=cfg.tokenizer.vocab_size)), name))
    curves = [measure_cache(model, name, max_blocks) for model, name in models]
    draw(curves, out, untrained=not ckpts)
    return [describe(c) for c in curves]
