"""The Mamba layer (Gu & Dao 2023, Mamba-1), as the Jamba hybrid uses it, in plain PyTorch.

A selective state space model: each of the D_in channels keeps an N-dimensional state h that
decays and is written to at every step, with a decay and a write strength that depend on the input
("selective": Δ, B and C are computed from x, unlike the time-invariant S4):

    xz = in_proj(u)                    x, z: (B, T, D_in) each, D_in = expand x C
    x  = silu(causal depthwise conv1d(x))             a short local mix over d_conv steps
    Δ_raw, B, C = x_proj(x)            (R,), (N,), (N,) per token, R = dt_rank
    Δ_raw, B, C = RMSNorm each         Jamba's addition (dt_layernorm, b_layernorm, c_layernorm)
    Δ  = softplus(dt_proj(Δ_raw))      (D_in,) per token, a step size per channel
    A  = -exp(A_log)                   (D_in, N), fixed per layer, negative: the state decays
    h_t = exp(Δ_t A) * h_{t-1} + (Δ_t x_t) B_t           (D_in, N) per token: the scan
    y_t = h_t C_t + D * x_t            the read-out, plus a skip through D
    out = out_proj(y * silu(z))        gated by the other half of in_proj

The scan is written twice, and the two are tested equal: `scan_sequential`, a loop over time that
is the recurrence above line by line (the reference; decoding one token is one step of it), and
`scan_chunked`, which cuts the sequence into chunks of L steps and scans all chunks at once with a
log-depth parallel prefix scan (Hillis & Steele 1986: log2(L) rounds, each combining every position
with the one 2^r back by (a, b) ∘ (a', b') = (a a', a' b + b')), then carries the state across chunk
ends in a loop of T/L steps; its backward is the same scan run on the reversed sequence (the
adjoint of a linear recurrence), written by hand. It multiplies decays (each <= 1) and never divides
by one, so it is as stable as the loop. It does T log L work instead of T, in log L + T/L sequential
steps instead of T: it wins where a step's fixed cost dominates (accelerators, small batches, long
sequences: one 512-token sequence, 256 x 16 state, forward + backward on one CPU thread: 58 ms vs the
loop's 256 ms); on a CPU with a batch wide enough to be memory-bound the loop, touching the state once
per step, is as fast or faster (16 x 64 tokens: 90-110 ms vs 130-250 ms). `model.mamba_scan=auto`
picks the chunked scan on accelerators and the loop on CPUs.

Decoding needs no keys and values: the layer's whole past is the conv window (the last d_conv - 1
inputs of the conv) and the scan state h, a constant (B, D_in, d_conv - 1 + N) however long the
context. `forward` takes and returns that state packed in one tensor (conv columns first), which the
model keeps through the cache protocol's `state` / `set_state`. A `keep` mask (B, T) zeroes padding
tokens before the conv and before the scan, so a left-padded row's state is what it would be alone.

Weight names follow HF's Jamba mixer (in_proj, conv1d, x_proj, dt_proj, A_log, D, out_proj and the
three norms), so a converter maps them one to one. Shapes: B batch, T time, C model width, D_in inner
width, N state size, R dt rank, K conv width.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.model.layers import RMSNorm


def scan_sequential(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                    h0: torch.Tensor | None = None,
                    reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The selective scan as a loop over time. x, dt (B, T, D_in); A (D_in, N); B, C (B, T, N);
    h0 (B, D_in, N) or None (zeros); reset (B, T) bool or None: True where the state restarts from zero
    (a packed document's first token). Returns y (B, T, D_in) with y_t = h_t C_t, and the last state h_T."""
    b_, T, d = x.shape
    h = h0 if h0 is not None else x.new_zeros(b_, d, A.size(1))
    ys = []
    for t in range(T):
        decay = torch.exp(dt[:, t, :, None] * A)  # (B, D_in, N)
        if reset is not None:
            decay = decay * ~reset[:, t, None, None]
        h = decay * h + (dt[:, t] * x[:, t])[:, :, None] * B[:, t, None, :]
        ys.append((h * C[:, t, None, :]).sum(-1))  # (B, D_in)
    return torch.stack(ys, 1), h


