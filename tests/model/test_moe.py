"""Mixture-of-experts: router losses by hand, grouped matmuls, the layer against a per-token
reference, capacity dropping, hybrid layouts, balancing bias, and bad settings."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import ModelConfig
from scratchlm.errors import UserError
from scratchlm.losses import load_balancing_loss, router_z_loss, routing_entropy
from scratchlm.model import build_model
from scratchlm.model.moe import MoE, MoELayer, grouped_mm, swiglu


def cfg(**kw) -> ModelConfig:
    base = dict(arch="moe", vocab_size=64, block_size=16, n_layer=2, n_head=2, n_kv_head=1, n_embd=32, bias=False,
                n_experts=4, n_active_experts=2)
    base.update(kw)
    return ModelConfig(**base)


def test_load_balancing_loss_by_hand():
    # 2 tokens, 2 experts, top-1. Token 0 -> expert 0 (p = .9, .1); token 1 -> expert 0 (p = .6, .4).
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    experts = torch.tensor([[0], [0]])
    # f = (1, 0), P = (.75, .25): 2 * (1 * .75 + 0 * .25) = 1.5
    assert load_balancing_loss(probs, experts, 2).item() == pytest.approx(1.5)
    uniform = torch.full((4, 2), 0.5)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [0], [1]]), 2).item() == pytest.approx(1.0)


def test_z_loss_and_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    # logsumexp: ln 2 and ln 4 -> mean of squares
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2)
    assert routing_entropy(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(math.log(2))
    assert routing_entropy(torch.tensor([[1.0, 0.0]])).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("C, H", [(8, 4), (6, 3)])  # the grouped kernel; the loop it falls back to
def test_grouped_mm_equals_per_group_matmuls_forward_and_backward(C, H):
    torch.manual_seed(0)
    counts = torch.tensor([3, 0, 5, 2])
    x = torch.randn(10, C, requires_grad=True)
    w = torch.randn(4, C, H, requires_grad=True)
    y = grouped_mm(x, w, counts)
    bounds = [0, 3, 3, 8, 10]
    ref = torch.cat([x[bounds[g] : bounds[g + 1]] @ w[g] for g in range(4)])
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(gx, rx)
    torch.testing.assert_close(gw, rw)


def reference_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token: sum over the chosen experts of weight * SwiGLU expert(x)."""
    x_NC = x.reshape(-1, x.size(-1))
    weights, experts, _, _ = layer.route(x_NC)
    out = torch.zeros_like(x_NC)
    for n in range(x_NC.size(0)):
        for w, e in zip(weights[n], experts[n]):
            gate, up = (x_NC[n] @ layer.w13_EC2H[e]).chunk(2)
            h = F.silu(gate) * up
            out[n] += w * (h @ layer.w2_EHC[e])
    if layer.shared is not None:
        out += layer.shared(x_NC)
    return out.view_as(x)


@pytest.mark.parametrize("kw", [{}, {"router": "sigmoid"}, {"n_shared_experts": 1}, {"router_norm_topk": False},
                                {"n_active_experts": 1}])
def test_layer_equals_token_by_token_reference(kw):
    torch.manual_seed(0)
    model = MoE(cfg(**kw))
    layer = model.layers[0].feed_forward
    x = torch.randn(2, 7, 32)
    torch.testing.assert_close(layer(x), reference_moe(layer, x), atol=1e-5, rtol=1e-5)


def test_capacity_drops_overflow_and_reports_it():
    torch.manual_seed(0)
    layer = MoE(cfg(dropless=False, capacity_factor=0.5)).layers[0].feed_forward
    with torch.no_grad():  # send every token to experts 0 and 1
        layer.gate.weight.zero_()
        layer.gate.weight[0] += 1.0
        layer.gate.weight[1] += 0.5
    x = torch.ones(1, 16, 32)
    layer(x)
    cap = math.ceil(0.5 * 16 * 2 / 4)  # 4 slots per expert
    assert layer.stats["kept"].tolist() == [cap, cap, 0, 0]
    assert layer.stats["dropped"] == pytest.approx(1 - 2 * cap / 32)


def test_hybrid_layout_and_active_parameters():
    model = MoE(cfg(n_layer=5, moe_first_dense=1, moe_every=2))
    assert [i for i, _ in model.moe_layers()] == [1, 3]
    dense = build_model(replace(cfg(n_layer=5), arch="llama"))
    # experts are half the dense FFN and top-2: the active parameters match the dense model's,
    # plus the routers (2 layers x E x C).
    assert model.active_params() == dense.num_params() + 2 * 4 * 32


def test_training_step_and_balancing_bias():
    torch.manual_seed(0)
    model = MoE(cfg(router="sigmoid"))
    idx, targets = torch.randint(0, 64, (2, 4, 16))
    _, loss = model(idx, targets)
    loss.backward()
    layer = model.layers[0].feed_forward
    assert layer.w13_EC2H.grad is not None and layer.gate.weight.grad is not None
    load = layer.stats["load"]
    model.after_optimizer_step()
    bias = layer.select_bias
    assert torch.all(bias[load > load.mean()] < 0) and torch.all(bias[load < load.mean()] > 0)
    metrics = model.routing_metrics()
    assert metrics["moe/layer_0/balance"] >= 1.0 and "moe/layer_1/load_3" in metrics


@pytest.mark.parametrize("kw, message", [
    ({"n_active_experts": 5}, "n_active_experts=5 must be between 1 and model.n_experts=4"),
    ({"dropless": False, "capacity_factor": 0.0}, "capacity_factor=0.0 must be > 0"),
    ({"n_shared_experts": 9}, "n_shared_experts=9"),
    ({"router": "hash"}, "model.router"),
    ({"moe_first_dense": 2}, "leave no MoE layer"),
])
def test_bad_moe_settings(kw, message):
    with pytest.raises(UserError, match=message):
        MoE(cfg(**kw))


def test_swiglu_and_its_hand_written_backward_match_autograd():
    torch.manual_seed(0)
    h = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h,))
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(h), F.silu(gate) * up)
