"""Native sparse attention (Yuan et al., DeepSeek 2025, "Native Sparse Attention"): the Llama blocks, with
an attention in which each query reads its past three ways and mixes them by learned gates.

    compressed   blocks of l keys (values), a new block every d positions, each squeezed to one key (value)
                 by a small MLP over the block plus a learned position-in-block embedding; a query attends
                 over the compressed blocks that lie wholly in its past
    selected     the past cut into blocks of l' tokens; each block's importance is the compressed attention
                 probability of the compressed blocks overlapping it, summed over the query heads of a
                 key/value group (the group shares its choice); the query attends in full, causally, to the
                 top n blocks, the first block and its own always among them
    window       the latest w tokens (itself included)

    out = g_cmp · attn_cmp + g_slc · attn_slc + g_win · attn_win,   g = sigmoid(W_g x) per head and branch

Every branch is causal. The three branches share one key and value projection (the paper gives each its
own); the compression MLPs read the keys after RoPE, their position-in-block embedding says where in the
block each key sat. Ties in importance (blocks no compressed block has reached yet score 0) go to the
earlier block, by a stable sort, so the cached and uncached paths choose alike.

Plain PyTorch for reading, not speed: every branch is a masked softmax over all past positions, so
training costs O(T²) like dense attention, and the masks are built at token level. Decoding reads the
ordinary KV cache's raw (rotated) keys through `KVCache.store` and recomputes every compressed block
from them each step: O(S/d · l·D·D) more work per token and layer for a past of S tokens, where a fast
implementation would cache the compressed keys too. The cache's rows are left-padded, so keys are first
shifted to position order; positions, not slots, define the blocks.

Shapes: B batch, T queries, P key positions, H heads, H_kv key/value heads, D head dim, N blocks.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from scratchlm.config.model import NSAConfig
from scratchlm.errors import UserError
from scratchlm.model.layers import DocumentMask, RoPE, repeat_kv
from scratchlm.model.llama import Llama, TransformerBlock


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor,
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(QKᵀ/√D) V over the allowed keys. q (B, H, T, D); k, v (B, H_kv, S, D); allowed broadcasts to
    (B, H, T, S). A query with no key allowed gets zeros. Returns the output and the weights (B, H, T, S)."""
    rep = q.size(1) // k.size(1)
    k, v = repeat_kv(k, rep), repeat_kv(v, rep)
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.size(-1))
    weights = F.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)  # empty rows: 0
    return weights @ v, weights


class BlockCompress(nn.Module):
    """φ: a block of l keys (or values) (..., l, D) -> one (..., D): an MLP over the block's l·D numbers,
    each key plus a learned embedding of its place in the block."""

    def __init__(self, block: int, dim: int) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(block, dim))
        self.fc1 = nn.Linear(block * dim, dim)
        self.fc2 = nn.Linear(dim, dim)

    def forward(self, blocks: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1((blocks + self.pos).flatten(-2))))


