"""The RL loss math against hand computations written out here (float64, literal numbers or plain
Python loops), and its invariants: GAE with lam = 1 is reward-to-go minus value, lam = 0 the TD
error; the KL estimators' expectations under the sampling policy; padding never changes a result."""

import math

import pytest
import torch

from scratchlm.rl.losses import (
    AdaptiveKLController,
    FixedKLController,
    aggregate,
    clipped_surrogate,
    clipped_value_loss,
    discounted_returns,
    entropy_from_logits,
    explained_variance,
    gae,
    group_advantages,
    kl_penalty,
    masked_mean,
    masked_var,
    masked_whiten,
)

f64 = torch.float64


def t64(x):
    return torch.tensor(x, dtype=f64)


def ragged_mask(B=5, T=7):
    """Rows: full, left-padded, right-padded, padded on both sides, a single token."""
    spans = [(0, 7), (2, 7), (0, 4), (1, 5), (3, 4)]
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (s, e) in enumerate(spans):
        mask[b, s:e] = True
    return mask, spans


# ---- masked statistics and whitening ---------------------------------------------------------------


def test_masked_mean_and_var_ignore_entries_outside_the_mask():
    x = t64([[1.0, 2.0, float("nan")], [3.0, float("inf"), 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # masked entries 1, 2, 3, 6: mean 3, squared deviations 4, 1, 0, 9 -> sum 14
    assert masked_mean(x, mask).item() == 3.0
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(14 / 4, abs=1e-15)
    assert masked_var(x, mask).item() == pytest.approx(14 / 3, abs=1e-15)
    assert torch.equal(masked_mean(x, mask, dim=1), t64([1.5, 4.5]))
    assert masked_mean(x, torch.zeros_like(mask)).isnan()


def test_masked_whiten_gives_mean_0_and_var_1_over_the_masked_entries_and_0_outside():
    torch.manual_seed(0)
    mask, _ = ragged_mask()
    x = torch.randn(5, 7, dtype=f64) * 3 + 2
    x[~mask] = 1e6  # outside values must not move the statistics
    w = masked_whiten(x, mask)
    vals = w[mask]
    assert vals.mean().item() == pytest.approx(0.0, abs=1e-12)
    assert vals.var().item() == pytest.approx(1.0, abs=1e-8)  # unbiased; eps = 1e-8 costs ~1e-9
    assert torch.equal(w[~mask], torch.zeros_like(w[~mask]))
    # by hand on the masked entries only
    xs = x[mask].tolist()
    mean = sum(xs) / len(xs)
    std = math.sqrt(sum((v - mean) ** 2 for v in xs) / (len(xs) - 1) + 1e-8)
    assert torch.allclose(vals, t64([(v - mean) / std for v in xs]), atol=1e-12, rtol=0)
    # shift_mean=False keeps the mean: scaled deviations plus the original mean
    kept = masked_whiten(x, mask, shift_mean=False)[mask]
    assert torch.allclose(kept, t64([(v - mean) / std + mean for v in xs]), atol=1e-12, rtol=0)


# ---- returns and GAE -------------------------------------------------------------------------------


def test_discounted_returns_by_hand_with_padding_on_both_sides():
    # row 0: response at columns 1..3, rewards 1, 0, 2; gamma 0.5
    #   G3 = 2, G2 = 0 + 0.5*2 = 1, G1 = 1 + 0.5*1 = 1.5
    # row 1: response at columns 0..1 (right-padded), rewards 0, 4: G1 = 4, G0 = 2
    rewards = t64([[9.0, 1.0, 0.0, 2.0, 9.0], [0.0, 4.0, 9.0, 9.0, 9.0]])
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    out = discounted_returns(rewards, mask, gamma=0.5)
    assert torch.equal(out, t64([[0.0, 1.5, 1.0, 2.0, 0.0], [2.0, 4.0, 0.0, 0.0, 0.0]]))


def test_gae_one_row_three_tokens_by_hand():
    # gamma 0.9, lam 0.8 (gamma*lam = 0.72); rewards 0, 0, 1; values 0.5, 0.6, 0.7; V after the end = 0
    #   delta2 = 1 + 0.9*0   - 0.7 = 0.3     A2 = 0.3
    #   delta1 = 0 + 0.9*0.7 - 0.6 = 0.03    A1 = 0.03 + 0.72*0.3   = 0.246
    #   delta0 = 0 + 0.9*0.6 - 0.5 = 0.04    A0 = 0.04 + 0.72*0.246 = 0.21712
    # returns = A + V = 0.71712, 0.846, 1.0
    adv, ret = gae(t64([[0.0, 0.0, 1.0]]), t64([[0.5, 0.6, 0.7]]), torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert torch.allclose(adv, t64([[0.21712, 0.246, 0.3]]), atol=1e-14, rtol=0)
    assert torch.allclose(ret, t64([[0.71712, 0.846, 1.0]]), atol=1e-14, rtol=0)


def random_rollout(seed=0):
    g = torch.Generator().manual_seed(seed)
    mask, spans = ragged_mask()
    return torch.randn(5, 7, generator=g, dtype=f64), torch.randn(5, 7, generator=g, dtype=f64), mask, spans


def test_gae_with_lam_1_gamma_1_is_reward_to_go_minus_value_on_ragged_rows():
    rewards, values, mask, spans = random_rollout()
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)
    want = torch.zeros(5, 7, dtype=f64)
    for b, (s, e) in enumerate(spans):
        for t in range(s, e):
            want[b, t] = sum(rewards[b, k].item() for k in range(t, e)) - values[b, t].item()
    assert torch.allclose(adv, want, atol=1e-12, rtol=0)
    assert torch.allclose(ret, torch.where(mask, want + values, 0), atol=1e-12, rtol=0)
    # with lam = 1 the value targets are the discounted returns for any gamma
    assert torch.allclose(gae(rewards, values, mask, 0.9, 1.0).returns, discounted_returns(rewards, mask, 0.9),
                          atol=1e-12, rtol=0)


def test_gae_with_lam_0_is_the_one_step_td_error():
    rewards, values, mask, spans = random_rollout(1)
    gamma = 0.9
    adv, _ = gae(rewards, values, mask, gamma=gamma, lam=0.0)
    want = torch.zeros(5, 7, dtype=f64)
    for b, (s, e) in enumerate(spans):
        for t in range(s, e):
            next_v = values[b, t + 1].item() if t + 1 < e else 0.0
            want[b, t] = rewards[b, t].item() + gamma * next_v - values[b, t].item()
    assert torch.allclose(adv, want, atol=1e-12, rtol=0)


def test_gae_ignores_everything_outside_the_mask():
    rewards, values, mask, _ = random_rollout(2)
    adv, ret = gae(rewards, values, mask, gamma=0.95, lam=0.9)
    assert torch.equal(adv[~mask], torch.zeros_like(adv[~mask]))
    assert torch.equal(ret[~mask], torch.zeros_like(ret[~mask]))
    r2, v2 = rewards.clone(), values.clone()
    r2[~mask] = 1e6
    v2[~mask] = float("nan")
    adv2, ret2 = gae(r2, v2, mask, gamma=0.95, lam=0.9)
    assert torch.equal(adv2, adv) and torch.equal(ret2, ret)
    assert torch.equal(discounted_returns(r2, mask, 0.95), discounted_returns(rewards, mask, 0.95))


# ---- KL estimators ---------------------------------------------------------------------------------


def test_kl_estimators_by_hand():
    logp, ref = t64([-1.0, -2.0]), t64([-1.5, -1.0])
    # d = logp - ref = 0.5, -1.0
    assert torch.equal(kl_penalty(logp, ref, "k1"), t64([0.5, -1.0]))
    assert torch.equal(kl_penalty(logp, ref, "k2"), t64([0.125, 0.5]))
    # k3 = exp(-d) + d - 1: exp(-0.5) - 0.5 = 0.10653065971263342, e - 2 = 0.7182818284590451
    assert torch.allclose(kl_penalty(logp, ref, "k3"), t64([0.10653065971263342, 0.7182818284590451]),
                          atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="k1"):
        kl_penalty(logp, ref, "k4")


def test_kl_estimators_are_zero_at_the_reference_and_k3_is_never_negative():
    torch.manual_seed(0)
    logp = torch.randn(1000, dtype=f64) * 3
    for kind in ("k1", "k2", "k3"):
        assert torch.equal(kl_penalty(logp, logp.clone(), kind), torch.zeros_like(logp))
    assert (kl_penalty(logp, torch.randn(1000, dtype=f64) * 3, "k3") >= 0).all()


def test_k1_and_k3_are_unbiased_for_kl_p_q():
    p, q = [0.5, 0.3, 0.2], [0.2, 0.3, 0.5]
    kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))  # 0.3 * ln 2.5 = 0.2748872...
    logp, logq = t64(p).log(), t64(q).log()
    # exact expectation over the three outcomes, weighted by p
    for kind in ("k1", "k3"):
        assert (t64(p) * kl_penalty(logp, logq, kind)).sum().item() == pytest.approx(kl, abs=1e-14)
    # Monte Carlo: the sample mean is within 5 standard errors of the true KL
    n = 200_000
    x = torch.multinomial(t64(p), n, replacement=True, generator=torch.Generator().manual_seed(0))
    for kind in ("k1", "k3"):
        k = kl_penalty(logp[x], logq[x], kind)
        assert abs(k.mean().item() - kl) < 5 * k.std().item() / math.sqrt(n)


# ---- policy and value losses -----------------------------------------------------------------------


def test_clipped_surrogate_at_ratio_1_is_minus_the_mean_advantage():
    torch.manual_seed(0)
    mask, _ = ragged_mask()
    logp, adv = torch.randn(5, 7, dtype=f64), torch.randn(5, 7, dtype=f64)
    out = clipped_surrogate(logp, logp.clone(), adv, mask, clip_eps=0.2)
    assert torch.equal(out.ratio, torch.ones(5, 7, dtype=f64))
    assert out.loss.item() == pytest.approx(-adv[mask].mean().item(), abs=1e-15)
    assert out.clip_frac.item() == 0.0 and out.approx_kl.item() == 0.0


def test_clipped_surrogate_by_hand_clipped_tokens_get_no_gradient():
    # eps 0.2; five positions, the last outside the mask with a wild log-ratio
    #   A=+2, r=1.5: min(3.0, 1.2*2 = 2.4)    = 2.4  clipped  -> loss -2.4
    #   A=-1, r=0.5: min(-0.5, 0.8*-1 = -0.8) = -0.8 clipped  -> loss  0.8
    #   A=+1, r=0.5: min(0.5, 0.8)            = 0.5  not      -> loss -0.5 (out of range, still pulled back)
    #   A=-1, r=1.1: inside the range         = -1.1          -> loss  1.1
    # token mean (-2.4 + 0.8 - 0.5 + 1.1) / 4 = -0.25; clip_frac 2/4
    ratios = [1.5, 0.5, 0.5, 1.1]
    old = t64([[-1.0, -2.0, -0.5, -3.0, 0.0]])
    logp = (old + t64([[math.log(r) for r in ratios] + [80.0]])).requires_grad_()
    adv = t64([[2.0, -1.0, 1.0, -1.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    out = clipped_surrogate(logp, old, adv, mask, clip_eps=0.2)
    assert out.loss.item() == pytest.approx(-0.25, abs=1e-14)
    assert out.clip_frac.item() == 0.5
    approx_kl = sum(0.5 * math.log(r) ** 2 for r in ratios) / 4
    assert out.approx_kl.item() == pytest.approx(approx_kl, abs=1e-14)
    assert torch.allclose(out.ratio, t64([ratios + [1.0]]), atol=1e-14, rtol=0)
    out.loss.backward()
    # d loss / d logp = -ratio * A / 4 where the unclipped term is chosen, 0 where clipped or unmasked
    assert torch.allclose(logp.grad, t64([[0.0, 0.0, -0.5 * 1 / 4, -1.1 * -1 / 4, 0.0]]), atol=1e-14, rtol=0)
    assert logp.grad[0, 0].item() == 0.0 and logp.grad[0, 1].item() == 0.0


def test_clipped_value_loss_by_hand_both_branches():
    # c = 0.2
    #   old 1.0, v 1.5, R 1.0: (v-R)² = 0.25; clipped v 1.2: 0.04  -> max 0.25 (unclipped)
    #   old 1.0, v 1.5, R 2.0: (v-R)² = 0.25; clipped v 1.2: 0.64  -> max 0.64 (clipped)
    #   old 0.0, v 0.1, R 0.3: inside the range, both 0.04         -> 0.04 (not counted as clipped)
    # loss = 0.5 * (0.25 + 0.64 + 0.04) / 3 = 0.155; clip_frac 1/3
    values = t64([[1.5, 1.5, 0.1, 7.0]]).requires_grad_()
    old, ret = t64([[1.0, 1.0, 0.0, -7.0]]), t64([[1.0, 2.0, 0.3, float("inf")]])
    mask = torch.tensor([[1, 1, 1, 0]])
    out = clipped_value_loss(values, old, ret, mask, clip_range=0.2)
    assert out.loss.item() == pytest.approx(0.155, abs=1e-14)
    assert out.clip_frac.item() == pytest.approx(1 / 3, abs=1e-15)
    out.loss.backward()
    # d/dv of 0.5 (v-R)² / 3 = (v-R) / 3 on unclipped tokens; the clipped one and the pad get 0
    assert torch.allclose(values.grad, t64([[0.5 / 3, 0.0, -0.2 / 3, 0.0]]), atol=1e-14, rtol=0)


def test_aggregate_modes_by_hand_on_ragged_rows():
    x = t64([[1.0, 2.0, 3.0], [4.0, 100.0, float("nan")]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    assert aggregate(x, mask, "token").item() == 2.5  # (1+2+3+4) / 4
    assert aggregate(x, mask, "sequence").item() == 3.0  # (2 + 4) / 2
    assert aggregate(x, mask, "constant", max_len=4).item() == 1.25  # 10 / (2 * 4)
    with pytest.raises(ValueError, match="max_len"):
        aggregate(x, mask, "constant")
    with pytest.raises(ValueError, match="aggregation"):
        aggregate(x, mask, "mean")
    # the surrogate uses the same aggregation: at ratio 1 its loss is minus the aggregated advantage
    zeros = torch.zeros(2, 3, dtype=f64)
    assert clipped_surrogate(zeros, zeros, x, mask, 0.2, agg="sequence").loss.item() == -3.0
    assert clipped_surrogate(zeros, zeros, x, mask, 0.2, agg="constant", max_len=4).loss.item() == -1.25


# ---- GRPO advantages -------------------------------------------------------------------------------


def test_group_advantages_by_hand_with_a_zero_spread_group():
    rewards = t64([1.0, 0.0, 0.0, 0.7, 0.7, 0.7])
    # group 0: mean 1/3, deviations 2/3, -1/3, -1/3; unbiased std sqrt((4/9 + 1/9 + 1/9) / 2) = sqrt(1/3)
    # group 1: all 0.7 -> advantages exactly 0, flagged
    std = math.sqrt(1 / 3)
    adv, zero = group_advantages(rewards, group_size=3)
    want = [2 / 3 / (std + 1e-4), -1 / 3 / (std + 1e-4), -1 / 3 / (std + 1e-4), 0.0, 0.0, 0.0]
    assert torch.allclose(adv, t64(want), atol=1e-14, rtol=0)
    assert torch.equal(adv[3:], torch.zeros(3, dtype=f64))
    assert zero.tolist() == [False, True]
    # Dr. GRPO: reward minus the group mean, no scaling
    adv, zero = group_advantages(rewards, group_size=3, scale_by_std=False)
    assert torch.allclose(adv, t64([2 / 3, -1 / 3, -1 / 3, 0.0, 0.0, 0.0]), atol=1e-15, rtol=0)
    assert zero.tolist() == [False, True]
    with pytest.raises(ValueError, match="groups of 4"):
        group_advantages(rewards, group_size=4)
    with pytest.raises(ValueError, match="at least 2"):
        group_advantages(rewards, group_size=1)


# ---- diagnostics -----------------------------------------------------------------------------------


def test_explained_variance_perfect_mean_and_undefined():
    returns = t64([[1.0, 2.0, 4.0, 99.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    assert explained_variance(returns.clone(), returns, mask).item() == 1.0
    mean = (1.0 + 2.0 + 4.0) / 3
    assert explained_variance(torch.full_like(returns, mean), returns, mask).item() == pytest.approx(0.0, abs=1e-15)
    assert explained_variance(returns, torch.ones_like(returns), mask).isnan()


def test_entropy_from_logits():
    V = 50
    assert entropy_from_logits(torch.zeros(V, dtype=f64)).item() == pytest.approx(math.log(V), abs=1e-14)
    assert entropy_from_logits(torch.full((V,), 1e4, dtype=f64)).item() == pytest.approx(math.log(V), abs=1e-10)
    peaked = torch.zeros(2, V)
    peaked[:, 3] = 100.0
    h = entropy_from_logits(peaked)
    assert h.shape == (2,) and torch.isfinite(h).all() and (h.abs() < 1e-6).all()
    torch.manual_seed(0)
    logits = torch.randn(3, 4, V, dtype=f64) * 2
    h = entropy_from_logits(logits)
    for i in range(3):
        for j in range(4):
            row = logits[i, j].tolist()
            z = sum(math.exp(v) for v in row)
            want = -sum(math.exp(v) / z * math.log(math.exp(v) / z) for v in row)
            assert h[i, j].item() == pytest.approx(want, abs=1e-12)


# ---- KL coefficient --------------------------------------------------------------------------------


def test_adaptive_kl_controller_by_hand():
    c = AdaptiveKLController(init_coef=0.1, target=6.0, horizon=10_000)
    c.update(8.0, n_steps=256)  # error 8/6 - 1 = 0.333 -> clipped to 0.2: x (1 + 0.2*256/10000) = 1.00512
    assert c.value == pytest.approx(0.1 * 1.00512, rel=1e-14)
    c.update(6.6, n_steps=256)  # error 0.1: x 1.00256
    assert c.value == pytest.approx(0.1 * 1.00512 * 1.00256, rel=1e-14)
    c.update(0.0, n_steps=512)  # error -1 -> clipped to -0.2: x (1 - 0.2*512/10000) = 0.98976
    assert c.value == pytest.approx(0.1 * 1.00512 * 1.00256 * 0.98976, rel=1e-14)
    # resume: a fresh controller loads the state and continues identically
    d = AdaptiveKLController(init_coef=0.5, target=6.0, horizon=10_000)
    d.load_state_dict(c.state_dict())
    c.update(7.0, 64)
    d.update(7.0, 64)
    assert d.value == c.value
    for bad in ({"target": 0.0}, {"target": -1.0}, {"horizon": 0}):
        with pytest.raises(ValueError, match="target|horizon"):
            AdaptiveKLController(**{"init_coef": 0.1, "target": 6.0, "horizon": 10_000, **bad})


def test_fixed_kl_controller_never_moves():
    c = FixedKLController(0.05)
    c.update(100.0, 1000)
    assert c.value == 0.05
    d = FixedKLController(0.0)
    d.load_state_dict(c.state_dict())
    assert d.value == 0.05
