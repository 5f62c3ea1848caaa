"""Pipeline parallelism for real: a Llama cut into stages, one process each, 1F1B over micro-batches.

Each of the P processes (torchrun, gloo on CPU) keeps the whole model object, built identically,
but runs only its stage: stage 0 the token embedding and the first blocks, the last stage the last
blocks, the final norm, the head and the loss; the blocks are shared out as evenly as they go. A
batch is cut into M micro-batches; each stage runs them in 1F1B order (P-1-s warm-up forwards,
then a forward and a backward in turn, then the remaining backwards: the order
scratchlm/experiments/pipeline.py simulates). Activations go down the pipe with send/recv, their
gradients come back up, and each rank's parameters collect the gradients of its stage.

The loss is the batch's: each micro-batch's mean cross-entropy weighted by its share of the batch's
valid targets, so after one step the loss (on the last rank) and every parameter's gradient (on the
rank that owns it) equal one process accumulating the same micro-batches (float64: exactly), and its
whole-batch `model(idx, targets)` backward up to fp32 rounding (tests/train/test_pipeline.py). Tied
embeddings live on the first and last stage: their two gradient halves are summed across ranks.

Left out: more than one stage per rank (interleaving), sends overlapped with compute beyond isend,
the optimizer step (each rank would step its own parameters), families other than Llama.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from scratchlm.errors import UserError
from scratchlm.losses import fusable_head, linear_cross_entropy


def one_f_one_b(stage: int, stages: int, micro_batches: int) -> list[tuple[str, int]]:
    """The passes of `stage` in 1F1B order: ("F", m) forward, ("B", m) backward of micro-batch m."""
    warm = min(stages - 1 - stage, micro_batches)
    order = [("F", m) for m in range(warm)]
    for k in range(micro_batches - warm):
        order += [("F", warm + k), ("B", k)]
    return order + [("B", m) for m in range(micro_batches - warm, micro_batches)]


def stage_blocks(n_layer: int, stage: int, stages: int) -> range:
    """The block indices of `stage`: contiguous, as even as they go."""
    return range(n_layer * stage // stages, n_layer * (stage + 1) // stages)


def stage_parameters(model: nn.Module, stage: int, stages: int) -> list[nn.Parameter]:
    """The parameters `stage` runs (a tied embedding on the first and last stage both)."""
    mods: list[nn.Module] = [model.layers[i] for i in stage_blocks(len(model.layers), stage, stages)]
    if stage == 0:
        mods.append(model.tok_embeddings)
    if stage == stages - 1:
        mods += [model.norm, model.output]
    seen: dict[int, nn.Parameter] = {}
    for m in mods:
        for p in m.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def stage_forward(model: nn.Module, stage: int, stages: int, x: torch.Tensor, targets: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """Stage 0 takes token ids (b, T), the others hidden states (b, T, C); the last returns the mean
    loss over `targets`, the others hidden states (b, T, C). The computation is the model's forward."""
    positions = torch.arange(x.size(1), device=x.device)[None]  # (1, T)
    if stage == 0:
        x = model.tok_embeddings(x)  # (b, T, C)
    for i in stage_blocks(len(model.layers), stage, stages):
        x = model.layers[i](x, model.rope, positions, i, None, None)
    if stage < stages - 1:
        return x
    assert targets is not None
    x = model.norm(x)
    if fusable_head(model.output):
        return linear_cross_entropy(x, model.output.weight, targets)
    logits = model.output(x)
    return F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets.reshape(-1), ignore_index=-1)


def pipeline_step(model: nn.Module, idx: torch.Tensor, targets: torch.Tensor, micro_batches: int) -> float | None:
    """Forward and backward of one batch (idx, targets: (B, T), the same on every rank) through the
    pipeline of all ranks of the default process group, in `micro_batches` micro-batches. Gradients
    accumulate in this rank's stage parameters. Returns the batch's loss on the last rank, else None."""
    if not hasattr(model, "layers") or getattr(model, "rope", None) is None:
        raise UserError("the pipeline runs Llama-family models", fix="use --model.arch=llama")
    stage, stages = dist.get_rank(), dist.get_world_size()
    if len(model.layers) < stages or idx.size(0) % micro_batches:
        raise UserError(f"{len(model.layers)} blocks, a batch of {idx.size(0)} and {micro_batches} micro-batches do "
                        f"not split over {stages} stages", fix="use >= 1 block per stage and a batch that M divides")
    xs, ys = idx.chunk(micro_batches), targets.chunk(micro_batches)
    valid = (targets != -1).sum()
    dtype = next(model.parameters()).dtype
    shape = (idx.size(0) // micro_batches, idx.size(1), model.tok_embeddings.embedding_dim)  # (b, T, C)
    inputs: dict[int, torch.Tensor] = {}  # micro-batch -> this stage's input (it needs its gradient)
    outputs: dict[int, torch.Tensor] = {}  # micro-batch -> output (hidden states, or the weighted loss)
    sends: list[dist.Work] = []  # isend, so a rank sending down while its neighbour sends up never blocks
    total = 0.0
    for kind, m in one_f_one_b(stage, stages, micro_batches):
        if kind == "F":
            if stage == 0:
                x = xs[m]
            else:
                x = torch.empty(shape, dtype=dtype)
                dist.recv(x, stage - 1)
                x.requires_grad_(True)
            inputs[m] = x
            out = stage_forward(model, stage, stages, x, ys[m])
            if stage == stages - 1:
                out = out * ((ys[m] != -1).sum() / valid)  # this micro-batch's share of the batch mean
                total += out.item()
            else:
                sends.append(dist.isend(out.detach().contiguous(), stage + 1))
            outputs[m] = out
        else:
            out = outputs.pop(m)
            if stage == stages - 1:
                out.backward()
            else:
                grad = torch.empty(shape, dtype=dtype)
                dist.recv(grad, stage + 1)
                out.backward(grad)
            x = inputs.pop(m)
            if stage > 0:
                sends.append(dist.isend(x.grad.contiguous(), stage - 1))
    for work in sends:
        work.wait()
    if model.output.weight is model.tok_embeddings.weight:  # tied: the first and last stage each hold a part
        w = model.output.weight
        grad = w.grad if w.grad is not None else torch.zeros_like(w)
        dist.all_reduce(grad)
        w.grad = grad
    return total if stage == stages - 1 else None
