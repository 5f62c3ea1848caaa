"""Group-limited routing (DeepSeek-V3) in model/moe.py, against a per-token loop: experts in G equal
groups, each group scored by the sum of its two best selection scores, the top-k taken only among the
experts of the topk_groups best groups; the weights are the raw scores renormalised, times routed_scale.
With every group allowed, routing is the ungrouped router's exactly."""

from __future__ import annotations

import pytest
import torch

from scratchlm.errors import UserError
from scratchlm.model.moe import MoELayer
from tests.helpers import moe_cfg


def reference_route(select: torch.Tensor, scores: torch.Tensor, G: int, kg: int, k: int, scale: float):
    experts, weights = [], []
    E = select.size(1)
    size = E // G
    for row, srow in zip(select.tolist(), scores.tolist()):
        group_score = [sum(sorted(row[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(G)]
        best = sorted(range(G), key=lambda g: -group_score[g])[:kg]
        allowed = [e for e in range(E) if e // size in best]
        chosen = sorted(allowed, key=lambda e: -row[e])[:k]
        w = [srow[e] for e in chosen]
        experts.append(sorted(chosen))
        weights.append(sorted(zip(chosen, [scale * x / sum(w) for x in w])))
    return experts, weights


@pytest.mark.parametrize("router", ["sigmoid", "softmax"])
def test_group_limited_routing_equals_a_per_token_loop(router):
    torch.manual_seed(0)
    layer = MoELayer(moe_cfg(router=router, n_experts=8, n_active_experts=3, expert_groups=4, topk_groups=2,
                             routed_scale=2.5)).double()
    with torch.no_grad():
        layer.gate.weight.normal_()
        layer.select_bias.normal_(0, 0.3)
    x = torch.randn(40, 32, dtype=torch.float64)
    weights, experts, logits, _ = layer.route(x)
    if router == "sigmoid":
        scores = torch.sigmoid(logits)
        select = scores + layer.select_bias
    else:
        scores = select = logits.softmax(-1)
    ref_experts, ref_weights = reference_route(select, scores, 4, 2, 3, 2.5)
    assert [sorted(r) for r in experts.tolist()] == ref_experts
    ours = [sorted(zip(e, w)) for e, w in zip(experts.tolist(), weights.tolist())]
    for a, b in zip(ours, ref_weights):
        assert [e for e, _ in a] == [e for e, _ in b]
        assert [w for _, w in a] == pytest.approx([w for _, w in b], abs=1e-12)
    # the limit mattered: some token's ungrouped top-3 reaches outside its two best groups
    assert any(sorted(r) != e for r, e in zip(select.topk(3, dim=-1).indices.tolist(), ref_experts))


def test_every_group_allowed_is_the_ungrouped_router():
    torch.manual_seed(1)
    plain = MoELayer(moe_cfg(router="sigmoid", n_experts=8)).double()
    grouped = MoELayer(moe_cfg(router="sigmoid", n_experts=8, expert_groups=4, topk_groups=4)).double()
    grouped.load_state_dict(plain.state_dict())
    x = torch.randn(20, 32, dtype=torch.float64)
    for a, b in zip(plain.route(x), grouped.route(x)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("fields, message", [
    (dict(expert_groups=3), "model.expert_groups=3 must divide model.n_experts=4"),
    (dict(expert_groups=2, topk_groups=3), "model.topk_groups=3 must be <= model.expert_groups=2"),
    (dict(n_experts=8, n_active_experts=3, expert_groups=4, topk_groups=1), "hold fewer than model.n_active"),
])
def test_group_settings_are_checked(fields, message):
    with pytest.raises(UserError, match=message):
        moe_cfg(**fields).validate()