class SparseAttention(nn.Module):
    def __init__(self, cfg: NSAConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head or cfg.n_head
        self.head_dim = D = cfg.n_embd // cfg.n_head
        self.wq = nn.Linear(cfg.n_embd, self.n_head * D, bias=cfg.bias)
        self.wk = nn.Linear(cfg.n_embd, self.n_kv_head * D, bias=cfg.bias)
        self.wv = nn.Linear(cfg.n_embd, self.n_kv_head * D, bias=cfg.bias)
        self.wo = nn.Linear(self.n_head * D, cfg.n_embd, bias=False)
        self.compress_k = BlockCompress(cfg.nsa_cmp_block, D)
        self.compress_v = BlockCompress(cfg.nsa_cmp_block, D)
        self.gate = nn.Linear(cfg.n_embd, 3 * self.n_head)  # per head: compressed, selected, window
        self.cmp_block, self.cmp_stride = cfg.nsa_cmp_block, cfg.nsa_cmp_stride
        self.sel_block, self.n_selected, self.window = cfg.nsa_sel_block, cfg.nsa_n_selected, cfg.nsa_window
        self.record = False  # keep the last forward's choices and gates (for `scratchlm viz nsa`)
        self.selected: torch.Tensor | None = None  # recorded (B, H_kv, T, N_sel) chosen blocks
        self.gates: torch.Tensor | None = None  # recorded (B, H, T, 3): compressed, selected, window

    # -- the three branches, over keys in position order (index p = position p) --------------------------

    def compressed(self, q, k, v, q_pos):
        """-> output (B, H, T, D), probabilities (B, H, T, N_cmp), block starts (N_cmp,)."""
        l, d, P = self.cmp_block, self.cmp_stride, k.size(2)
        n = (P - l) // d + 1 if P >= l else 0
        starts = torch.arange(n, device=q.device) * d
        if n == 0:
            B, H, T, _ = q.shape
            return torch.zeros_like(q), q.new_zeros(B, H, T, 0), starts
        span = (n - 1) * d + l
        kb = k[:, :, :span].unfold(2, l, d).transpose(-1, -2)  # (B, H_kv, N_cmp, l, D)
        vb = v[:, :, :span].unfold(2, l, d).transpose(-1, -2)
        allowed = (starts + l - 1)[None, None, :] <= q_pos[:, :, None]  # the whole block is in the past
        out, probs = masked_attention(q, self.compress_k(kb), self.compress_v(vb), allowed[:, None])
        return out, probs, starts

    def choose_blocks(self, probs, starts, q_pos, P):
        """(B, H_kv, T, N_sel) bool: the selection blocks each key/value group attends in full."""
        B, H, T, _ = probs.shape
        ls = self.sel_block
        n_sel = -(-P // ls)
        blocks = torch.arange(n_sel, device=probs.device)
        overlap = ((starts[None, :] < (blocks[:, None] + 1) * ls)
                   & (starts[None, :] + self.cmp_block > blocks[:, None] * ls))  # (N_sel, N_cmp)
        group = probs.view(B, self.n_kv_head, H // self.n_kv_head, T, -1).sum(2)  # (B, H_kv, T, N_cmp)
        importance = group @ overlap.T.to(group.dtype)  # (B, H_kv, T, N_sel)
        candidate = (blocks * ls)[None, None, :] <= q_pos[:, :, None]  # (B, T, N_sel): begun by then
        forced = (blocks == 0)[None, None, :] | (blocks[None, None, :] == (q_pos // ls)[:, :, None])
        score = importance.masked_fill(forced[:, None], float("inf")).masked_fill(~candidate[:, None], float("-inf"))
        order = score.argsort(dim=-1, descending=True, stable=True)  # ties: the earlier block
        rank = torch.empty_like(order).scatter_(-1, order, blocks.expand_as(order))
        return (rank < self.n_selected) & candidate[:, None]

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, x: torch.Tensor, q_pos: torch.Tensor,
               ) -> torch.Tensor:
        """q (B, H, T, D) and k, v (B, H_kv, P, D) rotated, key p at position p; q_pos (B, T); x (B, T, C)
        for the gates -> (B, H, T, D)."""
        B, H, T, _ = q.shape
        P = k.size(2)
        pos = torch.arange(P, device=q.device)
        causal = pos[None, None, :] <= q_pos[:, :, None]  # (B, T, P)
        o_cmp, probs, starts = self.compressed(q, k, v, q_pos)
        chosen = self.choose_blocks(probs, starts, q_pos, P)  # (B, H_kv, T, N_sel)
        if self.record:
            self.selected = chosen.detach()
        by_token = chosen[..., pos // self.sel_block] & causal[:, None]  # (B, H_kv, T, P)
        o_slc, _ = masked_attention(q, k, v, repeat_kv(by_token, H // self.n_kv_head))
        in_window = causal & (q_pos[:, :, None] - pos[None, None, :] < self.window)
        o_win, _ = masked_attention(q, k, v, in_window[:, None])
        g = torch.sigmoid(self.gate(x)).view(B, T, H, 3).permute(0, 2, 1, 3)  # (B, H, T, 3)
        if self.record:
            self.gates = g.detach()
        return g[..., 0:1] * o_cmp + g[..., 1:2] * o_slc + g[..., 2:3] * o_win

    def forward(self, x: torch.Tensor, rope: RoPE, positions: torch.Tensor | None, layer: int, cache,
                doc_mask: DocumentMask | None) -> torch.Tensor:
        if doc_mask is not None:
            raise UserError("arch=nsa cannot train on packed documents (its blocks count positions of one "
                            "sequence)", fix="train without packing (sft.pack=false)")
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H_kv, T, D)
        v = self.wv(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        if cache is not None:
            positions = cache.positions(T)  # (B, T)
        q, k = rope(q, positions), rope(k, positions)
        if cache is not None:  # every slot so far, shifted left by each row's padding: index = position
            keys, values, pad = cache.store(layer, k, v)  # (B, H_kv, S, D), (B,)
            S = keys.size(2)
            idx = (pad[:, None] + torch.arange(S, device=x.device)).clamp(max=S - 1)  # past a row's end: unread
            idx = idx[:, None, :, None].expand_as(keys)
            k, v = keys.gather(2, idx), values.gather(2, idx)
        y = self.attend(q, k, v, x, positions.expand(B, T))
        return self.wo(y.transpose(1, 2).reshape(B, T, self.n_head * self.head_dim))


class NSABlock(TransformerBlock):
    def __init__(self, cfg: NSAConfig) -> None:
        super().__init__(cfg)
        self.attention = SparseAttention(cfg)


class NSATransformer(Llama):
    """Llama with `SparseAttention` in every block. Its cached keys never move: `rotary` is None, so the sink
    cache (which re-places keys) is refused, and the context ends at block_size."""

    def __init__(self, cfg: NSAConfig) -> None:
        super().__init__(cfg)
        self.layers = nn.ModuleList(NSABlock(cfg) for _ in range(cfg.n_layer))
        self.init_weights()

    @property
    def rotary(self) -> RoPE | None:
        return None
