"""The fused head + cross-entropy against PyTorch's own F.linear + F.cross_entropy; sequence
log-probabilities against a per-token loop; Bradley-Terry and DPO against hand computations."""

import math

import pytest
import torch
import torch.nn.functional as F

from scratchlm.losses import (
    bradley_terry_loss,
    chunk_rows,
    dpo_loss,
    fusable_head,
    linear_cross_entropy,
    linear_sequence_logprobs,
    sequence_logprobs,
)


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



# ---- sequence log-probabilities ----------------------------------------------------------------


def loop_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> list[tuple[float, int]]:
    """Per row, (sum of log p(target), counted tokens), one token at a time in Python floats."""
    out = []
    for b in range(logits.size(0)):
        total, n = 0.0, 0
        for t in range(logits.size(1)):
            y = int(targets[b, t])
            if y == -1:
                continue
            row = [float(v) for v in logits[b, t]]
            total += row[y] - math.log(sum(math.exp(v) for v in row))
            n += 1
        out.append((total, n))
    return out


def sample_batch(B=3, T=6, V=11, C=8, dtype=torch.float64):
    torch.manual_seed(0)
    x = torch.randn(B, T, C, dtype=dtype)
    w = torch.randn(V, C, dtype=dtype) * 0.5
    t = torch.randint(0, V, (B, T))
    t[0, :2] = -1  # a prompt
    t[1, ::2] = -1
    t[2, -1] = -1  # padding
    return x, w, t


def test_sequence_logprobs_equal_a_per_token_loop_in_float64():
    x, w, t = sample_batch()
    logits = x @ w.T  # (B, T, V) float64
    want = loop_logprobs(logits, t)
    total = sequence_logprobs(logits, t)
    mean = sequence_logprobs(logits, t, average=True)
    assert total.shape == mean.shape == (3,) and total.dtype == torch.float64
    for b, (s, n) in enumerate(want):
        assert total[b].item() == pytest.approx(s, abs=1e-12)
        assert mean[b].item() == pytest.approx(s / n, abs=1e-12)  # divided by the counted tokens only
    assert [n for _, n in want] == [4, 3, 5]


def test_sequence_logprobs_run_in_fp32_for_low_precision_logits():
    x, w, t = sample_batch(dtype=torch.float32)
    logits = (x @ w.T).to(torch.bfloat16)
    got = sequence_logprobs(logits, t)
    assert got.dtype == torch.float32
    want = torch.tensor([s for s, _ in loop_logprobs(logits.double(), t)], dtype=torch.float64)
    # the same bf16 logits, reduced in fp32 instead of float64: fp32 rounding only
    torch.testing.assert_close(got.double(), want, atol=1e-5, rtol=1e-6)


def test_sequence_logprobs_gradient_equals_masked_cross_entropy():
    x, w, t = sample_batch()
    logits = (x @ w.T).requires_grad_()
    ref = logits.detach().clone().requires_grad_()
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)  # a different incoming gradient per row
    (sequence_logprobs(logits, t) * g).sum().backward()
    per_token = -F.cross_entropy(ref.flatten(0, 1), t.flatten(), ignore_index=-1, reduction="none").view(3, 6)
    (per_token.sum(-1) * g).sum().backward()
    torch.testing.assert_close(logits.grad, ref.grad, atol=1e-12, rtol=1e-12)


def test_a_row_with_no_counted_token_sums_to_zero_and_averages_to_nan():
    logits, t = torch.randn(2, 3, 5), torch.tensor([[1, 2, -1], [-1, -1, -1]])
    assert sequence_logprobs(logits, t)[1].item() == 0.0
    assert math.isnan(sequence_logprobs(logits, t, average=True)[1].item())
    assert linear_sequence_logprobs(torch.randn(2, 3, 4), torch.randn(5, 4), t)[1].item() == 0.0


