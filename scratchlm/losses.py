"""Loss math shared across stages, as pure functions tested against hand computations.

So far:
- `linear_cross_entropy`: the language-model loss fused with the output head, chunked over rows.
- `load_balancing_loss`, `router_z_loss`, `routing_entropy`: mixture-of-experts router losses
  (Switch Transformer, Fedus et al. 2021; ST-MoE, Zoph et al. 2022).
- `multi_token_loss`: next-token loss + weighted mean of multi-token prediction depths (DeepSeek-V3).
- `sequence_logprobs` / `linear_sequence_logprobs`: a response's summed (or mean) token
  log-probability from logits / from hidden states and the head weight, the input of DPO.
- `bradley_terry_loss`: the reward model's pairwise loss (Bradley & Terry 1952; InstructGPT,
  Ouyang et al. 2022), with Llama 2's per-pair margin (Touvron et al. 2023) and the centering term
  of Eisenstein et al. 2023.
- `dpo_loss`: DPO (Rafailov et al. 2023), its label-smoothed "conservative" variant (Mitchell
  2023) and IPO (Azar et al. 2023), per pair, with the implicit rewards to log.
Later stages add theirs here (PPO clip, GAE, GRPO advantages, KL estimators).

Left out: the other DPO-family losses (hinge, KTO, ORPO, SimPO, ...); the caller averages the
per-pair DPO losses, so gradient accumulation can weigh micro-batches as it needs.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Switch Transformer / GShard auxiliary loss: E * sum_e f_e * P_e.

    probs (N, E): the router's softmax over experts per token. experts (N, k): the chosen
    experts. f_e is the fraction of the N*k routing assignments that went to expert e, P_e the
    mean router probability of e. It is 1 when routing is uniform and grows as load concentrates;
    gradients flow through P (f comes from a discrete top-k). (HF Mixtral's version is k times
    this value: it does not divide the assignments by k.)
    """
    N, k = experts.shape
    f = torch.bincount(experts.flatten(), minlength=n_experts).to(probs.dtype) / (N * k)  # (E,)
    P = probs.mean(0)  # (E,)
    return n_experts * (f * P).sum()


def router_z_loss(logits: torch.Tensor) -> torch.Tensor:
    """ST-MoE's z-loss: mean over tokens of logsumexp(router logits)^2, which keeps the logits
    small so the router's softmax stays numerically stable (Zoph et al. 2022). logits: (N, E)."""
    return torch.logsumexp(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1).pow(2).mean()


def routing_entropy(probs: torch.Tensor) -> torch.Tensor:
    """Mean entropy (nats) of the router's distribution per token; ln E = undecided, 0 = certain."""
    return -(probs * probs.clamp_min(1e-12).log()).sum(-1).mean()


def multi_token_loss(main: torch.Tensor, depths: list[torch.Tensor], weight: float) -> torch.Tensor:
    """DeepSeek-V3's objective with multi-token prediction: the next-token loss plus `weight` x the mean
    of the D prediction depths' cross-entropies, main + weight / D * sum_k L_k. No depths or weight 0:
    the next-token loss alone."""
    if not depths or weight == 0:
        return main
    return main + weight * torch.stack(depths).mean()


