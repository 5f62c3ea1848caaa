"""Differential attention maps (`scratchlm viz diff`): for one head pair of an arch=diff checkpoint, the two
softmax maps and what the layer attends with, their difference map 1 - λ·map 2.

Map 1 alone is what a plain attention head would use; map 2 is learned to hold the attention "noise" map 1
shares with it (weight spread over irrelevant tokens), so the difference is sparser and may go negative.
`differential_maps` runs one prompt with the attention modules recording (model/diff_attn.py keeps the
(B, 2, H/2, T, T) maps of its last forward when `record` is on) and returns, per layer, both maps of every
pair and the layer's λ. `draw_differential` draws a row per layer (or one, `--layer`) of three panels for
`--pair`: map 1 and map 2 on a 0..1 scale, the difference on a diverging scale centred on 0.

matplotlib's object API (no pyplot state), the PNG written atomically, as `viz attention`.
"""

from __future__ import annotations

from pathlib import Path

import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.errors import UserError
from scratchlm.model.base import LanguageModel
from scratchlm.model.diff_attn import DiffTransformer
from scratchlm.viz.attention import prompt_ids, record_forward, save_png, shown_layers, tick_tokens, token_labels


@torch.inference_mode()
def differential_maps(model: LanguageModel, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor, float]]:
    """Run `ids` (cropped from the left to block_size) through an arch=diff model; per layer return
    (first maps (P, T, T), second maps (P, T, T), λ) on the CPU, P = n_head / 2 pairs."""
    if not isinstance(model, DiffTransformer):
        raise UserError(f"a {model.config.arch} model has no differential attention to draw",
                        fix="pass an arch=diff checkpoint (or draw plain attention with `scratchlm viz attention`)")
    return record_forward(model, [layer.attention for layer in model.layers], ids,
                          lambda a: (a.weights[0, 0].float().cpu(), a.weights[0, 1].float().cpu(), float(a.lam())),
                          ("weights",))


def draw(maps: list[tuple[torch.Tensor, torch.Tensor, float]], labels: list[str], layers: list[int], pair: int,
         out: str | Path) -> None:
    """Three panels per layer for head pair `pair`: map 1, map 2, map 1 - λ·map 2. Writes a PNG."""
    from matplotlib.figure import Figure

    T = maps[0][0].size(-1)
    panel = min(6.0, max(2.4, 0.17 * T))
    fig = Figure(figsize=(panel * 3 + 2.4, (panel + 0.5) * len(layers) + 0.4), layout="constrained")
    axes = fig.subplots(len(layers), 3, squeeze=False)
    diffs = [m1[pair] - lam * m2[pair] for m1, m2, lam in maps]
    bound = max(float(d.abs().max()) for d in diffs) or 1.0
    shown = probs = None
    for r, (layer, (m1, m2, lam), d) in enumerate(zip(layers, maps, diffs)):
        panels = ((m1[pair], "viridis", 0.0, 1.0, "map 1: softmax(Q1K1ᵀ)"),
                  (m2[pair], "viridis", 0.0, 1.0, "map 2: softmax(Q2K2ᵀ)"),
                  (d, "RdBu_r", -bound, bound, f"map 1 - λ·map 2 (λ = {lam:.3f})"))
        for c, (w, cmap, lo, hi, title) in enumerate(panels):
            ax = axes[r][c]
            image = ax.imshow(w.numpy(), cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
            probs, shown = (image, shown) if c < 2 else (probs, image)
            ax.set_title(f"layer {layer} pair {pair}\n{title}", fontsize=8)
            tick_tokens(ax, labels)
            if c == 0:
                ax.set_ylabel("query", fontsize=7)
            if r == len(layers) - 1:
                ax.set_xlabel("key (attended to)", fontsize=7)
    fig.colorbar(probs, ax=axes[:, :2], shrink=0.8, label="attention weight")
    fig.colorbar(shown, ax=axes[:, 2], shrink=0.8, label="differential weight")
    save_png(fig, out)


def draw_differential(ckpt: str | Path, prompt: str, out: str | Path, layer: int = -1, pair: int = 0,
                      ) -> tuple[int, int]:
    """The maps of head pair `pair` of an arch=diff checkpoint on a prompt (every layer, or `layer`), to
    `out`. Returns (the prompt's tokens, the tokens drawn)."""
    model, tok, cfg = load_model_for_inference(ckpt, "cpu")
    if cfg.model.arch != "diff":
        raise UserError(f"{ckpt}: a {cfg.model.arch} model has no differential attention to draw",
                        fix="pass an arch=diff checkpoint (or draw plain attention with `scratchlm viz attention`)")
    n_layer, n_pair = cfg.model.n_layer, cfg.model.n_head // 2
    layers = shown_layers(layer, n_layer)
    if not 0 <= pair < n_pair:
        raise UserError(f"--pair {pair} is out of range", fix=f"use 0..{n_pair - 1} (n_head / 2 pairs)")
    ids, n_prompt = prompt_ids(tok, prompt, cfg.model.block_size)
    maps = differential_maps(model, ids)
    draw([maps[i] for i in layers], token_labels(tok, ids), layers, pair, out)
    return n_prompt, len(ids)
