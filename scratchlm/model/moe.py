"""Mixture-of-experts: the Llama-family decoder with routed SwiGLU experts in place of some FFNs.

Each MoE layer sends every token to `n_active_experts` (k) of `n_experts` (E) expert FFNs and
sums their outputs weighted by the router (Shazeer et al. 2017; Switch, GShard, Mixtral), plus
optional shared experts every token passes through (DeepSeek-MoE). Parameters grow with E, the
compute per token only with k: that is the whole point, so the dispatch is written to make cost
follow the *active* parameters:

1. route: router logits (N, E) -> top-k experts and weights per token (N, k);
2. sort the N*k assignments by expert, so each expert's tokens are one contiguous block;
3. run all experts at once as grouped matrix products over those blocks (`torch._grouped_mm`
   with a hand-written backward; a loop over the E experts where it is unavailable): no Python
   loop over tokens, no padding to the largest expert. Each expert's gate and up projections are
   one (C, 2H) matrix, so one product makes both, and `swiglu` combines the halves in one pass;
4. scale each output row by its routing weight and `index_add_` it back to its token.

Routers: "softmax" (softmax over experts, top-k, optionally renormalised: Mixtral) and "sigmoid"
(per-expert sigmoid scores; selection adds a per-expert bias that is nudged after each optimizer
step toward balance, with no gradient and no auxiliary loss: DeepSeek-V3). The bias moves by the
load of every training micro-batch since the last optimizer step, so gradient accumulation does not
change it (1x4 and 4x1 micro-batches of the same tokens move it alike). Capacity: dropless
by default; otherwise each expert takes at most capacity_factor * N * k / E assignments per
batch and the overflow is dropped (the token keeps its residual), with the dropped fraction
logged. Losses: the Switch load-balancing loss and the ST-MoE router z-loss (scratchlm/losses.py)
are added to the cross-entropy with their coefficients (`aux_loss`); the balance loss weighs 0.01 by
default with the softmax router and 0 with the aux-loss-free sigmoid one (`balance_loss_coef`; an
explicit `aux_loss_coef` is honoured with either, e.g. DeepSeek-V3's tiny complementary one).
Hybrid stacks: `moe_first_dense` dense layers first, then every `moe_every`-th layer is MoE.
DeepSeek-V3's group-limited routing (`expert_groups`, `topk_groups`: a token's experts come from its
best groups only) and `routed_scale` (the routed weights times a constant) are options of either router.

Shapes: N = B*T tokens, C model width, E experts, k active, H expert hidden, M kept assignments.
Tensor names carry their shape letters where it helps (w2_EHC: (E, H, C)).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config import MoEConfig
from scratchlm.errors import UserError
from scratchlm.losses import load_balancing_loss, router_z_loss, routing_entropy
from scratchlm.model.layers import DocumentMask
from scratchlm.model.llama import FeedForward, Llama, ffn_hidden

_HAS_GROUPED_MM = hasattr(torch, "_grouped_mm")


class _SwiGLU(torch.autograd.Function):
    """silu(a) * b for h = [a | b] (M, 2H) -> (M, H), with a hand-written backward: autograd's
    version of the two ops keeps more (M, H) temporaries alive and makes one more pass over them,
    which showed up at several percent of an MoE training step on CPU."""

    @staticmethod
    def forward(ctx, h: torch.Tensor) -> torch.Tensor:
        a, b = h.chunk(2, dim=-1)
        ctx.save_for_backward(h)
        return F.silu(a).mul_(b)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        (h,) = ctx.saved_tensors
        a, b = h.chunk(2, dim=-1)
        out = torch.empty_like(h)  # (M, 2H): [d/da | d/db]
        grad_a, grad_b = out.chunk(2, dim=-1)
        sig = torch.sigmoid(a)
        torch.mul(a, sig, out=grad_b).mul_(grad)  # d/db = silu(a) * grad
        torch.mul(grad, b, out=grad_a).mul_(sig)  # d/da = grad * b * sig * (1 + a * (1 - sig))
        grad_a.mul_(sig.neg_().add_(1).mul_(a).add_(1))
        return out


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """h (..., 2H) = [gate | up] -> silu(gate) * up (..., H)."""
    return _SwiGLU.apply(h)


class _GroupedMM(torch.autograd.Function):
    """y[rows of group g] = x[rows of group g] @ w[g], groups given by cumulative row offsets.

    A hand-written backward because the built-in one fails on CPU for some gradient layouts (a
    stride-0 gradient, e.g. from `y.sum()`); it is also no slower."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, w: torch.Tensor, offs: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(x, w, offs)
        return torch._grouped_mm(x, w, offs=offs)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, w, offs = ctx.saved_tensors
        grad_x = torch._grouped_mm(grad, w.transpose(-2, -1), offs=offs)  # (M, C)
        grad_w = torch._grouped_mm(x.t(), grad, offs=offs)  # (E, C, H): x_g^T @ grad_g per group
        return grad_x, grad_w, None


