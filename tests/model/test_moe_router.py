"""The sigmoid router is aux-loss-free, and its balancing bias sees the whole step's load; the
training loop averages MoE router losses per micro-batch while it weights cross-entropy by tokens."""

from __future__ import annotations

import torch

from scratchlm.model.llama import Llama
from scratchlm.model.moe import MoE, balance_loss_coef
from scratchlm.train.loop import forward_backward
from tests.helpers import moe_cfg


def test_balance_loss_weight_follows_the_router():
    assert balance_loss_coef(moe_cfg()) == 0.01
    assert balance_loss_coef(moe_cfg(router="sigmoid")) == 0.0
    assert balance_loss_coef(moe_cfg(router="sigmoid", aux_loss_coef=1e-4)) == 1e-4  # an explicit weight is honoured
    assert balance_loss_coef(moe_cfg(aux_loss_coef=0.0)) == 0.0


def test_sigmoid_router_adds_no_balance_loss():
    """Regression: the 'aux-loss-free' router added 0.01 x the balance loss. With the z-loss off,
    its loss is the plain cross-entropy (same operations, so exactly equal)."""
    torch.manual_seed(0)
    model = MoE(moe_cfg(router="sigmoid", z_loss_coef=0.0))
    idx, targets = torch.randint(0, 64, (2, 4, 16))
    _, loss = model(idx, targets)
    _, ce = Llama.forward(model, idx, targets)
    assert model.layers[0].feed_forward.aux["balance"] > 0.5  # there was a balance loss to add
    assert torch.equal(loss, ce)


def test_bias_update_is_the_same_for_1x4_and_4x1_micro_batches():
    """Regression: under gradient accumulation the bias moved by the last micro-batch's load only.
    Loads are exact counts; the models run in float64 so that routing (a top-k) cannot flip between
    the batch shapes, making the comparison exact (torch.equal)."""
    torch.manual_seed(0)
    a, b = MoE(moe_cfg(router="sigmoid")).double(), MoE(moe_cfg(router="sigmoid")).double()
    b.load_state_dict(a.state_dict())
    x, y = torch.randint(0, 64, (2, 4, 16))
    amp = torch.autocast("cpu", enabled=False)
    forward_backward(a, [(x, y)], amp, None)
    forward_backward(b, [(x[i : i + 1], y[i : i + 1]) for i in range(4)], amp, None)
    with torch.no_grad():
        b.eval()(x[:1], y[:1])  # validation forwards do not count toward the load
    b.train()
    loads = [layer.step_load.clone() for _, layer in a.moe_layers()]
    for (_, la), (_, lb) in zip(a.moe_layers(), b.moe_layers()):
        assert torch.equal(la.step_load, lb.step_load)
        assert la.step_load.sum() == 4 * 16 * 2  # every token's k=2 assignments, all micro-batches
    a.after_optimizer_step()
    b.after_optimizer_step()
    for load, (_, la), (_, lb) in zip(loads, a.moe_layers(), b.moe_layers()):
        assert torch.equal(la.select_bias, lb.select_bias)
        assert torch.equal(la.select_bias, 0.001 * torch.sign(load.mean() - load).to(la.select_bias))
        assert la.step_load.sum() == 0  # the next step starts counting afresh


def test_router_losses_average_per_micro_batch_while_cross_entropy_weighs_by_tokens():
    """forward_backward's loss: the cross-entropy over all valid targets of the step, plus the mean
    of the micro-batches' router losses (float64, so sums in another order agree to ~1e-12)."""
    torch.manual_seed(0)
    model = MoE(moe_cfg(aux_loss_coef=0.1)).double()
    x, y = torch.randint(0, 64, (2, 3, 16))
    y[0, :10] = -1  # micro-batch 0 keeps 22 targets, micro-batch 1 all 16
    micro = [(x[:2], y[:2]), (x[2:], y[2:])]
    ce, aux = [], []
    with torch.no_grad():
        for mx, my in micro:
            loss = model(mx, my)[1]
            aux.append(model.aux_loss())
            ce.append((loss - aux[-1]) * my.ne(-1).sum())
    expected = sum(ce) / y.ne(-1).sum() + sum(aux) / 2
    got = forward_backward(model, micro, torch.autocast("cpu", enabled=False), None)
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=1e-12)
