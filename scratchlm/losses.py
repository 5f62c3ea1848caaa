"""Loss math shared across stages, as pure functions tested against hand computations.

So far: the language-model loss fused with the output head (`linear_cross_entropy`) and the
mixture-of-experts router losses. Later stages add theirs here (Bradley-Terry, DPO, PPO clip,
GAE, GRPO advantages, KL estimators).
"""

from __future__ import annotations

import torch


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
