"""Hogwild! inference: several workers generate at once over one shared KV cache.

Hogwild! Inference (Rodionov et al. 2025) runs a few generation workers on one problem. Each
worker writes its tokens into its own block of a shared cache, and every worker attends to all
blocks, so it reads what the others write as soon as they write it, without waiting or merging.
The blocks sit in a different order for each worker: worker w sees

    [ prompt ][ the other workers' blocks ][ its own block ] <- its next token

so its own text always continues at the end. With RoPE, a key carries its position as a rotation,
and RoPE at position p is a rotation R(p) of each pair of dimensions with R(p + d) = R(d) R(p). So
a block is stored once, its keys rotated as if it started at position 0, and placed at start s in a
worker's view by one more rotation by s (`rerotate`); a scheme's attention scale (YaRN's) is part of
the stored keys and is not applied again. A worker's new keys, rotated at its view's position,
go back to its block rotated by -s.

What is shared is approximate by design: a block's keys and values in layers past the first were
computed with the context its worker saw when writing them, and stay so when other blocks grow or
the block is read at another place (the paper accepts this; the tests check exact equality where it
holds: one layer, or blocks written in the order a view reads them).

Choices and simplifications: workers take turns, one token each, in one process (a real system
runs them as one batch); each turn builds the worker's view as a plain `KVCache`, re-rotating every
block (O(cache) work per token; rotating the few new queries by each block's offset instead would be
cheaper), and the model runs its ordinary cached forward on it, so nothing in the model or the
engine changes; greedy decoding only; no instructions to the workers about each other (the paper
prompts them to collaborate). Only RoPE models: a learned position table fixes a key's position.

Shapes: L layers, H_kv key/value heads, n tokens in a block, D head dim.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from scratchlm.checkpoint.folder import load_model_for_inference
from scratchlm.errors import UserError
from scratchlm.infer.kv_cache import KVCache
from scratchlm.model.layers import RoPE, rotate_half


def rerotate(k: torch.Tensor, rope: RoPE, delta: int | torch.Tensor) -> torch.Tensor:
    """Keys `k` (..., T, D) rotated by `rope` at positions p -> the same keys at p + delta: one more
    rotation by delta (an int, or positions (..., T)). In float64 for float64 keys, else fp32."""
    dtype = torch.float64 if k.dtype == torch.float64 else torch.float32
    delta = torch.as_tensor(delta, dtype=dtype, device=k.device)
    angles = delta[..., None] * rope.inv_freq.to(dtype)  # (..., T, D/2), or (D/2,) for one delta
    emb = torch.cat((angles, angles), dim=-1)
    kf = k.to(dtype)
    return (kf * emb.cos() + rotate_half(kf) * emb.sin()).to(k.dtype)


@dataclass
class Block:
    """A stretch of shared text: its tokens and their keys and values, keys rotated at 0..n-1."""

    tokens: list[int]
    k: torch.Tensor  # (L, H_kv, n, D)
    v: torch.Tensor  # (L, H_kv, n, D)


class SharedCache:
    """Named blocks of keys and values that every worker reads, each placed where its view puts it."""

    def __init__(self, model: nn.Module) -> None:
        shape, rope = model.attention_shape(), model.rotary
        if shape is None or rope is None:
            raise UserError("Hogwild! inference needs a model with RoPE (its keys move by rotation)",
                            fix="use a Llama-family checkpoint")
        self.model, self.rope, self.shape = model, rope, shape
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype
        self.blocks: dict[str, Block] = {}

    def block(self, name: str) -> Block:
        """The block `name`, created empty on first use."""
        if name not in self.blocks:
            empty = torch.zeros(self.shape.n_layer, self.shape.n_kv_head, 0, self.shape.head_dim,
                                device=self.device, dtype=self.dtype)
            self.blocks[name] = Block([], empty, empty.clone())
        return self.blocks[name]

    def view(self, layout: list[str], room: int) -> tuple[KVCache, list[int]]:
        """A one-row KV cache holding the blocks of `layout` in order, each block's keys moved to its
        start there, with `room` free slots after them; and the starts."""
        blocks = [self.block(name) for name in layout]
        starts = [sum(len(b.tokens) for b in blocks[:i]) for i in range(len(blocks))]
        S = starts[-1] + len(blocks[-1].tokens)
        a = self.shape
        cache = KVCache(a.n_layer, 1, a.n_kv_head, a.head_dim, S + room, window=a.window, device=self.device,
                        dtype=self.dtype)
        for b, s in zip(blocks, starts):
            n = len(b.tokens)
            cache.k[:, 0, :, s : s + n] = rerotate(b.k, self.rope, s) if s else b.k
            cache.v[:, 0, :, s : s + n] = b.v
        cache.len = S
        return cache, starts

    @torch.no_grad()
    def step(self, layout: list[str], tokens: list[int]) -> torch.Tensor:
        """The worker whose own block is `layout[-1]` feeds `tokens` after its view of the cache; they
        join its block. Returns the logits (V,) of its next token."""
        cache, starts = self.view(layout, room=len(tokens))
        S = cache.len
        idx = torch.tensor([tokens], device=self.device)
        logits, _ = self.model(idx, cache=cache)
        own = self.block(layout[-1])
        new_k = rerotate(cache.k[:, 0, :, S : S + len(tokens)], self.rope, -starts[-1])  # back to block-local
        own.k = torch.cat([own.k, new_k], dim=2)
        own.v = torch.cat([own.v, cache.v[:, 0, :, S : S + len(tokens)]], dim=2)
        own.tokens += tokens
        return logits[0, -1]


def worker_layout(w: int, workers: int) -> list[str]:
    """What worker w sees: the prompt, the other workers' blocks in order, its own block last."""
    return ["prompt", *(f"worker{o}" for o in range(workers) if o != w), f"worker{w}"]


def hogwild_generate(model: nn.Module, prompt: list[int], headers: list[list[int]], steps: int,
                     vocab_size: int | None = None) -> tuple[list[list[int]], SharedCache]:
    """Workers (one per header, a non-empty token list each starts its block with) generate `steps`
    tokens each greedily, in turns, over one shared cache; `vocab_size`: the tokenizer's, when the
    model's (padded) vocabulary is larger. Returns each worker's tokens and the cache."""
    if not prompt or not all(headers):
        raise UserError("Hogwild! needs a non-empty prompt and a non-empty header per worker",
                        fix="give each worker a header such as 'Alice:'")
    cache = SharedCache(model)
    cache.step(["prompt"], prompt)  # the prompt's keys and values, shared by all; its logits are not needed
    pending = [list(h) for h in headers]  # what each worker feeds next: its header, then its last token
    out: list[list[int]] = [[] for _ in headers]
    for _ in range(steps):
        for w in range(len(headers)):
            logits = cache.step(worker_layout(w, len(headers)), pending[w])
            nxt = int(logits[:vocab_size].argmax())
            out[w].append(nxt)
            pending[w] = [nxt]
    return out, cache


def hogwild_demo(checkpoint: str | Path, prompt: str, headers: tuple[str, ...] = ("Alice:", " Bob:"),
                 steps: int = 20) -> list[str]:
    """Two (or more) workers generate greedily in turns on a Llama-family checkpoint; prints and returns
    each worker's stream."""
    model, tok, _ = load_model_for_inference(checkpoint)
    ids, _ = hogwild_generate(model, tok.encode_ordinary(prompt), [tok.encode_ordinary(h) for h in headers], steps,
                              tok.vocab_size)
    streams = [h + tok.decode(t) for h, t in zip(headers, ids)]
    for w, text in enumerate(streams):
        print(f"worker {w}: {text!r}")
    return streams
