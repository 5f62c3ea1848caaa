"""Data and model parallel training on CPU (gloo, 2 processes started by torchrun, as a user would).

The invariant: N processes with `grad_accum` micro-batches over all ranks train exactly what one
process does with the same global batch, since the ranks read one global stream in turns and the
loss is weighted by the global count of valid targets. So 20 steps of DDP and of FSDP2 over 2
processes give the losses and the final weights of one process with 2-step accumulation, and a
run saved under one world size resumes under another on the same loss curve.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from scratchlm.cli import main
from scratchlm.config import TrainConfig
from scratchlm.errors import UserError
from scratchlm.train.distributed import Place, may_skip_parameters, parallel_kind
from scratchlm.train.loop import _accum_per_rank
from tests.helpers import tiny_model

STEPS = 20
RUN = ["--quiet", "--preset", "tiny", "--tokenizer.vocab_size=300", "--model.n_layer=2", "--model.n_head=2",
       "--model.n_embd=32", "--model.block_size=16", "--model.dropout=0", "--train.batch_size=4",
       f"--train.max_steps={STEPS}", "--train.grad_accum=2", "--train.warmup_steps=2", "--train.eval_interval=10",
       "--train.eval_iters=2", "--train.log_interval=1", "--train.ckpt_interval=10", "--train.keep_last=3",
       "--train.tensorboard=false", "--train.precision=fp32", "--train.threads=1", "--data.workers=1"]
# fp32 sums over 2 ranks in another order than over 2 micro-batches in one process: ~1e-7 per step
LOSS_TOL, WEIGHT_TOL = 1e-5, 2e-5


def torchrun(*argv: str, nproc: int = 2) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("RANK", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "scratchlm", *argv]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def losses(run: Path, key: str = "loss") -> dict[int, float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r[key] for r in records if key in r}


def assert_same_curve(run: Path, reference: Path, from_step: int = 1) -> None:
    for key in ("loss", "val_loss"):
        ours, ref = losses(run, key), losses(reference, key)
        steps = [s for s in ref if s >= from_step]
        assert steps and all(s in ours for s in steps), (key, sorted(ours))
        worst = max(abs(ours[s] - ref[s]) for s in steps)
        assert worst < LOSS_TOL, (key, worst)


def final_weights(run: Path) -> dict:
    return load_file(str(run / "ckpt" / f"step_{STEPS:07d}" / "model.safetensors"))


def rewind(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as if it had been stopped right after its checkpoint of `step`."""
    shutil.copytree(src, dst)
    for ckpt in (dst / "ckpt").glob("step_*"):
        if int(ckpt.name[len("step_"):]) > step:
            shutil.rmtree(ckpt)
    (dst / "ckpt" / "latest").write_text(f"step_{step:07d}\n")
    return dst


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """One process, 2 micro-batches per step: the reference; its data serves every run here."""
    root = tmp_path_factory.mktemp("dist")
    corpus = root / "corpus.txt"
    words = ["the", "cat", "sat", "on", "mat", "dog", "log", "zebra", "quickly", "jumped", "over", "lazy", "fox"]
    corpus.write_text("\n".join(" ".join(words[(i * k) % len(words)] for k in range(1, 9)) + f" {i}."
                                for i in range(400)) + "\n")
    assert main(["pretrain", str(corpus), "--out", str(root / "single"), *RUN]) == 0
    return root / "single"


@pytest.fixture(scope="module")
def fsdp_run(baseline) -> Path:
    out = baseline.parent / "fsdp"
    done = torchrun("pretrain", "--data", str(baseline / "data"), "--out", str(out), *RUN, "--train.parallel=fsdp")
    assert "fsdp over 2 processes" in done.stdout
    return out


def test_fsdp_over_two_processes_is_one_process_with_accumulation(baseline, fsdp_run):
    assert_same_curve(fsdp_run, baseline)
    ours, ref = final_weights(fsdp_run), final_weights(baseline)
    assert sorted(ours) == sorted(ref)  # the gathered checkpoint is the single-device format, tied weight once
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) < WEIGHT_TOL


