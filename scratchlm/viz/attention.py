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
from pathlib import Path

import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.errors import UserError
from scratchlm.infer.text import encode_prompt
from scratchlm.io import atomic_open
from scratchlm.model.base import LanguageModel
from scratchlm.model.gpt import GPT
from scratchlm.tokenizer import Tokenizer

MAX_LABELLED = 40  # more tokens than this: tick labels would overlap, so none are drawn


@torch.inference_mode()
def attention_weights(model: LanguageModel, ids: list[int]) -> list[torch.Tensor]:
    """Run `ids` (cropped from the left to block_size) through a GPT; return each layer's
    attention weights as an (H, T, T) float tensor on the CPU."""
    if not isinstance(model, GPT):
        raise UserError(f"a {model.config.arch} model has no attention to draw",
                        fix="pass a GPT checkpoint, one with model.arch=gpt")
    if not ids:
        raise ValueError("need at least one token")
    ids = ids[-model.config.block_size:]
    device = next(model.parameters()).device
    attns = [block.attn for block in model.h]
    was_training = model.training
    model.eval()
    try:
        for a in attns:
            a.record = True
        model(torch.tensor([ids], dtype=torch.long, device=device))  # (1, T)
        return [a.weights[0].float().cpu() for a in attns]  # each (H, T, T)
    finally:
        for a in attns:
            a.record, a.weights = False, None
        model.train(was_training)


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
            if T <= MAX_LABELLED:
                size = 7 if T <= 20 else 5
                ax.set_xticks(range(T), labels, rotation=90, fontsize=size)
                ax.set_yticks(range(T), labels, fontsize=size)
            else:
                ax.set_xticks([])
                ax.set_yticks([])
            if r == len(layers) - 1:
                ax.set_xlabel("key (attended to)", fontsize=7)
            if h == 0:
                ax.set_ylabel("query", fontsize=7)
    fig.colorbar(image, ax=axes, shrink=0.8, label="attention weight")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Glyph ... missing from font": drawn as a box instead
        with atomic_open(out, "wb") as f:
            fig.savefig(f, format="png", dpi=110)


def draw_attention(ckpt: str | Path, prompt: str, out: str | Path, layer: int = -1) -> tuple[int, int]:
    """Heatmaps of a checkpoint's attention on a prompt (every layer, or `layer`), to `out`. Returns
    (the prompt's tokens, the tokens drawn): only the last block_size fit the model."""
    model, tok, cfg = load_model_for_inference(ckpt, "cpu")
    if cfg.model.arch != "gpt":
        raise UserError(f"{ckpt}: a {cfg.model.arch} model has no attention to draw",
                        fix="pass a GPT checkpoint, one with model.arch=gpt")
    n_layer = cfg.model.n_layer
    if layer != -1 and not 0 <= layer < n_layer:
        raise UserError(f"--layer {layer} is out of range", fix=f"use 0..{n_layer - 1}, or -1 for every layer")
    ids = encode_prompt(tok, prompt)
    n_prompt = len(ids)
    ids = ids[-cfg.model.block_size:]
    weights = attention_weights(model, ids)
    layers = list(range(n_layer)) if layer == -1 else [layer]
    draw([weights[i] for i in layers], token_labels(tok, ids), layers, out)
    return n_prompt, len(ids)