def _chunked_linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk: int) -> torch.Tensor:
    """Every state of h_t = a_t h_{t-1} + b_t from h0, without autograd: a, b (B, T, D, N), h0 (B, D, N)
    -> h (B, T, D, N). (1) Every chunk of `chunk` steps at once, from a zero state, by a parallel prefix
    scan (Hillis & Steele 1986): round r folds in the partial result 2^r steps back, (a, b) ∘ (a', b')
    = (a a', a' b + b'), so after ceil(log2 L) rounds each step holds the composition of every step of
    its chunk up to it, and its decay since the chunk start; (2) the state entering each chunk, a loop
    over the T/L chunk ends; (3) each step's state = its in-chunk state + its decay x the entering state."""
    Bsz, T, D, N = a.shape
    n = -(-T // chunk)
    pad = n * chunk - T  # padded steps at the end: decay 1, no write; dropped below
    # own copies, updated in place below (the caller's a is saved for the backward)
    a = (F.pad(a, (0, 0, 0, 0, 0, pad), value=1.0) if pad else a.clone()).view(Bsz, n, chunk, D, N)
    b = (F.pad(b, (0, 0, 0, 0, 0, pad)) if pad else b.clone()).view(Bsz, n, chunk, D, N)
    step = 1
    while step < chunk:
        b[:, :, step:] += a[:, :, step:] * b[:, :, :-step]  # the right side is computed before the write
        a[:, :, step:] *= a[:, :, :-step].clone()
        step *= 2
    h = h0
    for c in range(n):  # b[:, c] becomes the chunk's true states once its entering state is added
        b[:, c] += a[:, c] * h[:, None]
        h = b[:, c, -1]
    return b.view(Bsz, n * chunk, D, N)[:, :T]


class _LinearScan(torch.autograd.Function):
    """h = scan(a, b, h0) with a hand-written backward: the gradient of a linear recurrence is the same
    recurrence run backwards, λ_t = g_t + a_{t+1} λ_{t+1} (g = dL/dh), so it is the chunked scan again on
    the reversed sequence; then dL/db_t = λ_t, dL/da_t = λ_t h_{t-1}, dL/dh0 = a_0 λ_0. Autograd through
    the slices of the forward would write a full-size zero gradient per slice and round."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk: int) -> torch.Tensor:
        h = _chunked_linear_scan(a, b, h0, chunk)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk = chunk
        return h

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g: torch.Tensor):
        a, h, h0 = ctx.saved_tensors
        a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], 1)  # a_{t+1}; none after the last step
        lam = _chunked_linear_scan(a_next.flip(1), g.flip(1), torch.zeros_like(h0), ctx.chunk).flip(1)
        h_prev = torch.cat([h0[:, None], h[:, :-1]], 1)
        return lam * h_prev, lam, a[:, 0] * lam[:, 0], None


def scan_chunked(x: torch.Tensor, dt: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor,
                 h0: torch.Tensor | None = None, chunk: int = 16,
                 reset: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`scan_sequential`'s result from every step's decay a_t = exp(Δ_t A) and write b_t = Δ_t x_t B_t
    at once, the recurrence run by `_chunked_linear_scan` (and backwards by `_LinearScan.backward`)."""
    Bsz, T, D = x.shape
    h0 = h0 if h0 is not None else x.new_zeros(Bsz, D, A.size(1))
    if T == 0:
        return x.new_zeros(x.shape), h0
    a = torch.exp(dt[..., None] * A)  # (B, T, D, N) decays
    if reset is not None:
        a = a * ~reset[..., None, None]
    b = (dt * x)[..., None] * B[:, :, None, :]  # (B, T, D, N) writes
    states = _LinearScan.apply(a, b, h0, chunk)
    return torch.einsum("btdn,btn->btd", states, C), states[:, -1]


class Mamba(nn.Module):
    """One selective-SSM mixer: (B, T, C) -> (B, T, C), with its recurrent state in and out."""

    def __init__(self, n_embd: int, d_inner: int, d_state: int = 16, d_conv: int = 4, dt_rank: int = 0,
                 conv_bias: bool = True, proj_bias: bool = False, norm_eps: float = 1e-6, scan: str = "auto",
                 chunk: int = 16) -> None:
        super().__init__()
        self.d_inner, self.d_state, self.d_conv = d_inner, d_state, d_conv
        self.dt_rank = dt_rank or math.ceil(n_embd / 16)
        self.scan, self.chunk = scan, chunk
        self.in_proj = nn.Linear(n_embd, 2 * d_inner, bias=proj_bias)  # [x | z]
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, bias=conv_bias)  # padding done by hand
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)  # [Δ_raw | B | C]
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)
        self.A_log = nn.Parameter(torch.empty(d_inner, d_state))
        self.D = nn.Parameter(torch.empty(d_inner))
        self.out_proj = nn.Linear(d_inner, n_embd, bias=proj_bias)
        self.dt_layernorm = RMSNorm(self.dt_rank, norm_eps)
        self.b_layernorm = RMSNorm(d_state, norm_eps)
        self.c_layernorm = RMSNorm(d_state, norm_eps)

    @torch.no_grad()
    def init_ssm(self, dt_min: float = 1e-3, dt_max: float = 0.1) -> None:
        """Mamba's initialisation of the SSM parameters (the linears are the model's to initialise):
        A_n = -(n + 1) per channel (S4D-real), D = 1, and dt_proj's bias the inverse softplus of step
        sizes drawn log-uniformly in [dt_min, dt_max], so training starts with a spread of memories."""
        n = torch.arange(1, self.d_state + 1, dtype=torch.float32)
        self.A_log.copy_(torch.log(n).expand(self.d_inner, -1))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # softplus⁻¹(dt)

    def forward(self, u: torch.Tensor, state: torch.Tensor | None = None, keep: torch.Tensor | None = None,
                starts: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """u (B, T, C); state (B, D_in, K-1+N) from the previous forward or None (a fresh sequence);
        keep (B, T) bool, False at padding, or None; starts (B, T) bool, True at each packed document's
        first token (the conv and the scan see nothing before it), or None. Returns the output (B, T, C)
        and the new state."""
        Bsz, T, _ = u.shape
        K = self.d_conv
        sdt = torch.promote_types(u.dtype, torch.float32)  # the scan runs in fp32 at least
        x, z = self.in_proj(u).chunk(2, dim=-1)  # (B, T, D_in) each
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)
        if state is None:
            conv_past = x.new_zeros(Bsz, self.d_inner, K - 1)
            h0 = None
        else:
            conv_past, h0 = state[..., : K - 1].to(x.dtype), state[..., K - 1 :]
        window = torch.cat([conv_past, x.transpose(1, 2)], -1)  # (B, D_in, K-1+T)
        if starts is None:
            x = F.conv1d(window, self.conv1d.weight, self.conv1d.bias, groups=self.d_inner).transpose(1, 2)
        else:
            x = self._conv_within_documents(window, starts)
        x = F.silu(x)
        if keep is not None:
            x = x * keep[..., None].to(x.dtype)
        dt_raw, Bm, Cm = self.x_proj(x).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        dt = F.softplus(self.dt_proj(self.dt_layernorm(dt_raw)).to(sdt))  # (B, T, D_in)
        Bm, Cm = self.b_layernorm(Bm).to(sdt), self.c_layernorm(Cm).to(sdt)  # (B, T, N)
        A = -torch.exp(self.A_log.to(sdt))  # (D_in, N)
        xs = x.to(sdt)
        h0 = h0.to(sdt) if h0 is not None else None
        sequential = self.scan == "sequential" or (self.scan == "auto" and u.device.type == "cpu")
        if sequential or T == 1:
            y, h = scan_sequential(xs, dt, A, Bm, Cm, h0, starts)
        else:
            y, h = scan_chunked(xs, dt, A, Bm, Cm, h0, self.chunk, starts)
        y = (y + xs * self.D.to(sdt)).to(u.dtype) * F.silu(z)
        new_state = torch.cat([window[..., window.size(-1) - (K - 1) :].to(sdt), h], -1)  # (B, D_in, K-1+N)
        return self.out_proj(y), new_state

    def _conv_within_documents(self, window: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
        """The causal conv as K shifted products, each input counted only if it belongs to the output
        token's document: window (B, D_in, K-1+T) -> (B, T, D_in)."""
        K, T = self.d_conv, starts.size(1)
        doc = starts.long().cumsum(1)  # (B, T) document number of each token
        doc = F.pad(doc, (K - 1, 0), value=-1)  # the window's past columns: no document of this forward
        w = self.conv1d.weight[:, 0]  # (D_in, K), tap K-1 reads the newest input
        out = 0
        for j in range(K):  # tap j reads the input K-1-j steps back
            same = (doc[:, j : j + T] == doc[:, K - 1 :])[:, None].to(window.dtype)  # (B, 1, T)
            out = out + w[:, j, None] * window[..., j : j + T] * same
        if self.conv1d.bias is not None:
            out = out + self.conv1d.bias[:, None]
        return out.transpose(1, 2)
