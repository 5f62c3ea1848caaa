"""Calibration for GPTQ and AWQ: text in, each linear layer's inputs (their Hessian, a sample of rows) out.

The text is a prepared data folder's training split (a folder with `manifest.json`; the validation
split stays held out for measuring the result), or text files (a file, or a folder of `*.txt`).
It is tokenized, joined with end-of-text tokens, and cut into `n_blocks` non-overlapping blocks of
`block_len` tokens (the model's context by default); text shorter than one block is refused.

Layer by layer, as GPTQ does: the quantizable linears are grouped by their transformer block (the
name up to its first numeric part, `layers.3.` or `h.0.`); for block i, one pass of the calibration
blocks through the model - whose blocks < i are already quantized - records the inputs of block
i's linears with forward hooks, then those linears are quantized. So each layer is fitted to the
inputs it will see downstream of the quantized layers before it. Within a block, the linears all
see the inputs of the full-precision block (its attention output projection is fitted to the
attention of unquantized q, k, v): one pass per block instead of one per linear. Layers outside a
numbered block come last. Each pass runs the whole model (simple, model-agnostic, and affordable at
our sizes: n_layer passes over the calibration set).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from scratchlm.errors import UserError
from scratchlm.eval.suite import heldout_texts
from scratchlm.tokenizer import Tokenizer


def calibration_texts(source: str | Path) -> list[str]:
    """A prepared data folder's training texts, or the text of a file or of a folder's *.txt files."""
    src = Path(source)
    if (src / "manifest.json").is_file():
        return heldout_texts(src)[1]
    if src.is_file():
        return [src.read_text(encoding="utf-8", errors="replace")]
    if src.is_dir():
        files = sorted(src.rglob("*.txt"))
        if files:
            return [f.read_text(encoding="utf-8", errors="replace") for f in files]
    raise UserError(f"--calib {source}: neither a prepared data folder, a text file, nor a folder of .txt files",
                    fix="pass a folder made by `scratchlm data prepare`, or a text file")


def calibration_blocks(tok: Tokenizer, texts: list[str], block_len: int, n_blocks: int, source: str = "calibration"
                       ) -> torch.Tensor:
    """Texts -> up to `n_blocks` non-overlapping token blocks (n, block_len), evenly spread over the text."""
    ids: list[int] = []
    for t in texts:
        ids += tok.encode_ordinary(t) + ([tok.eot_id] if tok.eot_id is not None else [])
    available = len(ids) // block_len
    if available < 1:
        raise UserError(f"{source}: {len(ids)} tokens of calibration text, shorter than one block of {block_len}",
                        fix=f"give at least {block_len} tokens of text (more is better: {n_blocks} blocks by default)")
    picks = torch.linspace(0, available - 1, min(n_blocks, available)).round().long().unique()
    t = torch.tensor(ids[: available * block_len], dtype=torch.long).view(available, block_len)
    return t[picks]


@dataclass
class LayerInputs:
    """What a layer's forward hook saw: the sum of x xᵀ (in, in) float64, the number of rows, and a
    sample of rows (at most `max_rows`, evenly strided; only when `keep_rows`)."""

    h_sum: torch.Tensor
    n: int = 0
    rows: list[torch.Tensor] = field(default_factory=list)

    @property
    def hessian(self) -> torch.Tensor:
        """H = 2 XᵀX / n, float64 (in, in)."""
        return 2.0 * self.h_sum / max(self.n, 1)

    @property
    def x(self) -> torch.Tensor:
        return torch.cat(self.rows)


def block_of(name: str) -> str:
    """`layers.3.attention.wq` -> `layers.3`; a name outside a numbered block -> ''."""
    m = re.match(r"(.*?\.\d+)\.", name)
    return m.group(1) if m else ""


def record_inputs(model: nn.Module, names: list[str], blocks: torch.Tensor, *, keep_rows: bool = False,
                  max_rows: int = 4096, batch: int = 8) -> dict[str, LayerInputs]:
    """Run the calibration blocks (n, T) through `model`, recording the inputs of the named layers."""
    stride = max(1, -(-blocks.numel() // max_rows))  # keep every stride-th token's input
    stats: dict[str, LayerInputs] = {}
    handles = []

    def hook(name: str):
        def fn(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            x = args[0].detach().reshape(-1, args[0].size(-1))  # (B*T, in)
            st = stats[name]
            st.h_sum += x.double().T @ x.double()
            st.n += x.size(0)
            if keep_rows:
                st.rows.append(x[::stride].float().cpu())
        return fn

    try:
        for name in names:
            layer = model.get_submodule(name)
            stats[name] = LayerInputs(torch.zeros(layer.in_features, layer.in_features, dtype=torch.float64))
            handles.append(layer.register_forward_hook(hook(name)))
        with torch.no_grad():
            for i in range(0, blocks.size(0), batch):
                model(blocks[i:i + batch])
    finally:
        for h in handles:
            h.remove()
    return stats


def quantize_sequentially(model: nn.Module, names: list[str], blocks: torch.Tensor,
                          quantize_layer: Callable[[str, nn.Linear, LayerInputs], nn.Module], *,
                          keep_rows: bool = False, log: Callable[[str], None] | None = None) -> None:
    """Replace each named linear by `quantize_layer(name, linear, its inputs)`, one transformer block
    at a time (see the module docstring)."""
    groups: dict[str, list[str]] = {}
    for name in names:
        groups.setdefault(block_of(name), []).append(name)
    order = [b for b in groups if b] + ([""] if "" in groups else [])
    for k, b in enumerate(order):
        stats = record_inputs(model, groups[b], blocks, keep_rows=keep_rows)
        for name in groups[b]:
            model.set_submodule(name, quantize_layer(name, model.get_submodule(name), stats[name]))
        if log:
            log(f"  block {k + 1}/{len(order)} ({b or 'other'}): {len(groups[b])} layers quantized")
