"""Attention-weight heatmaps (`scratchlm viz attention`).

The GPT's attention modules keep the (B, H, T, T) softmax weights of their last forward when
`record` is on (they then take the explicit attention path, since the fused kernel never forms
the weights). `attention_weights` runs one prompt and returns them, one (H, T, T) tensor per
layer: row t is query position t's distribution over key positions 0..t, zero above the
diagonal. `draw_attention` draws a checkpoint's one T x T panel per head (a row per layer, or one row for
`--layer`), with the prompt's tokens as tick labels, on one shared 0..1 colour scale.

Choices: matplotlib's object API (`Figure`, Agg canvas), so no pyplot state or backend is
touched; the PNG is written atomically. Left out: attention rollout / flow across layers,
per-head statistics, interactive views; only the GPT has attention (bigram and MLP baselines
are refused).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.errors import UserError
from scratchlm.infer.text import encode_prompt
from scratchlm.io import atomic_open
from scratchlm.model.base import LanguageModel
from scratchlm.model.gpt import GPT
from scratchlm.tokenizer import Tokenizer

MAX_LABELLED = 40  # more tokens than this: tick labels would overlap, so none are drawn

R = TypeVar("R")


# -- shared by the attention-map views (this module, diff_attn.py, nsa.py) --------------------------------

def record_forward(model: LanguageModel, modules: Sequence[nn.Module], ids: list[int], take: Callable[[Any], R],
                   cleared: Sequence[str]) -> list[R]:
    """Run `ids` (cropped from the left to block_size) through `model` in eval mode with each of `modules`
    recording (`record` on); return `take(module)` per module. Afterwards recording is off, the recorded
    attributes `cleared` are None and the model's train/eval mode is restored, however the forward ends."""
    if not ids:
        raise ValueError("need at least one token")
    ids = ids[-model.config.block_size:]
    was_training = model.training
    model.eval()
    try:
        for m in modules:
            m.record = True
        model(torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device))  # (1, T)
        return [take(m) for m in modules]
    finally:
        for m in modules:
            m.record = False
            for name in cleared:
                setattr(m, name, None)
        model.train(was_training)


def tick_tokens(ax: Any, labels: list[str], *, blank: bool = True) -> None:
    """Label a query x key panel's axes with the tokens; past MAX_LABELLED tokens they would overlap, so the
    ticks are then removed (`blank`) or left as positions."""
    T = len(labels)
    if T <= MAX_LABELLED:
        size = 7 if T <= 20 else 5
        ax.set_xticks(range(T), labels, rotation=90, fontsize=size)
        ax.set_yticks(range(T), labels, fontsize=size)
    elif blank:
        ax.set_xticks([])
        ax.set_yticks([])


def shown_layers(layer: int, n_layer: int) -> list[int]:
    """The layers `--layer` asks for: all for -1, else that one, refused when out of range."""
    if layer != -1 and not 0 <= layer < n_layer:
        raise UserError(f"--layer {layer} is out of range", fix=f"use 0..{n_layer - 1}, or -1 for every layer")
    return list(range(n_layer)) if layer == -1 else [layer]


def prompt_ids(tok: Tokenizer, prompt: str, block_size: int) -> tuple[list[int], int]:
    """(the prompt's last block_size token ids, which are drawn; its length in tokens before that crop)."""
    ids = encode_prompt(tok, prompt)
    return ids[-block_size:], len(ids)


def save_png(fig: Any, out: str | Path) -> None:
    """Write `fig` to `out` atomically; a token with no glyph in the font is drawn as a box, silently."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Glyph ... missing from font": drawn as a box instead
        with atomic_open(out, "wb") as f:
            fig.savefig(f, format="png", dpi=110)



@torch.inference_mode()
def attention_weights(model: LanguageModel, ids: list[int]) -> list[torch.Tensor]:
    """Run `ids` (cropped from the left to block_size) through a GPT; return each layer's
    attention weights as an (H, T, T) float tensor on the CPU."""
    if not isinstance(model, GPT):
        raise UserError(f"a {model.config.arch} model has no attention to draw",
                        fix="pass a GPT checkpoint, one with model.arch=gpt")
    return record_forward(model, [block.attn for block in model.h], ids,
                          lambda a: a.weights[0].float().cpu(), ("weights",))  # each (H, T, T)


def token_labels(tok: Tokenizer, ids: list[int]) -> list[str]:
    """One readable label per token: its piece, whitespace made visible, `$` escaped (mathtext)."""
    labels = []
    for i in ids:
        piece = tok.id_to_piece(i) if hasattr(tok, "id_to_piece") else tok.decode([i])
        piece = piece.replace("\n", "\\n").replace("\t", "\\t").replace(" ", "\u2423").replace("$", r"\$")
        labels.append(piece or "\u2205")
    return labels


def draw(weights: list[torch.Tensor], labels: list[str], layers: list[int], out: str | Path) -> None:
    """One panel per (layer, head): weights[r] is layer layers[r]'s (H, T, T). Writes a PNG."""
    from matplotlib.figure import Figure

    H, T, _ = weights[0].shape
    panel = min(6.0, max(2.4, 0.17 * T))  # inches: room for T labels, bounded for long prompts
    fig = Figure(figsize=(panel * H + 1.2, panel * len(layers) + 0.4), layout="constrained")
    axes = fig.subplots(len(layers), H, squeeze=False)
    image = None
    for r, (layer, w) in enumerate(zip(layers, weights)):
        for h in range(H):
            ax = axes[r][h]
            image = ax.imshow(w[h].numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
            ax.set_title(f"layer {layer} head {h}", fontsize=9)
            tick_tokens(ax, labels)
            if r == len(layers) - 1:
                ax.set_xlabel("key (attended to)", fontsize=7)
            if h == 0:
                ax.set_ylabel("query", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    save_png(fig, out)


def draw_attention(ckpt: str | Path, prompt: str, out: str | Path, layer: int = -1) -> tuple[int, int]:
    """Heatmaps of a checkpoint's attention on a prompt (every layer, or `layer`), to `out`. Returns
    (the prompt's tokens, the tokens drawn): only the last block_size fit the model."""
    model, tok, cfg = load_model_for_inference(ckpt, "cpu")
    if cfg.model.arch != "gpt":
        raise UserError(f"{ckpt}: a {cfg.model.arch} model has no attention to draw",
                        fix="pass a GPT checkpoint, one with model.arch=gpt")
    n_layer = cfg.model.n_layer
    layers = shown_layers(layer, n_layer)
    ids, n_prompt = prompt_ids(tok, prompt, cfg.model.block_size)
    weights = attention_weights(model, ids)
    draw([weights[i] for i in layers], token_labels(tok, ids), layers, out)
    return n_prompt, len(ids)
