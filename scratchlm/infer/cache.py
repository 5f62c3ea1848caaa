"""The cache protocol: what a model and the engine may ask of any inference cache.

A model does not know how its past is stored. During a cached forward it asks the cache

    positions(T)                    (B, T) position ids of the T new tokens, per row
    attend(layer, q, k, v, rope)    attention of the new queries over the row's past and the new keys
    state(layer) / set_state(...)   a layer's recurrent state (B, ...), for layers that keep one
                                    instead of keys and values (an SSM's scan state); None until set
    advance(T)                      after its last layer: the T tokens are now part of the past

and the engine, between forwards, asks it

    room()                          new tokens the next forward may add
    lengths()                       (B,) tokens each row holds: rows may differ (left padding)
    select_rows(rows)               rows leave the batch (they finished)
    join(other)                     rows join a running batch: `other`, a cache of the same kind and model
                                    prefilled apart, is appended as new rows (continuous batching)
    truncate(lengths)               each row rolls back to an earlier length (speculative decoding
                                    rejects drafted tokens; the next forward re-writes those slots)

`KVCache` (kv_cache.py) and `SinkCache` (sink_cache.py) implement it; each refuses, with a reason,
what its layout cannot do (a rolling window cannot regrow evicted tokens). Recurrent states are kept
here, for every cache alike: they have a batch dimension first, so leaving and joining are an index
and a concatenation; they cannot be rolled back (a scan state has no earlier length to return to
without a snapshot), so `truncate` refuses a cache that holds one.

Shapes: L layers, B batch, H_kv key/value heads, S slots, T new tokens, D head dim.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

Rope = Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None


class Cache:
    """The base of the caches: the protocol above, the recurrent states and memory accounting. A subclass
    holds `k` and `v` of shape (L, B, H_kv, S, D) and implements the key/value operations."""

    k: torch.Tensor
    v: torch.Tensor

    def __init__(self) -> None:
        self.states: dict[int, torch.Tensor] = {}  # layer -> recurrent state (B, ...)

    # -- asked by the model during a forward --------------------------------------------------------

    def positions(self, T: int) -> torch.Tensor:
        raise NotImplementedError

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: Rope) -> torch.Tensor:
        raise NotImplementedError

    def advance(self, T: int) -> None:
        raise NotImplementedError

    def state(self, layer: int) -> torch.Tensor | None:
        """This layer's recurrent state (B, ...), or None before the first forward sets it."""
        return self.states.get(layer)

    def set_state(self, layer: int, value: torch.Tensor) -> None:
        if value.size(0) != self.batch:
            raise ValueError(f"a state of {value.size(0)} rows does not fit a batch of {self.batch}")
        self.states[layer] = value

    # -- asked by the engine between forwards -------------------------------------------------------

    @property
    def batch(self) -> int:
        return self.k.size(1)

    def room(self) -> int:
        raise NotImplementedError

    def lengths(self) -> torch.Tensor:
        raise NotImplementedError

    def select_rows(self, rows: torch.Tensor) -> None:
        """Keep only these rows (B',), in this order."""
        rows = rows.to(self.k.device)
        self.states = {layer: s[rows] for layer, s in self.states.items()}
        self._select_kv(rows)

    def join(self, other: Cache) -> None:
        """Append other's rows after this cache's own."""
        (L, _, H, _, D), (L2, _, H2, _, D2) = self.k.shape, other.k.shape
        if type(other) is not type(self) or (L, H, D, self.k.dtype) != (L2, H2, D2, other.k.dtype):
            raise ValueError(f"join needs a {type(self).__name__} of the same model and dtype: layers, kv heads, "
                             f"head dim {L, H, D} vs {L2, H2, D2}")
        if other.states.keys() != self.states.keys():
            raise ValueError(f"the caches hold recurrent states for different layers: "
                             f"{sorted(self.states)} vs {sorted(other.states)}")
        self._join_kv(other)
        self.states = {layer: torch.cat([s, other.states[layer]]) for layer, s in self.states.items()}

    def truncate(self, lengths: torch.Tensor | list[int]) -> None:
        """Roll each row back to `lengths[b]` tokens (<= what it holds now)."""
        if self.states:
            raise ValueError("a recurrent state cannot be rolled back to an earlier length")
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=self.k.device)
        now = self.lengths()
        if lengths.shape != now.shape or bool((lengths > now).any()) or bool((lengths < 0).any()):
            raise ValueError(f"truncate takes one length per row, each between 0 and the row's own "
                             f"{now.tolist()}; got {lengths.tolist()}")
        self._truncate_kv(lengths)

    def _select_kv(self, rows: torch.Tensor) -> None:
        raise NotImplementedError

    def _join_kv(self, other: Cache) -> None:
        raise NotImplementedError

    def _truncate_kv(self, lengths: torch.Tensor) -> None:
        raise NotImplementedError

    # -- memory -------------------------------------------------------------------------------------

    @property
    def nbytes(self) -> int:
        states = sum(s.nelement() * s.element_size() for s in self.states.values())
        return self.k.nelement() * self.k.element_size() * 2 + states

    def bytes_per_token(self) -> int:
        """Cache memory one token (slot) costs: 2 (K and V) x layers x kv heads x head dim x element size."""
        L, B, H, S, D = self.k.shape
        return 2 * L * H * D * self.k.element_size()
