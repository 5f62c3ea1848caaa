"""Mixture-of-experts: router losses by hand, grouped matmuls, the layer against a per-token
reference, capacity dropping, hybrid layouts, balancing bias, and bad settings."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.config import switch_arch
from scratchlm.errors import UserError
from scratchlm.losses import load_balancing_loss, router_z_loss, routing_entropy
from scratchlm.model import build_model
from scratchlm.model.moe import MoE, MoELayer, grouped_mm, swiglu
from tests.helpers import moe_cfg


def test_load_balancing_loss_by_hand():
    # 2 tokens, 2 experts, top-1. Token 0 -> expert 0 (p = .9, .1); token 1 -> expert 0 (p = .6, .4).
    probs = torch.tensor([[0.9, 0.1], [0.6, 0.4]])
    experts = torch.tensor([[0], [0]])
    # f = (1, 0), P = (.75, .25): 2 * (1 * .75 + 0 * .25) = 1.5
    assert load_balancing_loss(probs, experts, 2).item() == pytest.approx(1.5, rel=1e-6)  # fp32, a few terms
    uniform = torch.full((4, 2), 0.5)
    assert load_balancing_loss(uniform, torch.tensor([[0], [1], [0], [1]]), 2).item() == pytest.approx(1.0, rel=1e-6)


def test_z_loss_and_entropy_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0]])
    # logsumexp: ln 2 and ln 4 -> mean of squares
    assert router_z_loss(logits).item() == pytest.approx((math.log(2) ** 2 + math.log(4) ** 2) / 2, rel=1e-6)
    assert routing_entropy(torch.tensor([[0.5, 0.5]])).item() == pytest.approx(math.log(2), rel=1e-6)
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
    # fp32 sums of <= 8 products of order-1 values (values up to ~7): two kernels agree to ~1e-6.
    tol = dict(atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, ref, **tol)
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    rx, rw = torch.autograd.grad(ref, (x, w), g)
    torch.testing.assert_close(gx, rx, **tol)
    torch.testing.assert_close(gw, rw, **tol)


def reference_route(layer: MoELayer, x_NC: torch.Tensor) -> list[list[tuple[int, float]]]:
    """The routing by its definition, in float64, token by token, without the layer's `route`:
    softmax router: p = softmax(x Wᵀ), the k largest p, renormalised if norm_topk (Mixtral);
    sigmoid router: s = sigmoid(x Wᵀ), the k largest s + bias, weighted by s (never the bias),
    always renormalised (DeepSeek-V3). -> per token [(expert, weight)]."""
    logits = x_NC.double() @ layer.gate.weight.double().T  # (N, E)
    sigmoid = layer.router_kind == "sigmoid"
    scores = torch.sigmoid(logits) if sigmoid else torch.softmax(logits, -1)
    choice = scores + layer.select_bias.double() if sigmoid else scores
    routes = []
    for n in range(x_NC.size(0)):
        ranked = sorted(range(layer.n_experts), key=lambda e: -choice[n, e].item())
        if layer.k < layer.n_experts:  # no near-tie: fp32 rounding in the layer cannot flip a choice
            assert choice[n, ranked[layer.k - 1]] - choice[n, ranked[layer.k]] > 1e-4
        picked = [(e, scores[n, e].item()) for e in ranked[: layer.k]]
        if sigmoid or layer.norm_topk:
            total = sum(w for _, w in picked)
            picked = [(e, w / total) for e, w in picked]
        routes.append(picked)
    return routes


def reference_moe(layer: MoELayer, x: torch.Tensor) -> torch.Tensor:
    """Token by token in float64: sum over the reference's chosen experts of weight * SwiGLU expert(x)."""
    x_NC = x.reshape(-1, x.size(-1)).double()
    out = torch.zeros_like(x_NC)
    for n, picked in enumerate(reference_route(layer, x_NC)):
        for e, w in picked:
            gate, up = (x_NC[n] @ layer.w13_EC2H[e].double()).chunk(2)
            out[n] += w * ((F.silu(gate) * up) @ layer.w2_EHC[e].double())
    if layer.shared is not None:  # not routed: the layer's own module, in fp32
        out += layer.shared(x_NC.float()).double()
    return out.view_as(x)


@pytest.mark.parametrize("kw", [{}, {"router": "sigmoid"}, {"n_shared_experts": 1}, {"router_norm_topk": False},
                                {"n_active_experts": 1}, {"router": "sigmoid", "n_experts": 8, "n_active_experts": 3}])
def test_layer_equals_token_by_token_reference(kw):
    torch.manual_seed(0)
    model = MoE(moe_cfg(**kw))
    layer = model.layers[0].feed_forward
    with torch.no_grad():
        layer.gate.weight.normal_(0.0, 0.3)  # clear preferences (the init's are near-uniform: near-ties)
        layer.select_bias.normal_(0.0, 0.3)  # a selection bias that changes some choices (sigmoid router)
        layer.w13_EC2H.normal_(0.0, 0.3)  # expert outputs of order 10 (the init's are ~1e-3)
        layer.w2_EHC.normal_(0.0, 0.3)
    x = torch.randn(2, 7, 32)
    # fp32 layer vs float64 reference: outputs of order 10 from sums of 32-64 products, each rounded at
    # ~6e-8 relative (measured: <= 3e-7 relative); a wrong expert or weight moves them by order 1.
    torch.testing.assert_close(layer(x).double(), reference_moe(layer, x), atol=1e-4, rtol=1e-5)


