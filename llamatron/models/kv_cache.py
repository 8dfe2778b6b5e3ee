"""A key/value cache for incremental decoding, shared by the families (gpt-fast's `KVCache` with
`input_pos`, made one object for every layer so that the models stay plain modules: it is passed to
`model(tokens, cache=cache)` and only then used).

A batch of prompts of different lengths is left-padded onto one slot axis: row b's tokens occupy
slots pad[b], pad[b]+1, ..., so each forward writes the same slots in every row (the whole prompts
first, then one token per row per step). Slot s of row b holds the token at position s - pad[b] of
its sequence; a query attends to the keys of its row's real slots up to its own (a padding query
sees itself only, so that its softmax is defined: nothing reads its output). The positions and the
mask are what each family turns into its own position encoding (rotary angles, learned positions,
relative-position buckets from query and key positions).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


class LayerKV:
    """The keys and values of one attention layer, [batch, capacity, heads, head_dim], allocated at
    the first write from the shape the layer gives (its local heads under tensor parallelism)."""

    def __init__(self, cache: "KVCache"):
        self.cache = cache
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def mask(self) -> torch.Tensor:
        return self.cache.mask

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write this forward's k, v [batch, n, heads, head_dim] into their slots; return the keys and
        values of every slot written so far, [batch, length, heads, head_dim]."""
        c = self.cache
        if self.k is None:
            shape = (k.shape[0], c.capacity, *k.shape[2:])
            self.k, self.v = k.new_zeros(shape), v.new_zeros(shape)
        self.k[:, c.start : c.length] = k
        self.v[:, c.start : c.length] = v
        return self.k[:, : c.length], self.v[:, : c.length]


class KVCache:
    """Every layer's keys and values for a left-padded batch (`pad[b]` padding slots before row b's
    first token) of at most `capacity` slots. A model's forward calls `advance(n)` once for its n new
    tokens per row, then hands each block `layer(name)`."""

    def __init__(self, pad: Sequence[int] | torch.Tensor, capacity: int, device=None):
        self.pad = torch.as_tensor(pad, dtype=torch.long, device=device)
        self.capacity = capacity
        self.start = self.length = 0  # the slots of the current forward: start..length-1
        self._layers: dict[str, LayerKV] = {}

    def layer(self, name: str) -> LayerKV:
        if name not in self._layers:
            self._layers[name] = LayerKV(self)
        return self._layers[name]

    def advance(self, n: int) -> None:
        """The next forward's n tokens per row take the next n slots: sets `positions` [batch, n] (of
        the new tokens), `key_positions` [batch, length] (of every slot), `mask` [batch, 1, n,
        length] (True: may attend) and `real` [batch, n] (True: a new token, not padding)."""
        if self.length + n > self.capacity:
            raise ValueError(f"KV cache of {self.capacity} slots: {self.length} filled, {n} more do not fit")
        self.start, self.length = self.length, self.length + n
        slots = torch.arange(self.length, device=self.pad.device)
        self.key_positions = (slots[None, :] - self.pad[:, None]).clamp(min=0)
        self.positions = self.key_positions[:, self.start :]
        real = slots[None, :] >= self.pad[:, None]  # [batch, length]
        self.real = real[:, self.start :]
        query = slots[self.start :, None]
        self.mask = ((real[:, None, :] & (slots[None, :] <= query)) | (slots[None, :] == query))[:, None]

    def keep(self, rows: Sequence[int]) -> None:
        """Only these rows (indices into the current batch, in this order) go on decoding."""
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.pad.device)
        self.pad = self.pad[index]
        for kv in self._layers.values():
            if kv.k is not None:
                kv.k, kv.v = kv.k[index], kv.v[index]
