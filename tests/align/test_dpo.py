"""DPO's invariants on tiny random models: the loss at step 0 (policy == reference), gradient
accumulation 1x8 == 8x1 through the loop's forward_backward, packed pairs == padded pairs, the LoRA
reference (the base with adapters disabled, no second copy), what trains and what stays, and the
stage end to end on a tiny SFT run (summary, answers, PNG, adapters)."""

from __future__ import annotations

import contextlib
import json
import math
import random

import pytest
import torch

from scratchlm.align.data import TokenizedPair, read_pairs
from scratchlm.align.dpo import DPOLoader, DPOObjective, dpo, response_logprobs
from scratchlm.checkpoint import ADAPTER_TENSORS
from scratchlm.config import Config, get_preset, model_config
from scratchlm.losses import sequence_logprobs
from scratchlm.model import build_model
from scratchlm.model.layers import DocumentMask
from scratchlm.model.lora import adapters_disabled, apply_lora, default_targets
from scratchlm.train.loop import forward_backward
from scratchlm.train.objective import count_examples
from tests.helpers import tiny_llama_base, tiny_sft_run

V, BLOCK = 64, 24


def tiny(arch: str = "llama", seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    kw = dict(n_kv_head=1) if arch == "llama" else {}
    torch.manual_seed(seed)
    cfg = model_config(arch=arch, vocab_size=V, block_size=BLOCK, n_layer=2, n_head=2, n_embd=32, bias=False,
                       dropout=0.0, **kw)
    return build_model(cfg).to(dtype)


def fake_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    """n pairs of random tokens: a shared prompt (labels -1), then two different responses."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [rng.randrange(V) for _ in range(rng.randint(2, 8))]
        sides = []
        for _ in range(2):
            resp = [rng.randrange(V) for _ in range(rng.randint(1, 10))]
            sides += [prompt + resp, [-1] * len(prompt) + resp]
        out.append(TokenizedPair(*sides, {}))
    return out


def batch(pairs: list[TokenizedPair], **kw) -> tuple[torch.Tensor, ...]:
    return DPOLoader(pairs, len(pairs), shuffle=False, fill=False, block_size=BLOCK, **kw).next_batch()


def perturb(model: torch.nn.Module, scale: float = 0.05, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * scale)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("loss,beta,expected", [("sigmoid", 0.1, math.log(2)), ("ipo", 0.5, 1 / (4 * 0.5**2))])
def test_step_zero_loss_is_log2_and_ipo_one_over_four_beta_squared(loss, beta, expected, lora):
    model = tiny()
    if lora:
        apply_lora(model, default_targets(model), r=4)
    objective = DPOObjective(model, beta=beta, loss=loss).train()  # dropout is 0: train mode changes nothing
    x, y = batch(fake_pairs(6))
    _, value = objective(x, y)
    assert value.item() == pytest.approx(expected, abs=1e-6)
    metrics = objective.metrics()
    assert metrics["margin"] == 0 and metrics["accuracy"] == 0  # ties count as wrong
    assert metrics["logp_chosen"] < 0 and metrics["logp_rejected"] < 0


def test_rpo_adds_the_chosen_answers_mean_token_nll():
    model = tiny()
    x, y = batch(fake_pairs(6))
    _, value = DPOObjective(model, beta=0.1, rpo_alpha=0.5).train()(x, y)
    with torch.no_grad():
        nll = -sequence_logprobs(model(x)[0][0::2], y[0::2], average=True).mean()
    assert value.item() == pytest.approx(math.log(2) + 0.5 * nll.item(), abs=1e-6)


def test_response_logprobs_per_row_and_per_packed_document():
    torch.manual_seed(0)
    logits, targets = torch.randn(3, 7, 11, dtype=torch.float64), torch.randint(0, 11, (3, 7))
    targets[:, :2] = -1
    targets[1, 5:] = -1
    assert torch.equal(response_logprobs(logits, targets), sequence_logprobs(logits, targets))
    assert torch.allclose(response_logprobs(logits, targets, average=True),
                          sequence_logprobs(logits, targets, average=True))
    two = targets.clone()
    two[0, 4] = -1  # row 0 now holds two responses: [2, 4) and [5, 7)
    per = sequence_logprobs(logits[[0, 0]], torch.stack([torch.where(torch.arange(7) < 4, two[0], -1),
                                                 torch.where(torch.arange(7) > 4, two[0], -1)]))
    got = response_logprobs(logits, two)
    assert got.shape == (4,) and torch.allclose(got[:2], per) and torch.allclose(got[2:], response_logprobs(
        logits[1:], targets[1:]))


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_packed_pairs_equal_padded_pairs(loss):
    pairs = fake_pairs(7, seed=3)
    model = tiny(dtype=torch.float64)
    objective = DPOObjective(model, beta=0.2, loss=loss).eval()
    perturb(model)  # the policy moves off the reference: margins are not all zero
    x, y = batch(pairs)
    xp, yp, docs = batch(pairs, packing=True)
    assert xp.size(0) < x.size(0) // 2  # several pairs share a row
    assert objective.count(y) == objective.count(yp) == 7
    out, policy = objective.score(x, y)
    out_p, policy_p = objective.score(xp, yp, DocumentMask(docs))
    assert torch.allclose(policy, policy_p, atol=1e-10, rtol=0)
    assert torch.allclose(out.losses, out_p.losses, atol=1e-10, rtol=0)
    assert out.margins.abs().min() > 0


@pytest.mark.parametrize("lora,rpo_alpha", [(False, 0.0), (True, 0.0), (False, 1.0)])
def test_gradient_accumulation_1x8_equals_8x1(lora, rpo_alpha):
    pairs = fake_pairs(8, seed=5)
    grads = []
    for micro in ([pairs], [[p] for p in pairs]):
        model = tiny(dtype=torch.float64)
        if lora:
            apply_lora(model, default_targets(model), r=4)
        objective = DPOObjective(model, beta=0.1, rpo_alpha=rpo_alpha).train()
        perturb(model)
        batches = [batch(m) for m in micro]
        loss = forward_backward(objective, batches, contextlib.nullcontext(), None,
                                [count_examples(objective, b[1]) for b in batches])
        grads.append((loss, {n: p.grad.clone() for n, p in objective.named_parameters() if p.grad is not None}))
    (loss_1, g_1), (loss_8, g_8) = grads
    assert loss_1.item() == pytest.approx(loss_8.item(), abs=1e-12)
    assert g_1.keys() == g_8.keys() and g_1 and all(n.startswith("network.") for n in g_1)
    for n in g_1:
        assert torch.allclose(g_1[n], g_8[n], atol=1e-12, rtol=0), n


def test_lora_reference_is_the_base_with_adapters_disabled_and_no_copy():
    base = tiny(dtype=torch.float64)
    model = tiny(dtype=torch.float64)
    apply_lora(model, default_targets(model), r=4)
    objective = DPOObjective(model).train()
    assert objective.reference is None
    assert sum(p.numel() for p in objective.parameters()) == sum(p.numel() for p in model.parameters())
    full = DPOObjective(tiny())
    assert sum(p.numel() for p in full.parameters()) == 2 * sum(p.numel() for p in full.network.parameters())
    perturb(model)  # the adapters train away from zero
    x, y = batch(fake_pairs(5, seed=2))
    ref = objective.reference_logprobs(x, y)
    with torch.no_grad():
        assert torch.equal(ref, response_logprobs(base(x)[0], y))
        assert not torch.allclose(ref, response_logprobs(model(x)[0], y))
        with adapters_disabled(model):
            assert torch.equal(ref, response_logprobs(model(x)[0], y))
    assert model.training  # the reference's eval mode did not stick


@pytest.mark.parametrize("lora", [False, True])
def test_every_trained_parameter_changes_and_the_reference_does_not(lora):
    model = tiny()
    if lora:
        apply_lora(model, default_targets(model), r=4)
    objective = DPOObjective(model, beta=0.1).train()
    frozen = {n: p.detach().clone() for n, p in objective.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in objective.named_parameters() if p.requires_grad}
    assert trained and frozen
    assert all(n.startswith("reference.") for n in frozen) != lora
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    loader = DPOLoader(fake_pairs(12, seed=7), 4)
    for _ in range(3):
        x, y = loader.next_batch()
        forward_backward(objective, [(x, y)], contextlib.nullcontext(), None, [objective.count(y)])
        opt.step()
        opt.zero_grad(set_to_none=True)
    params = dict(objective.named_parameters())
    assert [n for n, v in trained.items() if torch.equal(params[n], v)] == []
    assert [n for n, v in frozen.items() if not torch.equal(params[n], v)] == []


def test_loader_resumes_where_it_stopped():
    pairs = fake_pairs(10, seed=1)
    a = DPOLoader(pairs, 3, seed=4)
    for _ in range(5):
        a.next_batch()
    b = DPOLoader(pairs, 3, seed=4)
    b.load_state_dict(a.state_dict())
    for _ in range(4):
        assert all(torch.equal(u, v) for u, v in zip(a.next_batch(), b.next_batch()))


# -- the stage end to end -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("dpo")
    return tiny_sft_run(root, tiny_llama_base(root, 96, pad_vocab_to=1), 2)


def dpo_cfg(base, out, **sft_kw) -> Config:
    cfg = get_preset("sft-tiny")
    cfg.out_dir, cfg.pref.base, cfg.pref.kind, cfg.pref.n_prompts = str(out), str(base), "corrupted", 40
    cfg.dpo.eval_prompts, cfg.dpo.eval_max_new_tokens = 10, 3
    t = cfg.train
    t.max_steps, t.batch_size, t.eval_interval, t.eval_iters, t.tensorboard, t.precision = 3, 4, 3, 1, False, "fp32"
    t.log_interval = 1
    for k, v in sft_kw.items():
        setattr(cfg.sft, k, v)
    return cfg


@pytest.mark.parametrize("lora", [False, True])
def test_dpo_stage_writes_summary_answers_and_png(sft_run, tmp_path, lora):
    out = tmp_path / "dpo"
    result = dpo(dpo_cfg(sft_run, out, **(dict(lora_r=2) if lora else {})), progress=False)
    assert set(result.scores) == {"sft", "dpo"} and result.scores["dpo"]["all"]["n"] == 10
    assert 0 <= result.heldout["accuracy"] <= 1 and result.heldout["n"] == 4  # 10% of 40 prompts
    summary = json.loads((out / "eval" / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["heldout"] == result.heldout
    assert "held-out implicit-reward accuracy" in (out / "eval" / "summary.md").read_text()
    for name in ("sft", "dpo"):
        rows = [json.loads(r) for r in (out / "eval" / f"answers_{name}.jsonl").read_text().splitlines()]
        assert len(rows) == 10 and all("checked" in r for r in rows)
    assert (out / "dpo.png").stat().st_size > 0
    logged = [json.loads(r) for r in (out / "metrics.jsonl").read_text().splitlines()]
    keys = {"margin", "accuracy", "reward_chosen", "reward_rejected", "logp_chosen", "logp_rejected"}
    assert keys <= set(logged[0]) and {f"val_{k}" for k in keys} <= set(logged[-1])
    assert (out / ADAPTER_TENSORS).exists() == lora
    back, _ = read_pairs([str(out / "pairs_train.jsonl")])
    assert [(p.prompt, p.chosen, p.rejected) for p in back] == [(p.prompt, p.chosen, p.rejected)
                                                                for p in result.train_pairs]