def chunk_rows(vocab: int) -> int:
    """Rows per chunk of the fused loss: 512, fewer only when a chunk's logits would pass 256 MB.
    Measured on CPU: with fewer rows the chunk's weight-gradient matmul (K = rows) gets slow."""
    return max(64, min(512, (64 << 20) // max(vocab, 1)))


def fusable_head(head) -> bool:
    """Whether an output head can go through `linear_cross_entropy`: a plain bias-free nn.Linear
    (a LoRA-wrapped or quantized head runs the ordinary way)."""
    return type(head) is torch.nn.Linear and head.bias is None


def _fused_chunks(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int, chunk: int,
                  want_x: bool, want_w: bool) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """(mean CE, d loss/dx or None, d loss/dweight or None) of x (N, C) @ weight (V, C).T against
    targets (N,), one chunk of rows at a time. The gradients cost two of the three matmuls, so they
    are computed only when asked for."""
    kind = x.device.type
    # The matmuls run in autocast's dtype when it is on (as F.linear would); the softmax and the
    # sums in fp32, or in float64 for float64 inputs (so a float64 check of an invariant is exact).
    dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
    acc = torch.promote_types(dtype, torch.float32)
    w = weight.to(dtype)  # (V, C)
    valid = targets != ignore_index  # (N,)
    n_valid = valid.sum()
    scale = 1.0 / n_valid.clamp(min=1).to(acc)
    total = torch.zeros((), dtype=acc, device=x.device)
    grad_x = torch.empty_like(x) if want_x else None  # (N, C)
    grad_w = torch.zeros(weight.shape, dtype=acc, device=weight.device) if want_w else None  # (V, C)
    # One logits buffer for every chunk, and no other (rows, V) temporaries: fresh vocab-sized
    # allocations cost page faults on CPU, which showed as much as the matmuls themselves.
    buf = torch.empty(min(chunk, x.size(0)), w.size(0), dtype=dtype, device=x.device)  # (rows, V)
    with torch.autocast(kind, enabled=False):
        for s in range(0, x.size(0), chunk):
            xc, tc, vc = x[s : s + chunk].to(dtype), targets[s : s + chunk], valid[s : s + chunk]
            n = xc.size(0)
            logits = torch.mm(xc, w.t(), out=buf[:n]).to(acc)  # (n, V); a copy only when dtype != acc
            safe = tc.clamp(min=0)[:, None]  # ignored rows point at class 0; masked below
            picked = logits.gather(1, safe)[:, 0]  # (n,) logit of the target
            peak = logits.amax(-1)  # (n,)
            e = logits.sub_(peak[:, None]).exp_()  # exp(logit - max), written over the logits
            sum_e = e.sum(-1)  # (n,)
            vf = vc.to(acc)
            total += ((peak + sum_e.log() - picked) * vf).sum()  # logsumexp - target logit
            if not (want_x or want_w):
                continue
            # d(mean CE)/d logits = (softmax - onehot) / n_valid on valid rows, 0 on ignored ones
            row = vf * scale  # (n,)
            g = e.mul_((row / sum_e)[:, None])
            g.scatter_add_(1, safe, -row[:, None])
            g = g.to(dtype)  # (n, V)
            if want_x:
                gx = grad_x[s : s + n]
                if gx.dtype == dtype:
                    torch.mm(g, w, out=gx)
                else:
                    gx.copy_(g @ w)
            if want_w:
                if dtype == acc:
                    grad_w.addmm_(g.t(), xc)
                else:
                    grad_w += (g.t() @ xc).to(acc)
    loss = torch.where(n_valid > 0, total * scale, torch.full_like(total, float("nan")))
    return loss, grad_x, grad_w.to(weight.dtype) if want_w else None


class _LinearCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of (x @ weight.T) against targets, without ever holding the (N, V) logits.

    The gradient of mean CE with respect to the logits is known in closed form,
    (softmax(logits) - onehot(target)) / n_valid, so each chunk of rows computes its logits, its
    loss and that gradient, then turns it straight into its share of grad_x (chunk @ weight) and
    grad_weight (chunkᵀ @ x), and drops the logits. Backward only scales those by the incoming
    gradient. Memory falls from N x V logits (plus their softmax and its gradient) to one chunk,
    and the vocab-sized buffers that cost page faults and memory bandwidth are gone.

    Computing the gradients in forward is only right when a backward will follow: autograd calls
    forward with `needs_input_grad` set from `requires_grad` even under `torch.no_grad()`, so
    `linear_cross_entropy` takes the loss-only path itself when grad mode is off. The saved
    gradients are constants, so there is no second derivative (create_graph=True gives gradients
    without a graph, and differentiating them again fails loudly).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                chunk: int) -> torch.Tensor:
        # x (N, C), weight (V, C), targets (N,) -> scalar loss; a frozen head: needs_input_grad[1] False
        loss, grad_x, grad_w = _fused_chunks(x, weight, targets, ignore_index, chunk, *ctx.needs_input_grad[:2])
        ctx.save_for_backward(grad_x, grad_w)
        return loss

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        grad_x, grad_w = ctx.saved_tensors
        gx = grad_x * grad_out.to(grad_x.dtype) if grad_x is not None else None
        gw = grad_w * grad_out.to(grad_w.dtype) if grad_w is not None else None
        return gx, gw, None, None, None


def linear_cross_entropy(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -1,
                         chunk: int | None = None) -> torch.Tensor:
    """F.cross_entropy(x @ weight.T, targets, ignore_index=ignore_index) (mean over the targets not
    ignored; nan if all are), computed chunk by chunk without the (N, V) logits. x: (..., C),
    weight: (V, C), targets: same leading shape as x. See `_LinearCrossEntropy`. Under
    `torch.no_grad()` / inference mode, or when neither input requires grad, only the loss is computed."""
    x2, t2 = x.reshape(-1, x.size(-1)), targets.reshape(-1)
    chunk = chunk or chunk_rows(weight.size(0))
    if not (torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)):
        return _fused_chunks(x2, weight, t2, ignore_index, chunk, False, False)[0]
    return _LinearCrossEntropy.apply(x2, weight, t2, ignore_index, chunk)


