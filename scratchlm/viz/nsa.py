"""Native sparse attention's choices (`scratchlm viz nsa`): for one head of an arch=nsa checkpoint, which key
blocks the selection branch read in full for each query, the sliding window's span, and how the three
branches' gates mixed them.

`nsa_choices` runs one prompt with the attention modules recording (model/nsa.py's `SparseAttention` keeps
the (B, H_kv, T, N_sel) blocks it chose and the (B, H, T, 3) sigmoid gates of its last forward when `record`
is on) and returns them per layer. `draw` gives each layer a column: on top a query x key grid at token
resolution whose cells are coloured by the selection block they fall in (chosen, chosen because it is
always chosen: the first block and the query's own, or not chosen), the future left blank, with the window
branch's span outlined in red; below, the head's three gates per query position.

The selection is shared by the query heads of one key/value group, so `--head` picks the group through its
query head; the gates are that head's own. matplotlib's object API, the PNG written atomically, as the
other pictures.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from scratchlm.checkpoint import load_model_for_inference
from scratchlm.errors import UserError
from scratchlm.model.base import LanguageModel
from scratchlm.model.nsa import NSATransformer
from scratchlm.viz.attention import prompt_ids, record_forward, save_png, shown_layers, tick_tokens, token_labels

NOT_CHOSEN, CHOSEN, FORCED = 1, 2, 3  # grid cell states; 0 = a future key


@dataclass
class LayerChoices:
    """One layer's recorded choices for one prompt: `selected` (H_kv, T, N_sel) bool, `gates` (H, T, 3) in
    the order compressed, selected, window; with the layer's geometry."""

    selected: torch.Tensor
    gates: torch.Tensor
    sel_block: int
    window: int


@torch.inference_mode()
def nsa_choices(model: LanguageModel, ids: list[int]) -> list[LayerChoices]:
    """Run `ids` (cropped from the left to block_size) through an arch=nsa model; per layer return the blocks
    its selection branch chose and its gates, on the CPU."""
    if not isinstance(model, NSATransformer):
        raise UserError(f"a {model.config.arch} model has no sparse attention to draw",
                        fix="pass an arch=nsa checkpoint (or draw plain attention with `scratchlm viz attention`)")
    return record_forward(model, [layer.attention for layer in model.layers], ids,
                          lambda a: LayerChoices(a.selected[0].cpu(), a.gates[0].float().cpu(), a.sel_block, a.window),
                          ("selected", "gates"))


def choice_grid(choices: LayerChoices, group: int) -> torch.Tensor:
    """(T, T) ints, query x key: 0 a future key, else the state of the selection block the key lies in
    (NOT_CHOSEN, CHOSEN, or FORCED: the first block and the query's own, chosen whatever their score)."""
    sel = choices.selected[group]  # (T, N_sel)
    T = sel.size(0)
    block = torch.arange(T) // choices.sel_block  # (T,) each key's block
    state = torch.where(sel[:, block], CHOSEN, NOT_CHOSEN)  # (T query, T key)
    forced = (block[None, :] == 0) | (block[None, :] == block[:, None])
    state = torch.where(forced & (state == CHOSEN), FORCED, state)
    return state.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), 0)


def draw(layers: list[tuple[int, LayerChoices]], labels: list[str], head: int, heads_per_group: int,
         out: str | Path) -> None:
    """A column per layer: the choice grid with the window outlined, and the head's gates below."""
    from matplotlib.colors import ListedColormap
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    T = layers[0][1].selected.size(1)
    group = head // heads_per_group
    panel = min(6.0, max(2.8, 0.17 * T))
    fig = Figure(figsize=(panel * len(layers) + 1.0, panel * 1.45 + 1.0), layout="constrained")
    axes = fig.subplots(2, len(layers), squeeze=False, gridspec_kw={"height_ratios": [3, 1]})
    colours = ListedColormap(["white", "#e3e3e3", "#6baed6", "#08519c"])
    for c, (layer, ch) in enumerate(layers):
        ax = axes[0][c]
        ax.imshow(choice_grid(ch, group).numpy(), cmap=colours, vmin=0, vmax=3, interpolation="nearest")
        t = torch.arange(T)
        lo = (t - ch.window + 1).clamp(min=0)  # the window's first key per query
        rows = torch.stack([t - 0.5, t + 0.5], 1).flatten()  # each row's top and bottom
        for edge in (lo - 0.5, t + 0.5):  # the window's left and right edges, a vertical step per row
            ax.plot(edge.repeat_interleave(2).numpy(), rows.numpy(), color="#d62728", linewidth=1.2)
        ax.set_title(f"layer {layer}, head {head} (key/value group {group})\nselected blocks of "
                     f"{ch.sel_block}, window {ch.window}", fontsize=8)
        ax.set_xlim(-0.5, T - 0.5)
        ax.set_ylim(T - 0.5, -0.5)
        tick_tokens(ax, labels, blank=False)  # the grid's positions stay readable
        ax.set_xlabel("key", fontsize=7)
        if c == 0:
            ax.set_ylabel("query", fontsize=7)
        g = ch.gates[head]  # (T, 3)
        gx = axes[1][c]
        for i, (name, colour) in enumerate((("compressed", "#9467bd"), ("selected", "#1f77b4"),
                                            ("window", "#d62728"))):
            gx.plot(range(T), g[:, i].numpy(), label=name, color=colour, linewidth=1.2)
        gx.set_ylim(0, 1)
        gx.set_xlim(-0.5, T - 0.5)
        gx.set_xlabel("query position", fontsize=7)
        gx.set_ylabel("gate", fontsize=7)
        gx.tick_params(labelsize=6)
        gx.grid(alpha=0.3)
    axes[1][0].legend(fontsize=6, loc="best")
    fig.legend(handles=[Patch(color="#08519c", label="selected (always: first / own block)"),
                        Patch(color="#6baed6", label="selected (top by compressed score)"),
                        Patch(color="#e3e3e3", label="not selected"),
                        Patch(facecolor="none", edgecolor="#d62728", label="sliding window")],
               loc="outside lower center", ncols=4, fontsize=7)
    save_png(fig, out)


def draw_nsa(ckpt: str | Path, prompt: str, out: str | Path, layer: int = -1, head: int = 0) -> tuple[int, int]:
    """The selection and gates of query head `head` of an arch=nsa checkpoint on a prompt (every layer, or
    `layer`), to `out`. Returns (the prompt's tokens, the tokens drawn)."""
    model, tok, cfg = load_model_for_inference(ckpt, "cpu")
    if cfg.model.arch != "nsa":
        raise UserError(f"{ckpt}: a {cfg.model.arch} model has no sparse attention to draw",
                        fix="pass an arch=nsa checkpoint (or draw plain attention with `scratchlm viz attention`)")
    n_layer, n_head = cfg.model.n_layer, cfg.model.n_head
    shown = shown_layers(layer, n_layer)
    if not 0 <= head < n_head:
        raise UserError(f"--head {head} is out of range", fix=f"use 0..{n_head - 1} (model.n_head query heads)")
    ids, n_prompt = prompt_ids(tok, prompt, cfg.model.block_size)
    choices = nsa_choices(model, ids)
    draw([(i, choices[i]) for i in shown], token_labels(tok, ids), head,
         n_head // (cfg.model.n_kv_head or n_head), out)
    return n_prompt, len(ids)
