"""The fused head + cross-entropy against PyTorch's own F.linear + F.cross_entropy."""

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.losses import chunk_rows, fusable_head, linear_cross_entropy


def reference_and_fused(N=150, C=24, V=97, chunk=32, ignore_every=0, dtype=torch.float32):
    torch.manual_seed(0)
    x = torch.randn(N, C, dtype=dtype)
    w = torch.randn(V, C, dtype=dtype) * 0.3
    t = torch.randint(0, V, (N,))
    if ignore_every:
        t[::ignore_every] = -1
    out = []
    for fn in (lambda a, b: F.cross_entropy(F.linear(a, b).float(), t, ignore_index=-1),
               lambda a, b: linear_cross_entropy(a, b, t, chunk=chunk)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(a, b)
        (3.0 * loss).backward()  # a scale other than 1 checks that backward uses the incoming gradient
        out.append((loss.detach(), a.grad, b.grad))
    return out


@pytest.mark.parametrize("chunk", [1, 32, 64, 150, 1000])
@pytest.mark.parametrize("ignore_every", [0, 3])
def test_fused_loss_and_gradients_equal_pytorch(chunk, ignore_every):
    (l0, gx0, gw0), (l1, gx1, gw1) = reference_and_fused(chunk=chunk, ignore_every=ignore_every)
    assert l1.item() == pytest.approx(l0.item(), abs=1e-5)
    torch.testing.assert_close(gx1, gx0, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw1, gw0, atol=1e-6, rtol=1e-5)


def test_every_target_ignored_gives_nan_like_pytorch():
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.full((4,), -1)
    assert math.isnan(F.cross_entropy(x @ w.T, t, ignore_index=-1).item())
    assert math.isnan(linear_cross_entropy(x, w, t).item())


def test_batched_shape_and_no_gradient_work_without_grad():
    torch.manual_seed(0)
    x, w, t = torch.randn(2, 5, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 5))
    with torch.no_grad():
        loss = linear_cross_entropy(x, w, t, chunk=3)
    assert loss.item() == pytest.approx(F.cross_entropy((x @ w.T).flatten(0, 1), t.flatten()).item(), abs=1e-6)


def test_bf16_autocast_matches_pytorch_under_autocast():
    torch.manual_seed(0)
    x, w, t = torch.randn(64, 32), torch.randn(50, 32) * 0.2, torch.randint(0, 50, (64,))
    res = []
    for fn in (lambda a, b: F.cross_entropy(F.linear(a, b).float(), t), lambda a, b: linear_cross_entropy(a, b, t)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = fn(a, b)
        loss.backward()
        assert a.grad.dtype == b.grad.dtype == torch.float32
        res.append((loss.item(), a.grad, b.grad))
    assert res[1][0] == pytest.approx(res[0][0], rel=1e-2)
    torch.testing.assert_close(res[1][1], res[0][1], atol=2e-3, rtol=5e-2)
    torch.testing.assert_close(res[1][2], res[0][2], atol=2e-3, rtol=5e-2)


def test_chunking_policy_and_which_heads_fuse():
    assert chunk_rows(8192) == 512 and 64 <= chunk_rows(10**7) < 512
    assert fusable_head(torch.nn.Linear(4, 9, bias=False))
    assert not fusable_head(torch.nn.Linear(4, 9)) and not fusable_head(torch.nn.Identity())


def test_frozen_weight_gets_no_gradient_and_x_still_does():
    torch.manual_seed(0)
    x, w, t = torch.randn(20, 8, requires_grad=True), torch.randn(30, 8), torch.randint(0, 30, (20,))
    linear_cross_entropy(x, w, t, chunk=7).backward()
    ref = x.detach().clone().requires_grad_()
    F.cross_entropy(ref @ w.T, t).backward()
    assert w.grad is None
    torch.testing.assert_close(x.grad, ref.grad, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_without_grad_mode_only_the_loss_is_computed(mode):
    """Regression: autograd runs a Function's forward with `needs_input_grad` set from requires_grad
    even under no_grad, so evaluation paid for both gradient matmuls. Counted with FlopCounterMode:
    only the logits matmul (2·N·C·V) may run, and no gradient is kept."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    N, C, V = 20, 8, 30
    x, w = torch.randn(N, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    t = torch.randint(0, V, (N,))
    counter = FlopCounterMode(display=False)
    with mode(), counter:
        loss = linear_cross_entropy(x, w, t, chunk=7)
    assert counter.get_total_flops() == 2 * N * C * V
    assert not loss.requires_grad and loss.grad_fn is None
    torch.testing.assert_close(loss, F.cross_entropy(x.detach() @ w.detach().T, t), atol=1e-6, rtol=1e-5)


def test_float64_is_computed_in_float64():
    """Invariant tests (grad accumulation 1x8 == 8x1) run the model in float64: the fused loss must
    not round through fp32 on the way (it did: loss and weight gradient came back fp32-accurate)."""
    torch.manual_seed(0)
    x, w = torch.randn(150, 24, dtype=torch.float64), torch.randn(97, 24, dtype=torch.float64) * 0.3
    t = torch.randint(0, 97, (150,))
    t[::3] = -1
    out = []
    for fn in (lambda a, b: F.cross_entropy(a @ b.T, t, ignore_index=-1), lambda a, b: linear_cross_entropy(a, b, t)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        loss = fn(a, b)
        loss.backward()
        out.append((loss, a.grad, b.grad))
    (l0, gx0, gw0), (l1, gx1, gw1) = out
    assert l1.dtype == gx1.dtype == gw1.dtype == torch.float64
    # float64 rounding of sums of ~100 terms of size ~1: 1e-13 is far below fp32's 1e-7
    torch.testing.assert_close(l1, l0, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(gx1, gx0, atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(gw1, gw0, atol=1e-13, rtol=1e-12)