def _per_row(token_values: torch.Tensor, rows: torch.Tensor, n_rows: int, average: bool) -> torch.Tensor:
    """Sum (or mean) of the counted tokens' values (n,) into their rows (n_rows,); `rows` (n,)
    names each token's row. An empty row sums to 0 and averages to nan."""
    total = torch.zeros(n_rows, dtype=token_values.dtype, device=token_values.device).index_add(0, rows, token_values)
    if not average:
        return total
    count = torch.bincount(rows, minlength=n_rows).to(total.dtype)  # (n_rows,)
    return total / count


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, *, average: bool = False) -> torch.Tensor:
    """Per row, the sum (or, with `average`, the mean over counted tokens) of log p(target) under
    softmax(logits). logits (B, T, V), targets (B, T) already aligned with the logits (position t
    scores targets[:, t]), -1 = not counted (prompt and padding) -> (B,).

    The log-softmax runs in fp32 (float64 for float64 logits), on the counted positions only: a
    bf16 log-probability summed over a response is off by whole nats, and prompt positions would
    only cost memory. A row with no counted token gives 0 (nan with `average`)."""
    B = logits.size(0)
    keep = (targets != -1).flatten().nonzero()[:, 0]  # (n,) counted positions of the B*T
    acc = torch.promote_types(logits.dtype, torch.float32)
    picked = logits.flatten(0, 1)[keep].to(acc)  # (n, V)
    tok = picked.log_softmax(-1).gather(1, targets.flatten()[keep, None])[:, 0]  # (n,)
    return _per_row(tok, keep // targets.size(1), B, average)


def _token_logprobs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) of x (n, C) @ weight (V, C).T for targets (n,): the matmul in the input's (or
    autocast's) dtype, the log-softmax in fp32 or float64."""
    logits = F.linear(x, weight)  # (n, V)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return logits.log_softmax(-1).gather(1, targets[:, None])[:, 0]


