"""Pipeline parallelism over 2 processes (scratchlm/train/pipeline.py, gloo, started by torchrun):
one 1F1B step of a tiny Llama in 4 micro-batches gives the single-process loss and gradients.

Rank 0 runs the embedding and blocks 0-1, rank 1 blocks 2-3, the norm, the head and the loss. Two
references, both one process on the same batch:
- the same 4 micro-batches accumulated: the same sums in the same order, so float64 is equal to
  1e-12 (measured: 0.0), and fp32 with tied embeddings (whose halves are summed across the ranks,
  in another order) within 1e-6 of the gradient's scale (measured 7e-8);
- the whole batch at once (`model(idx, targets)`): within 1e-5 of the scale in both dtypes (measured
  1.6e-7 float64, 6.9e-7 fp32): RoPE and RMSNorm compute in fp32 even in a float64 model, so a
  batch of another size, whose matmuls sum in another order, can round differently there.
"""

from __future__ import annotations

import os
import subprocess
import sys

import torch

from scratchlm.train.pipeline import one_f_one_b, stage_blocks
from tests.train.pipeline_worker import CASES, MICRO_BATCHES, batch, make_model


def test_one_f_one_b_order_and_stage_split():
    assert one_f_one_b(0, 2, 3) == [("F", 0), ("F", 1), ("B", 0), ("F", 2), ("B", 1), ("B", 2)]
    assert one_f_one_b(1, 2, 3) == [("F", 0), ("B", 0), ("F", 1), ("B", 1), ("F", 2), ("B", 2)]
    assert [list(stage_blocks(5, s, 2)) for s in range(2)] == [[0, 1], [2, 3, 4]]


def test_two_process_pipeline_equals_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "tests.train.pipeline_worker", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for dtype, tied in CASES:
        key = (str(dtype), tied)
        for whole in (False, True):
            loss, ref = reference(dtype, tied, whole)
            tol = 1e-5 if whole else 1e-12 if dtype == torch.float64 else 1e-6
            assert ranks[0][key]["loss"] is None
            assert abs(ranks[1][key]["loss"] - loss) <= tol * max(1.0, abs(loss)), (key, whole)
            covered = set()
            for r in ranks:
                assert r[key]["stray"] == []  # a rank computes only its own stage's gradients
                for name, grad in r[key]["grads"].items():
                    assert (grad - ref[name]).abs().max().item() <= tol * ref[name].abs().max().item(), (key, name)
                    covered.add(name)
            assert covered == set(ref)  # every parameter belongs to a stage
    assert "tok_embeddings.weight" in ranks[0][str(torch.float32), True]["grads"]
    assert "tok_embeddings.weight" in ranks[1][str(torch.float32), True]["grads"]  # tied: on both ends


def reference(dtype: torch.dtype, tied: bool, whole: bool) -> tuple[float, dict[str, torch.Tensor]]:
    """One process: the batch's loss and gradients, from the whole batch or its micro-batches summed."""
    model = make_model(dtype, tied)
    idx, targets = batch()
    parts = [(idx, targets)] if whole else list(zip(idx.chunk(MICRO_BATCHES), targets.chunk(MICRO_BATCHES)))
    valid, total = (targets != -1).sum(), 0.0
    for x, y in parts:
        _, loss = model(x, y)
        loss = loss * ((y != -1).sum() / valid)
        loss.backward()
        total += loss.item()
    return total, {n: p.grad for n, p in model.named_parameters()}
