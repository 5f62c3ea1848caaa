"""Data and model parallel training on PyTorch's own engine, applied to a model from outside.

    torchrun --nproc_per_node=2 -m scratchlm pretrain --train.parallel=ddp   # or fsdp; the same for sft

We write no distributed system of our own: torchrun starts the processes and sets RANK, WORLD_SIZE
and LOCAL_RANK; `init` joins them in a process group (NCCL on GPUs, gloo on CPUs); `parallelize`
takes a finished single-device model and applies, in this order (torchtitan's):

1. activation checkpointing of every k-th block (`memory.checkpoint_blocks`),
2. `torch.compile` of each block in place (`train.compile`),
3. data parallelism: `DistributedDataParallel` around the whole model (every rank holds all the
   weights and averages the gradients), or FSDP2 (`fully_shard` on each block, then on the root:
   each rank keeps 1/N of every weight, gradient and optimizer moment, and gathers a block's
   weights only while it runs).

Model files know nothing of this. What the loop needs to stay exact across ranks lives here:

- the step's loss is the mean over all ranks' valid targets, so each micro-batch is weighted by
  its share of the *global* count (`all_sum` of the counts, not a mean of per-rank means), and
  the backward is scaled by the world size because DDP and FSDP average gradients over ranks;
- the loader reads one global stream in turns (`scratchlm.data.loader`), so with `grad_accum`
  counting micro-batches over all ranks, a step sees the same batch whatever the world size;
- DDP skips the gradient all-reduce on all but a step's last micro-batch (`no_sync`);
- checkpoints stay single-device files: under FSDP every rank joins in gathering the full weights
  and optimizer moments (`full_weights`, `full_optimizer_state`), rank 0 writes them, and a
  resume under any world size loads them into the unsharded model before `parallelize` (the
  optimizer moments are re-sharded as they load), so save with 2 processes and resume with 1, or
  the reverse. This is the gathered-state-dict route, right for models that fit one process's
  memory; larger ones would save shards with `torch.distributed.checkpoint`;
- one process speaks (rank 0 prints, logs and writes); the others' stdout goes to /dev/null;
- `shutdown` waits at a barrier before destroying the group (FSDP2 on gloo aborts without one).
"""

from __future__ import annotations

import contextlib
import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel

from scratchlm.config import TrainConfig
from scratchlm.errors import UserError
from scratchlm.train.device import pick_device
from scratchlm.train.memory import checkpoint_blocks


@dataclass(frozen=True)
class Place:
    """This process's place among the ones torchrun started (one process without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def place() -> Place:
    """From torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK); rank 0 of 1 without it."""
    env = os.environ
    if "RANK" not in env or "WORLD_SIZE" not in env:
        return Place()
    try:
        return Place(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", "0")))
    except ValueError:
        raise UserError(f"RANK={env['RANK']!r}, WORLD_SIZE={env['WORLD_SIZE']!r} are not integers",
                        fix="launch with torchrun, which sets them") from None


def launched() -> bool:
    """Whether torchrun (or another launcher setting RANK/WORLD_SIZE) started this process."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def init(device: torch.device) -> Place:
    """Join the process group torchrun set up (once per process); quiet the other ranks' stdout."""
    here = place()
    if launched() and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        if not here.main:
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the life of the process
    return here


def join(device_setting: str) -> tuple[Place, torch.device]:
    """This process's place and device (under torchrun a GPU run takes cuda:LOCAL_RANK), in the
    process group. Stages call it before anything rank 0 alone must do first (`main_first`)."""
    device = pick_device(device_setting)
    if device.type == "cuda" and launched():
        device = torch.device("cuda", place().local_rank)  # one GPU per process
    return init(device), device


@contextlib.contextmanager
def main_first(here: Place):
    """Rank 0 runs the block (preparing the run's data, say) while the others wait; then they run it
    (to read what rank 0 made)."""
    if not here.main:
        dist.barrier()
    yield
    if here.main and dist.is_initialized():
        dist.barrier()


