"""The frozen model's key/value cache for incremental decoding: HF's DynamicCache, minus a copy per token.

HF's ``DynamicLayer`` concatenates the whole cache on every update. With a 1,024-token
short-term tier ahead of the window that was ~16 ms of each ~45 ms decoded token on
SmolLM2 here (30 layers x keys and values of ~1,300 entries copied per token). A
``GrowingLayer`` writes into preallocated storage (doubled when full) and exposes views
of its filled part, so a decoded token writes only its own entries.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer


class GrowingLayer(DynamicLayer):
    """A DynamicLayer whose ``keys``/``values`` [B,H_kv,n,Dh] are views of storage with room to grow."""

    def __init__(self, capacity: int = 0):
        super().__init__()
        self.capacity = capacity  # entries to allocate at first (more are added by doubling)
        self._store: tuple[torch.Tensor, torch.Tensor] | None = None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """key/value states [B,H_kv,t,Dh] -> every entry so far [B,H_kv,n+t,Dh] (views)."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = self.get_seq_length()
        end = n + key_states.shape[-2]
        if self._store is None or end > self._store[0].shape[-2]:
            room = max(end, 2 * n, self.capacity)
            grown = tuple(x.new_empty(*x.shape[:-2], room, x.shape[-1]) for x in (key_states, value_states))
            if n:
                grown[0][..., :n, :], grown[1][..., :n, :] = self.keys, self.values
            self._store = grown
        keys, values = self._store
        keys[..., n:end, :], values[..., n:end, :] = key_states, value_states
        self.keys, self.values = keys[..., :end, :], values[..., :end, :]
        return self.keys, self.values

    def reset(self) -> None:
        super().reset()
        self._store = None


def growing_cache(config, capacity: int = 0) -> DynamicCache:
    """HF's DynamicCache for ``config`` with every layer a GrowingLayer. A sliding-window layer keeps
    every entry too (its attention mask hides the old ones), so that a short-term tier can be put
    ahead of the window and the window's keys of every layer read back (``DecodeCache.layer_kv``)."""
    cache = DynamicCache(config=config)
    cache.layers = [GrowingLayer(capacity) for _ in cache.layers]
    return cache