def test_capacity_drops_overflow_and_reports_it():
    torch.manual_seed(0)
    layer = MoE(moe_cfg(dropless=False, capacity_factor=0.5)).layers[0].feed_forward
    with torch.no_grad():  # send every token to experts 0 and 1
        layer.gate.weight.zero_()
        layer.gate.weight[0] += 1.0
        layer.gate.weight[1] += 0.5
    x = torch.ones(1, 16, 32)
    layer(x)
    cap = math.ceil(0.5 * 16 * 2 / 4)  # 4 slots per expert
    assert layer.stats["kept"].tolist() == [cap, cap, 0, 0]
    assert layer.stats["dropped"] == pytest.approx(1 - 2 * cap / 32, rel=1e-12)  # a ratio of counts


def test_hybrid_layout_and_active_parameters():
    model = MoE(moe_cfg(n_layer=5, moe_first_dense=1, moe_every=2))
    assert [i for i, _ in model.moe_layers()] == [1, 3]
    dense = build_model(switch_arch(moe_cfg(n_layer=5), "llama"))
    # experts are half the dense FFN and top-2: the active parameters match the dense model's,
    # plus the routers (2 layers x E x C).
    assert model.active_params() == dense.num_params() + 2 * 4 * 32


def test_training_step_gives_gradients_and_routing_metrics():
    torch.manual_seed(0)
    model = MoE(moe_cfg(router="sigmoid"))
    idx, targets = torch.randint(0, 64, (2, 4, 16))
    _, loss = model(idx, targets)
    loss.backward()
    layer = model.layers[0].feed_forward
    assert layer.w13_EC2H.grad is not None and layer.gate.weight.grad is not None
    metrics = model.routing_metrics()
    load = layer.stats["load"]
    assert metrics["moe/layer_0/balance"] == pytest.approx((load.max() / load.mean()).item(), rel=1e-6)
    assert sum(metrics[f"moe/layer_1/load_{e}"] for e in range(4)) == 4 * 16 * 2  # every token, k times


def imbalance(load: torch.Tensor) -> float:
    """Max over mean expert load: 1 when balanced, E / k when k experts take every token."""
    return (load.max() / load.mean()).item()


def test_selection_bias_balances_a_skewed_router_over_steps():
    # DeepSeek-V3's aux-loss-free balancing alone (no gradient step): a router that prefers experts
    # 0 and 1 for every token (+3 on their logits), fed the same 64 tokens each step; after each step
    # the bias moves by `bias_update_rate` against each expert's load. The load must even out, and
    # stay even (the fixed-size sign step leaves an oscillation of a few assignments).
    torch.manual_seed(0)
    model = MoE(moe_cfg(router="sigmoid", n_experts=8, n_active_experts=2, bias_update_rate=0.01))
    layer = model.layers[0].feed_forward
    shared = F.normalize(torch.randn(32), dim=0)
    x = torch.randn(1, 64, 32) + 2 * shared  # (B, T, C): every token has a component along `shared`
    with torch.no_grad():
        layer.gate.weight.normal_(0.0, 0.05)
        layer.gate.weight[:2] += 1.5 * shared
    history = []
    for _ in range(80):
        layer(x)  # a training forward (train mode, gradients on) records the step's load
        history.append(imbalance(layer.stats["load"]))
        model.after_optimizer_step()
    assert history[0] > 3.0  # nearly every assignment on experts 0 and 1 (4.0 = all of them)
    late = history[-20:]
    assert max(late) < 1.75, late  # the busiest expert within 75% of the mean, 20 steps in a row
    bias = layer.select_bias
    assert bias[:2].max() < bias[2:].min()  # the favoured experts were pushed down, the rest up


@pytest.mark.parametrize("kw, message", [
    ({"n_active_experts": 5}, "n_active_experts=5 must be between 1 and model.n_experts=4"),
    ({"dropless": False, "capacity_factor": 0.0}, "capacity_factor=0.0 must be > 0"),
    ({"n_shared_experts": 9}, "n_shared_experts=9"),
    ({"router": "hash"}, "model.router"),
    ({"moe_first_dense": 2}, "leave no MoE layer"),
])
def test_bad_moe_settings(kw, message):
    with pytest.raises(UserError, match=message):
        MoE(moe_cfg(**kw))


def test_swiglu_and_its_hand_written_backward_match_autograd():
    torch.manual_seed(0)
    h = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(swiglu, (h,))
    gate, up = h.chunk(2, dim=-1)
    torch.testing.assert_close(swiglu(h), F.silu(gate) * up, atol=1e-12, rtol=1e-12)  # float64, elementwise