@pytest.mark.parametrize("chunk", [1, 4, 1000])
@pytest.mark.parametrize("average", [False, True])
def test_linear_sequence_logprobs_equal_the_unfused_ones_with_gradients(chunk, average):
    x, w, t = sample_batch()
    g = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    out = []
    for fn in (lambda a, b: sequence_logprobs(a @ b.T, t, average=average),
               lambda a, b: linear_sequence_logprobs(a, b, t, average=average, chunk=chunk)):
        a, b = x.clone().requires_grad_(), w.clone().requires_grad_()
        lp = fn(a, b)
        (lp * g).sum().backward()
        out.append((lp.detach(), a.grad, b.grad))
    (l0, gx0, gw0), (l1, gx1, gw1) = out
    assert l1.dtype == gx1.dtype == gw1.dtype == torch.float64
    torch.testing.assert_close(l1, l0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gx1, gx0, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(gw1, gw0, atol=1e-12, rtol=1e-12)


def test_linear_sequence_logprobs_frozen_head_no_grad_and_autocast():
    x, w, t = sample_batch(dtype=torch.float32)
    want = sequence_logprobs(x @ w.T, t)
    with torch.no_grad():
        torch.testing.assert_close(linear_sequence_logprobs(x, w, t, chunk=5), want, atol=1e-5, rtol=1e-5)
    a = x.clone().requires_grad_()
    linear_sequence_logprobs(a, w, t, chunk=5).sum().backward()  # a frozen head: only x learns
    assert w.grad is None and a.grad is not None
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = linear_sequence_logprobs(x, w, t, chunk=5)
    assert got.dtype == torch.float32  # bf16 matmul, fp32 log-softmax
    torch.testing.assert_close(got, want, atol=0.1, rtol=2e-2)


# ---- Bradley-Terry -----------------------------------------------------------------------------


def test_bradley_terry_hand_values():
    # equal rewards: -log σ(0) = log 2
    assert bradley_terry_loss(torch.tensor([0.7]), torch.tensor([0.7])).item() == pytest.approx(math.log(2), abs=1e-7)
    # gaps 1 and -1: -log σ(g) = log(1 + e^-g)
    rc, rr = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    want = (math.log(1 + math.exp(-1)) + math.log(1 + math.exp(1))) / 2
    assert bradley_terry_loss(rc, rr).item() == pytest.approx(want, abs=1e-12)
    # stable for huge gaps: log(1 + e^1000) = 1000 in floating point
    big = bradley_terry_loss(torch.tensor([0.0, 1000.0]), torch.tensor([1000.0, 0.0]))
    assert big.item() == pytest.approx(500.0, abs=1e-4)


def test_bradley_terry_margin_is_the_plain_loss_at_shifted_chosen_rewards():
    rc, rr = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    m = torch.tensor([0.5, -1.0], dtype=torch.float64)
    got = bradley_terry_loss(rc, rr, margin=m)
    assert got.item() == pytest.approx(bradley_terry_loss(rc - m, rr).item(), abs=1e-15)
    # gaps 2-1-0.5 = 0.5 and 0-1+1 = 0
    assert got.item() == pytest.approx((math.log(1 + math.exp(-0.5)) + math.log(2)) / 2, abs=1e-12)


def test_bradley_terry_centering_term_hand_value():
    rc, rr = torch.tensor([2.0, 0.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    plain = bradley_terry_loss(rc, rr)
    # pair sums 3 and 1: mean(9, 1) = 5, times 0.1
    assert (bradley_terry_loss(rc, rr, center_coef=0.1) - plain).item() == pytest.approx(0.5, abs=1e-12)
    with pytest.raises(ValueError, match="center_coef"):
        bradley_terry_loss(rc, rr, center_coef=-1.0)


# ---- DPO ---------------------------------------------------------------------------------------

# Two pairs, β = 0.5. Log-ratios: chosen (-1 + 1.5, -3 + 2.5) = (0.5, -0.5), rejected
# (-2 + 1.5, -2 + 2) = (-0.5, 0); h = (1, -0.5); βh = (0.5, -0.25).
PC, PR, RC, RR = ([-1.0, -3.0], [-2.0, -2.0], [-1.5, -2.5], [-1.5, -2.0])
BETA, BH = 0.5, (0.5, -0.25)


def pairs(grad: bool = False, ref_grad: bool = False):
    def f(v, g):
        return torch.tensor(v, dtype=torch.float64, requires_grad=g)
    return f(PC, grad), f(PR, grad), f(RC, ref_grad), f(RR, ref_grad)


def softplus(z: float) -> float:
    return math.log(1 + math.exp(z))  # -log σ(-z)


def test_dpo_sigmoid_hand_values_and_rewards():
    out = dpo_loss(*pairs(), beta=BETA)
    torch.testing.assert_close(out.losses, torch.tensor([softplus(-BH[0]), softplus(-BH[1])], dtype=torch.float64))
    torch.testing.assert_close(out.chosen_rewards, torch.tensor([0.25, -0.25], dtype=torch.float64))
    torch.testing.assert_close(out.rejected_rewards, torch.tensor([-0.25, 0.0], dtype=torch.float64))
    torch.testing.assert_close(out.margins, torch.tensor([0.5, -0.25], dtype=torch.float64))


def test_dpo_label_smoothing_hand_values_and_zero_is_plain():
    eps = 0.2
    out = dpo_loss(*pairs(), beta=BETA, label_smoothing=eps)
    want = [(1 - eps) * softplus(-z) + eps * softplus(z) for z in BH]
    torch.testing.assert_close(out.losses, torch.tensor(want, dtype=torch.float64))
    plain = dpo_loss(*pairs(), beta=BETA)
    assert torch.equal(dpo_loss(*pairs(), beta=BETA, label_smoothing=0.0).losses, plain.losses)


def test_dpo_ipo_hand_values():
    # (h - 1/(2β))² with 1/(2β) = 1: (1 - 1)² = 0, (-0.5 - 1)² = 2.25
    out = dpo_loss(*pairs(), beta=BETA, kind="ipo")
    torch.testing.assert_close(out.losses, torch.tensor([0.0, 2.25], dtype=torch.float64))


@pytest.mark.parametrize("beta", [0.01, 0.1, 0.5, 2.0])
def test_dpo_at_policy_equal_to_reference(beta):
    torch.manual_seed(0)
    lp = -torch.rand(8) * 50  # fp32 summed log-probs, as the trainer passes them
    sig = dpo_loss(lp, lp.clone(), lp.clone(), lp.clone(), beta=beta)
    assert (sig.losses - math.log(2)).abs().max().item() < 1e-6
    ipo = dpo_loss(lp, lp.clone(), lp.clone(), lp.clone(), beta=beta, kind="ipo")
    torch.testing.assert_close(ipo.losses, torch.full((8,), 1 / (4 * beta**2)), atol=1e-6, rtol=1e-6)
    assert sig.chosen_rewards.abs().max().item() == sig.margins.abs().max().item() == 0.0


def test_dpo_gradients_reach_the_policy_only():
    pc, pr, rc, rr = pairs(grad=True, ref_grad=True)  # even a reference computed with grad gets none
    dpo_loss(pc, pr, rc, rr, beta=BETA).losses.sum().backward()
    assert rc.grad is None and rr.grad is None
    # d/dπ_c of -log σ(βh) = -β σ(-βh); d/dπ_r = +β σ(-βh)
    sig = [1 / (1 + math.exp(z)) for z in BH]
    torch.testing.assert_close(pc.grad, torch.tensor([-BETA * s for s in sig], dtype=torch.float64))
    torch.testing.assert_close(pr.grad, torch.tensor([BETA * s for s in sig], dtype=torch.float64))
    # references that never asked for grad are fine too, and the rewards are detached
    pc, pr, rc, rr = pairs(grad=True)
    out = dpo_loss(pc, pr, rc, rr, beta=BETA)
    assert out.losses.requires_grad and not out.chosen_rewards.requires_grad and not out.margins.requires_grad


@pytest.mark.parametrize("kwargs, match", [
    ({"beta": 0.0}, "beta"), ({"beta": -0.1}, "beta"),
    ({"beta": 0.1, "label_smoothing": -0.1}, "label_smoothing"),
    ({"beta": 0.1, "label_smoothing": 0.5}, "label_smoothing"),
    ({"beta": 0.1, "kind": "hinge"}, "kind"),
    ({"beta": 0.1, "kind": "ipo", "label_smoothing": 0.1}, "label_smoothing"),
])
def test_dpo_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        dpo_loss(*pairs(), **kwargs)


def test_linear_sequence_logprobs_keep_no_logits_for_backward():
    """Counted with saved_tensors_hooks: the fused version keeps only its inputs (x, the head, the
    targets) for backward, never a chunk's (rows, V) logits or log-softmax."""
    torch.manual_seed(0)
    B, T, C, V = 2, 64, 8, 3000
    x, w = torch.randn(B, T, C, requires_grad=True), torch.randn(V, C, requires_grad=True)
    t = torch.randint(0, V, (B, T))
    sizes = []

    def pack(v):
        sizes.append(v.numel())
        return v

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda v: v):
        lp = linear_sequence_logprobs(x, w, t, chunk=16)
    assert max(sizes) == V * C < 16 * V  # the head weight is the largest thing kept
    lp.sum().backward()
    assert x.grad is not None and w.grad is not None
