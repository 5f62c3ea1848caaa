"""Run by test_pipeline.py under torchrun (`python -m tests.train.pipeline_worker OUT`): one pipelined
forward + backward of a tiny Llama on every rank; each saves its loss and its stage's gradients."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from scratchlm.model import build_model
from scratchlm.train.pipeline import pipeline_step, stage_parameters
from tests.helpers import tiny_config

CASES = [(torch.float64, False), (torch.float32, True)]  # (dtype, tied embeddings)
MICRO_BATCHES = 4


def make_model(dtype: torch.dtype, tied: bool) -> nn.Module:
    torch.manual_seed(0)
    cfg = tiny_config("llama", vocab_size=64, n_layer=4, block_size=16, dropout=0.0, tie_embeddings=tied)
    return build_model(cfg).to(dtype)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    """(8, 16) ids and targets; some targets ignored, so the micro-batches' shares of the mean differ."""
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 64, (8, 16), generator=g), torch.randint(0, 64, (8, 16), generator=g)
    targets[0, :5] = -1
    targets[5, 3:] = -1
    return idx, targets


def main(out: Path) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    for dtype, tied in CASES:
        model = make_model(dtype, tied)
        loss = pipeline_step(model, *batch(), micro_batches=MICRO_BATCHES)
        names = {id(p): n for n, p in model.named_parameters()}
        owned = {names[id(p)]: p.grad for p in stage_parameters(model, rank, world)}
        others = [n for n, p in model.named_parameters() if n not in owned and p.grad is not None]
        results[str(dtype), tied] = {"loss": loss, "grads": owned, "stray": others}
    torch.save(results, out / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