def shutdown() -> None:
    """Leave the process group, after a barrier so no rank tears it down under another's feet."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def parallel_kind(setting: str, here: Place) -> str:
    """`train.parallel` resolved: auto is ddp when several processes run, else none."""
    if setting == "auto":
        return "ddp" if here.world_size > 1 else "none"
    if setting == "none" and here.world_size > 1:
        raise UserError(f"train.parallel=none but torchrun started {here.world_size} processes: each would train "
                        "its own copy", fix="use --train.parallel=ddp or fsdp (or auto)")
    if setting in ("ddp", "fsdp") and not launched():  # e.g. a run saved under torchrun, resumed in one process
        print(f"note: train.parallel={setting}, but torchrun did not start this process: training in one process "
              f"(launch with torchrun --nproc_per_node=N -m scratchlm ... for {setting})", flush=True)
        return "none"
    return setting


class Parallel:
    """A model made ready for (data-parallel) training: `module` runs the forward passes, and the
    loop asks this object how ranks agree on counts, losses, stops and checkpoints."""

    def __init__(self, model: nn.Module, module: nn.Module, kind: str, here: Place) -> None:
        self.model, self.module, self.kind, self.place = model, module, kind, here

    @property
    def world_size(self) -> int:
        return self.place.world_size if self.kind != "none" else 1

    def no_sync(self, last: bool) -> contextlib.AbstractContextManager:
        """Around one micro-batch's backward: DDP reduces gradients only on a step's last one.
        (FSDP2 reduce-scatters every micro-batch: exact, and the sharded gradients stay small.)"""
        if self.kind == "ddp" and not last:
            return self.module.no_sync()
        return contextlib.nullcontext()

    def all_sum(self, values: list[float]) -> list[float]:
        """Each value summed over the ranks (float64, so counts stay exact)."""
        if self.world_size == 1:
            return values
        t = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(t)
        return t.tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is true on one (a Ctrl-C that reached only some ranks)."""
        return self.all_sum([float(flag)])[0] > 0

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def all_max(value: float) -> float:
    """The largest of the ranks' values (the value itself in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def prepare_blocks(model: nn.Module, t: TrainConfig) -> None:
    """Steps 1 and 2 of `parallelize`: activation checkpointing, then compile, each block in place."""
    if t.activation_checkpointing:
        checkpoint_blocks(model, t.activation_checkpointing)
    if t.compile:
        for block in model.blocks:
            if not getattr(block, "_scratchlm_compiled", False):
                block.compile()  # in place: the weights keep their names
                block._scratchlm_compiled = True


def may_skip_parameters(model: nn.Module) -> bool:
    """Whether a step may leave some parameters without a gradient, which DDP must be told
    (`find_unused_parameters`). Only an arch=mla model's MTP modules (`model.mtp`, mtp_depth > 0) can:
    they get none when mtp_loss_weight is 0 or a batch is packed (a doc_mask). A mixture of experts'
    fused expert weights get a gradient every step, whatever the routing."""
    return bool(getattr(model, "mtp", None))


def parallelize(model: nn.Module, t: TrainConfig, here: Place, device: torch.device, kind: str) -> Parallel:
    """Apply activation checkpointing, compile and data parallelism (`kind`, from `parallel_kind`) to a
    built model (see the module docstring for the order). The model is changed in place; DDP also wraps it."""
    prepare_blocks(model, t)  # done once: a second call finds the blocks already prepared
    if kind == "fsdp":
        mesh = dist.device_mesh.init_device_mesh(device.type, (here.world_size,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return Parallel(model, model, kind, here)
    if kind == "ddp":
        module = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                         find_unused_parameters=may_skip_parameters(model))
        return Parallel(model, module, kind, here)
    return Parallel(model, model, kind, here)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A tensor whole on this rank: an FSDP shard is gathered from all ranks (a collective)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor whole and on the CPU (every rank must call this).
    Tied weights (one parameter under two names) map to one tensor, so they are written once."""
    ids = {name: id(p) for name, p in model.named_parameters(remove_duplicate=False)}
    whole: dict[int, torch.Tensor] = {}
    out: dict[str, torch.Tensor] = {}
    for name, t in model.state_dict().items():
        key = ids.get(name, id(t))
        if key not in whole:
            whole[key] = _full(t).detach().cpu()
        out[name] = whole[key]
    return out


def full_optimizer_state(optimizer: torch.optim.Optimizer) -> dict:
    """`optimizer.state_dict()` with every moment whole and on the CPU: what one process's optimizer
    would hold (every rank must call this)."""
    sd = optimizer.state_dict()
    state = {pid: {k: _full(v).detach().cpu() if torch.is_tensor(v) else v for k, v in st.items()}
             for pid, st in sd["state"].items()}
    return {"state": state, "param_groups": sd["param_groups"]}


def full_grad_norm(norm: torch.Tensor) -> torch.Tensor:
    """The global gradient norm `clip_grad_norm_` returned, whole (under FSDP it is a DTensor)."""
    return _full(norm)