def test_ddp_over_two_processes_is_one_process_with_accumulation(baseline):
    out = baseline.parent / "ddp"
    done = torchrun("pretrain", "--data", str(baseline / "data"), "--out", str(out), *RUN, "--train.parallel=ddp")
    assert "ddp over 2 processes" in done.stdout  # rank 0's header; rank 1 prints nothing
    assert done.stdout.count("done: 20 steps") == 1
    assert_same_curve(out, baseline)
    ours, ref = final_weights(out), final_weights(baseline)
    assert max((ours[k] - ref[k]).abs().max().item() for k in ref) < WEIGHT_TOL


def test_saved_by_two_processes_resumes_in_one(baseline, fsdp_run):
    run = rewind(fsdp_run, baseline.parent / "fsdp_to_one", 10)
    assert main(["pretrain", "--data", str(baseline / "data"), "--out", str(run), "--resume", *RUN]) == 0
    assert_same_curve(run, baseline, from_step=11)
    assert min(losses(run)) == 1  # the first ten steps' records were kept, the rest rewritten


def test_saved_by_one_process_resumes_in_two(baseline):
    run = rewind(baseline, baseline.parent / "one_to_fsdp", 10)
    torchrun("pretrain", "--data", str(baseline / "data"), "--out", str(run), "--resume", *RUN,
             "--train.parallel=fsdp")  # the optimizer's whole moments are sharded as they load
    assert_same_curve(run, baseline, from_step=11)


def test_parallel_settings_are_checked(capsys):
    assert parallel_kind("auto", Place()) == "none"
    assert parallel_kind("auto", Place(0, 2)) == "ddp"
    with pytest.raises(UserError, match="train.parallel=none but torchrun started 2 processes"):
        parallel_kind("none", Place(1, 2))
    assert parallel_kind("fsdp", Place()) == "none"  # not started by torchrun (a resume in one process): said
    assert "torchrun did not start this process" in capsys.readouterr().out
    t = TrainConfig(grad_accum=3)
    with pytest.raises(UserError, match=r"train.grad_accum=3 .* not divisible by the 2 processes"):
        _accum_per_rank(t, Place(0, 2), "ddp")
    assert _accum_per_rank(TrainConfig(grad_accum=4), Place(1, 2), "fsdp") == 2


MOE = dict(n_experts=4, n_active_experts=2, expert_hidden=16)
MLA = dict(MOE, kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6)


def _no_grad(model) -> set[str]:
    model.train()
    idx = torch.randint(0, 64, (2, 8))
    model(idx, idx)[1].backward()
    return {name for name, p in model.named_parameters() if p.grad is None}


def test_ddp_looks_for_unused_parameters_only_where_mtp_modules_can_be_skipped():
    """DDP's find_unused_parameters: fused experts always get a gradient; MTP modules may not."""
    moe = tiny_model(arch="moe", **MOE)
    assert not may_skip_parameters(moe) and not _no_grad(moe)
    assert not may_skip_parameters(tiny_model(arch="mla", **MLA))
    mtp = tiny_model(arch="mla", mtp_depth=1, mtp_loss_weight=0.0, **MLA)
    assert may_skip_parameters(mtp)
    assert _no_grad(mtp) and all(name.startswith("mtp.") for name in _no_grad(mtp))


def test_sft_over_two_processes_is_one_process_with_accumulation(baseline):
    sft = ["--quiet", "--sft.n_tasks=60", "--train.max_steps=4", "--train.batch_size=2", "--train.grad_accum=2",
           "--train.precision=fp32", "--train.threads=1", "--train.log_interval=1", "--train.tensorboard=false",
           "--train.eval_interval=4", "--train.eval_iters=1", "--sft.eval_max_new_tokens=4"]
    one, two = baseline.parent / "sft_one", baseline.parent / "sft_two"
    assert main(["sft", "--base", str(baseline), "--out", str(one), *sft]) == 0
    torchrun("sft", "--base", str(baseline), "--out", str(two), *sft, "--train.parallel=ddp")
    assert len(losses(one)) == 4
    assert_same_curve(two, one)


def test_a_one_process_run_set_to_ddp_trains_alone_and_says_so_once(tmp_path, capsys):
    run = [a for a in RUN if a != "--quiet" and not a.startswith("--train.max_steps")]
    assert main(["pretrain", "--out", str(tmp_path / "run"), *run, "--train.max_steps=2",
                 "--train.parallel=ddp"]) == 0
    assert capsys.readouterr().out.count("torchrun did not start this process") == 1