def grouped_mm(x: torch.Tensor, w: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """x (M, C) sorted by group, w (G, C, H), counts (G,) rows per group -> (M, H)."""
    supported = (x.device.type == "cpu" and x.dtype == torch.float32) or (x.is_cuda and x.dtype == torch.bfloat16)
    aligned = (w.size(1) * x.element_size()) % 16 == 0 and (w.size(2) * x.element_size()) % 16 == 0  # kernel rule
    if _HAS_GROUPED_MM and x.dtype == w.dtype and supported and aligned:
        offs = counts.cumsum(0).to(torch.int32)
        return _GroupedMM.apply(x, w, offs)
    bounds = [0, *counts.cumsum(0).tolist()]
    return torch.cat([x[bounds[g] : bounds[g + 1]] @ w[g].to(x.dtype) for g in range(w.size(0))])


def check_moe_config(cfg: MoEConfig) -> None:
    if cfg.n_experts < 1:
        raise UserError(f"model.n_experts={cfg.n_experts} must be at least 1")
    if not 1 <= cfg.n_active_experts <= cfg.n_experts:
        raise UserError(f"model.n_active_experts={cfg.n_active_experts} must be between 1 and "
                        f"model.n_experts={cfg.n_experts}", fix="lower the top-k or add experts")
    if not cfg.dropless and cfg.capacity_factor <= 0:
        raise UserError(f"model.capacity_factor={cfg.capacity_factor} must be > 0",
                        fix="use e.g. 1.25, or --model.dropless=true")
    if cfg.n_shared_experts < 0 or cfg.n_shared_experts > cfg.n_experts:
        raise UserError(f"model.n_shared_experts={cfg.n_shared_experts} must be between 0 and "
                        f"model.n_experts={cfg.n_experts}")
    if cfg.router not in ("softmax", "sigmoid"):
        raise UserError(f"model.router={cfg.router!r} is unknown", fix="use softmax or sigmoid")
    if cfg.moe_every < 1 or cfg.moe_first_dense < 0 or cfg.moe_first_dense >= cfg.n_layer:
        raise UserError(f"model.moe_every={cfg.moe_every} / model.moe_first_dense={cfg.moe_first_dense} leave no "
                        f"MoE layer among {cfg.n_layer}", fix="moe_every >= 1 and moe_first_dense < n_layer")


def balance_loss_coef(cfg: MoEConfig) -> float:
    """The load-balancing loss weight: `aux_loss_coef` when set, else 0.01 for the softmax router and
    0 for the sigmoid router, which balances by its selection bias instead (aux-loss-free)."""
    if cfg.aux_loss_coef is not None:
        return cfg.aux_loss_coef
    return 0.0 if cfg.router == "sigmoid" else 0.01


def expert_hidden(cfg: MoEConfig) -> int:
    return cfg.expert_hidden or max(ffn_hidden(cfg) // cfg.n_active_experts, 1)


def is_moe_layer(cfg: MoEConfig, i: int) -> bool:
    return i >= cfg.moe_first_dense and (i - cfg.moe_first_dense) % cfg.moe_every == 0


class MoELayer(nn.Module):
    def __init__(self, cfg: MoEConfig) -> None:
        super().__init__()
        E, C, H = cfg.n_experts, cfg.n_embd, expert_hidden(cfg)
        self.n_experts, self.k = E, cfg.n_active_experts
        self.router_kind, self.norm_topk = cfg.router, cfg.router_norm_topk
        self.groups, self.topk_groups, self.routed_scale = cfg.expert_groups, cfg.topk_groups, cfg.routed_scale
        self.capacity = None if cfg.dropless else cfg.capacity_factor
        self.gate = nn.Linear(C, E, bias=False)
        self.w13_EC2H = nn.Parameter(torch.empty(E, C, 2 * H))  # [gate | up] projections, all experts
        self.w2_EHC = nn.Parameter(torch.empty(E, H, C))  # down projections
        shared = cfg.n_shared_experts
        self.shared = FeedForward(_with_hidden(cfg, shared * H)) if shared else None
        # sigmoid router: selection bias per expert, moved by `update_bias`, never by gradients
        self.register_buffer("select_bias", torch.zeros(E), persistent=True)
        # assignments per expert summed over the training forwards since the last bias update (E,)
        self.register_buffer("step_load", torch.zeros(E), persistent=False)
        self.bias_rate = cfg.bias_update_rate
        self.stats: dict[str, torch.Tensor] = {}
        self.aux: dict[str, torch.Tensor] = {}

    def route(self, x_NC: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> weights (N, k), experts (N, k), router logits (N, E), routing probabilities (N, E)."""
        logits_NE = self.gate(x_NC)
        logits_NE = logits_NE.to(torch.promote_types(logits_NE.dtype, torch.float32))  # fp32, float64 kept
        if self.router_kind == "softmax":
            probs_NE = logits_NE.softmax(-1)
            weights, experts = self.limit_groups(probs_NE).topk(self.k, dim=-1)
            if self.topk_groups and self.topk_groups < self.groups:
                weights = probs_NE.gather(1, experts)
        else:
            scores_NE = torch.sigmoid(logits_NE)
            # the bias picks, never weighs
            experts = self.limit_groups(scores_NE + self.select_bias).topk(self.k, dim=-1).indices
            weights = scores_NE.gather(1, experts)
            probs_NE = scores_NE / scores_NE.sum(-1, keepdim=True)
        if self.norm_topk or self.router_kind == "sigmoid":
            weights = weights / weights.sum(-1, keepdim=True)
        if self.routed_scale != 1.0:
            weights = weights * self.routed_scale
        return weights, experts, logits_NE, probs_NE

    def limit_groups(self, select_NE: torch.Tensor) -> torch.Tensor:
        """Group-limited routing (DeepSeek-V3): the experts form `groups` equal groups, each scored by the sum
        of its two highest selection scores (its one, for groups of one); outside the `topk_groups` best
        groups the scores become -inf, so the top-k picks within them. Unchanged when every group is allowed."""
        G, kg = self.groups, self.topk_groups
        if not kg or kg >= G:
            return select_NE
        N, E = select_NE.shape
        grouped = select_NE.view(N, G, E // G)
        group_scores = grouped.topk(min(2, E // G), dim=-1).values.sum(-1)  # (N, G)
        keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, group_scores.topk(kg, dim=-1).indices,
                                                                         True)
        return grouped.masked_fill(~keep[:, :, None], float("-inf")).view(N, E)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        x_NC = x.reshape(-1, C)
        N, E, k = x_NC.size(0), self.n_experts, self.k
        weights_Nk, experts_Nk, logits_NE, probs_NE = self.route(x_NC)

        flat = experts_Nk.flatten()  # (N*k,) assignment a belongs to token a // k
        order = flat.argsort(stable=True)  # assignments grouped by expert, token order kept inside
        counts = torch.bincount(flat, minlength=E)  # (E,)
        if self.capacity is not None:
            cap = math.ceil(self.capacity * N * k / E)
            starts = counts.cumsum(0) - counts  # first sorted slot of each expert
            rank = torch.arange(N * k, device=x.device) - starts[flat[order]]  # place within its expert
            order = order[rank < cap]
            counts = counts.clamp(max=cap)
        token = order // k  # (M,) source token of each kept assignment
        xs_MC = x_NC.index_select(0, token)  # (index_select's backward is index_add_, cheaper than indexing's)
        h_MH = swiglu(grouped_mm(xs_MC, self.w13_EC2H, counts))  # (M, 2H) -> (M, H)
        ys_MC = grouped_mm(h_MH, self.w2_EHC, counts) * weights_Nk.flatten().index_select(0, order)[:, None].to(x.dtype)
        out_NC = torch.zeros_like(x_NC).index_add_(0, token, ys_MC)
        if self.shared is not None:
            out_NC = out_NC + self.shared(x_NC)

        self.aux = {"balance": load_balancing_loss(probs_NE, experts_Nk, E), "z": router_z_loss(logits_NE)}
        training = self.training and torch.is_grad_enabled()  # a training micro-batch, not validation
        with torch.no_grad():
            load = torch.bincount(flat, minlength=E)
            self.stats = {"load": load.float(), "kept": counts.float(),
                          "entropy": routing_entropy(probs_NE), "dropped": 1.0 - order.numel() / (N * k)}
            if training:
                self.step_load += load
        return out_NC.view(B, T, C)

    @torch.no_grad()
    def update_bias(self) -> None:
        """DeepSeek-V3's aux-loss-free balancing: raise the selection bias of under-loaded experts,
        lower it for over-loaded ones, by a fixed step, after each optimizer step. The load is the
        whole step's (every micro-batch of a gradient-accumulation step), then starts again."""
        load = self.step_load
        if self.router_kind == "sigmoid" and load.sum() > 0:
            self.select_bias += self.bias_rate * torch.sign(load.mean() - load)
        load.zero_()


def _with_hidden(cfg: MoEConfig, hidden: int) -> MoEConfig:
    from dataclasses import replace

    return replace(cfg, ffn_hidden=hidden)


class MoE(Llama):
    """Llama blocks whose feed-forward is a `MoELayer` where `is_moe_layer` says so."""

    def __init__(self, cfg: MoEConfig) -> None:
        check_moe_config(cfg)
        super().__init__(cfg)
        for i, block in enumerate(self.layers):
            if is_moe_layer(cfg, i):
                block.feed_forward = MoELayer(cfg)
        self.init_weights()

    def init_weights(self) -> None:
        super().init_weights()
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layer)
        for m in self.modules():
            if isinstance(m, MoELayer):
                nn.init.normal_(m.w13_EC2H, 0.0, 0.02)
                nn.init.normal_(m.w2_EHC, 0.0, resid_std)  # writes into the residual stream
                m.select_bias.zero_()

    def moe_layers(self) -> list[tuple[int, MoELayer]]:
        return [(i, b.feed_forward) for i, b in enumerate(self.layers) if isinstance(b.feed_forward, MoELayer)]

    def forward(self, idx, targets=None, *, cache=None, doc_mask: DocumentMask | None = None, last_only: bool = False):
        logits, loss = super().forward(idx, targets, cache=cache, doc_mask=doc_mask, last_only=last_only)
        if loss is not None:
            loss = loss + self.aux_loss()
        return logits, loss

    def aux_loss(self) -> torch.Tensor:
        """The router losses of the last forward: balance and z-loss of every MoE layer, weighted.
        The training loop reads it to average these per micro-batch while it weights the
        cross-entropy by each micro-batch's token count."""
        c = self.config
        coef = balance_loss_coef(c)
        return sum(coef * layer.aux["balance"] + c.z_loss_coef * layer.aux["z"] for _, layer in self.moe_layers())

    def after_optimizer_step(self) -> None:
        for _, layer in self.moe_layers():
            layer.update_bias()

    def routing_metrics(self) -> dict[str, float]:
        """Per MoE layer: load (assignments) per expert, max/mean balance, entropy, dropped fraction."""
        out: dict[str, float] = {}
        for i, layer in self.moe_layers():
            s = layer.stats
            if not s:
                continue
            load = s["load"]
            out[f"moe/layer_{i}/balance"] = (load.max() / load.mean().clamp_min(1e-9)).item()
            out[f"moe/layer_{i}/entropy"] = s["entropy"].item()
            out[f"moe/layer_{i}/dropped"] = float(s["dropped"])
            for e, n in enumerate(load.tolist()):
                out[f"moe/layer_{i}/load_{e}"] = n
        return out

    def num_params(self, non_embedding: bool = True) -> int:
        return sum(p.numel() for p in self.parameters())

    def active_params(self) -> int:
        """Parameters one token uses: all but the (E - k) experts it is not routed to, per MoE layer."""
        c = self.config
        per_expert = 3 * c.n_embd * expert_hidden(c)
        return self.num_params() - len(self.moe_layers()) * (c.n_experts - c.n_active_experts) * per_expert

    def flops_per_token(self, seq_len: int | None = None) -> float:
        return self.transformer_flops(self.active_params(), seq_len)  # the experts a token uses