def linear_sequence_logprobs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                             average: bool = False, chunk: int | None = None) -> torch.Tensor:
    """`sequence_logprobs(x @ weight.T, targets, average=average)` without the (B, T, V) logits.
    x (B, T, C) hidden states after the final norm, weight (V, C) a bias-free head (see
    `fusable_head`), targets (B, T) with -1 = not counted -> (B,).

    The counted positions go through the head `chunk` rows at a time (`chunk_rows` by default).
    When a gradient is wanted each chunk is checkpointed: forward keeps no logits, and backward
    recomputes one chunk's logits at a time (one extra head matmul per chunk, the price of the
    memory). Simpler than `linear_cross_entropy`'s closed-form gradient, which does not carry
    over: here each row's log-probability gets its own incoming gradient, known only in backward."""
    B = x.size(0)
    keep = (targets != -1).flatten().nonzero()[:, 0]  # (n,)
    xs, ts = x.flatten(0, 1)[keep], targets.flatten()[keep]  # (n, C), (n,)
    chunk = chunk or chunk_rows(weight.size(0))
    grad = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    parts = [checkpoint(_token_logprobs, xs[s : s + chunk], weight, ts[s : s + chunk], use_reentrant=False)
             if grad else _token_logprobs(xs[s : s + chunk], weight, ts[s : s + chunk])
             for s in range(0, xs.size(0), chunk)]
    tok = torch.cat(parts) if parts else x.new_zeros(0, dtype=torch.promote_types(x.dtype, torch.float32))  # (n,)
    return _per_row(tok, keep // targets.size(1), B, average)


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Reward-model loss over pairs: mean of -log σ(r_c - r_r - margin), plus
    center_coef * mean((r_c + r_r)²). All inputs (B,) -> scalar.

    -log σ is the negative log-likelihood of the Bradley-Terry preference model (as in InstructGPT),
    computed with logsigmoid, which stays finite for any gap. The optional per-pair margin (Llama 2)
    asks for a wider gap on pairs rated far apart. The loss sees only differences, so rewards may
    drift as a whole; the centering term (Eisenstein et al. 2023, "center_rewards_coefficient" in
    TRL, which suggests 0.01) pulls each pair's sum, hence the rewards, towards zero."""
    if center_coef < 0:
        raise ValueError(f"center_coef must be >= 0, got {center_coef}")
    gap = r_chosen - r_rejected if margin is None else r_chosen - r_rejected - margin  # (B,)
    loss = -F.logsigmoid(gap).mean()
    if center_coef:
        loss = loss + center_coef * (r_chosen + r_rejected).pow(2).mean()
    return loss


class DPOOutput(NamedTuple):
    """Per pair (B,): the loss to average, and the implicit rewards β·(log π - log π_ref) of the
    chosen and rejected responses with their margin (detached: for logging and accuracy)."""

    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, kind: Literal["sigmoid", "ipo"] = "sigmoid",
             label_smoothing: float = 0.0) -> DPOOutput:
    """Direct preference optimisation from sequence log-probabilities, all (B,): the policy's and
    the reference's log p(response | prompt) for the chosen and the rejected response.

    With h = (π_c - ref_c) - (π_r - ref_r), the policy's gain in log-ratio of chosen over rejected:
    - "sigmoid" (Rafailov et al. 2023): -log σ(βh). With label_smoothing ε, the conservative DPO
      of Mitchell 2023, which assumes a fraction ε of the labels flipped:
      -(1-ε) log σ(βh) - ε log σ(-βh).
    - "ipo" (Azar et al. 2023): (h - 1/(2β))², a squared loss that targets a finite gap rather
      than pushing h to infinity. As in the paper and TRL, the caller passes length-averaged
      log-probabilities (`sequence_logprobs(..., average=True)`) for IPO, summed ones for sigmoid.
    At policy == reference (h = 0) the sigmoid loss is log 2 and IPO's 1/(4β²).

    The reference's log-probabilities are constants: they are detached here, so a reference
    computed with gradients on still sends none into its model."""
    if beta <= 0:
        raise ValueError(f"dpo beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo label_smoothing must be in [0, 0.5), got {label_smoothing}")
    if kind not in ("sigmoid", "ipo"):
        raise ValueError(f"dpo loss kind must be 'sigmoid' or 'ipo', got {kind!r}")
    if kind == "ipo" and label_smoothing:
        raise ValueError("dpo label_smoothing applies to the sigmoid loss only; set it to 0 for ipo")
    chosen = policy_chosen - ref_chosen.detach()  # (B,) log-ratio of the chosen response
    rejected = policy_rejected - ref_rejected.detach()  # (B,)
    h = chosen - rejected  # (B,)
    if kind == "ipo":
        losses = (h - 1.0 / (2.0 * beta)).pow(2)
    else:
        losses = -(1.0 - label_smoothing) * F.logsigmoid(beta * h)
        if label_smoothing:
            losses = losses - label_smoothing * F.logsigmoid(-beta * h)
    chosen_rewards, rejected_rewards = beta * chosen.detach(), beta * rejected.detach()
    return DPOOutput(losses, chosen_rewards, rejected_rewards, chosen_rewards - rejected_rewards)
