"""RecentCache: the short-term tier of a memory — the last R tokens read, at every layer.

The chunk bank holds one layer's keys/values of old text; this tier holds the keys/values
of *every* backbone layer for the most recent R tokens (a Transformer-XL-style cache of
the previous segment), plus the document's first ``sinks`` tokens, which rotary models
use as attention sinks. The next segment attends to them directly, so nearby text is
seen exactly, as in a sliding window, without recomputing it. Tokens leaving the tier
move into the chunk bank (their memory-layer entries, held here until then).

Cache slot layout (rotary positions): sinks at [0, S), recent tokens at [S, S+R), and
the segment being read at [S+R, S+R+T). After a segment every entry shifts back by T.
Keys are stored already rotated to their slot position.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longmem.devices import canonical


@dataclass
class Evicted:
    """Memory-layer entries of tokens that left the short-term tier (to go to the bank)."""

    keys: torch.Tensor  # [B,Hkv,N,Dh] pre-rotary
    values: torch.Tensor  # [B,Hkv,N,Dh]
    positions: torch.Tensor  # [B,N] absolute positions
    keep: torch.Tensor  # [B,N] True = store in the bank
    search: torch.Tensor | None  # [B,Hkv,N,Dh] keys rotated for search, or None


class RecentCache:
    """Per-row short-term tier; see the module docstring."""

    def __init__(
        self, batch_size: int, num_layers: int, num_kv_heads: int, head_dim: int, recent: int, sinks: int,
        dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
    ):
        b, n, h, d = batch_size, num_layers, num_kv_heads, head_dim
        self.batch_size, self.num_layers, self.num_kv_heads, self.head_dim = b, n, h, d
        self.recent, self.sinks, self.dtype = recent, sinks, dtype
        self.device = canonical(device)
        with self.device:  # every tensor made here is on the tier's device
            self._new_state(b, n, h, d, sinks + recent)

    def _new_state(self, b: int, n: int, h: int, d: int, p: int) -> None:
        recent, dtype = self.recent, self.dtype
        self.keys = torch.zeros(n, b, h, p, d, dtype=dtype)  # [L,B,Hkv,P,Dh] rotated to slot positions
        self.values = torch.zeros(n, b, h, p, d, dtype=dtype)
        self.valid = torch.zeros(b, p, dtype=torch.bool)  # [B,P]
        self.held_keys = torch.zeros(b, h, recent, d, dtype=dtype)  # [B,Hkv,R,Dh] memory layer, pre-rotary
        self.held_values = torch.zeros(b, h, recent, d, dtype=dtype)
        self.held_search = torch.zeros(b, h, recent, d, dtype=dtype)
        self.held_positions = torch.zeros(b, recent, dtype=torch.long)  # [B,R]
        self.held_keep = torch.zeros(b, recent, dtype=torch.bool)  # [B,R]

    @property
    def slots(self) -> int:
        """P = S + R cache slots per row and layer; the segment starts at position P."""
        return self.sinks + self.recent

    def is_empty(self) -> bool:
        return not bool(self.valid.any())

    def nbytes(self) -> int:
        tensors = (self.keys, self.values, self.valid, self.held_keys, self.held_values, self.held_search,
                   self.held_positions, self.held_keep)
        return sum(t.numel() * t.element_size() for t in tensors)

    def layer(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Keys, values [B,Hkv,P,Dh] and valid [B,P] of one backbone layer."""
        return self.keys[index], self.values[index], self.valid

    def push(
        self,
        layer_keys: torch.Tensor,
        layer_values: torch.Tensor,
        valid: torch.Tensor,
        shift_rope,
        mem_keys: torch.Tensor,
        mem_values: torch.Tensor,
        positions: torch.Tensor,
        keep: torch.Tensor,
        search: torch.Tensor | None,
    ) -> Evicted:
        """Add a segment of T tokens; return the memory-layer entries that leave the tier.

        layer_keys/values [L,B,Hkv,T,Dh] (keys rotated at slot positions P..P+T-1),
        valid/keep/positions [B,T], mem_keys/values/search [B,Hkv,T,Dh].
        shift_rope(x, d) rotates keys x [...,N,Dh] back by d positions.
        """
        s, r, t = self.sinks, self.recent, layer_keys.shape[3]
        starts = positions[:, 0] == 0  # rows whose document starts here: their first S tokens are sinks
        if s and bool(starts.any()):
            sink_k = shift_rope(layer_keys[:, starts, :, :s].float(), s + r).to(self.dtype)  # slot P -> 0
            self.keys[:, starts, :, :s] = sink_k
            self.values[:, starts, :, :s] = layer_values[:, starts, :, :s].to(self.dtype)
            self.valid[starts, :s] = valid[starts, :s]
        # the recent tier: last R of [old recent (R) ; segment (T)], everything shifted back by T
        all_k = torch.cat([self.keys[:, :, :, s:], layer_keys.to(self.dtype)], dim=3)  # [L,B,Hkv,R+T,Dh]
        all_v = torch.cat([self.values[:, :, :, s:], layer_values.to(self.dtype)], dim=3)
        all_valid = torch.cat([self.valid[:, s:], valid], dim=1)  # [B,R+T]
        self.keys[:, :, :, s:] = shift_rope(all_k[:, :, :, -r:].float(), t).to(self.dtype)
        self.values[:, :, :, s:] = all_v[:, :, :, -r:]
        self.valid[:, s:] = all_valid[:, -r:]
        # memory-layer entries: the first T of [held (R) ; segment (T)] leave, the last R stay
        dt = self.dtype
        k = torch.cat([self.held_keys, mem_keys.to(dt)], dim=2)  # [B,Hkv,R+T,Dh]
        v = torch.cat([self.held_values, mem_values.to(dt)], dim=2)
        pos = torch.cat([self.held_positions, positions], dim=1)  # [B,R+T]
        kp = torch.cat([self.held_keep, keep], dim=1)
        se = torch.cat([self.held_search, search.to(dt)], dim=2) if search is not None else None
        out = Evicted(k[:, :, :t], v[:, :, :t], pos[:, :t], kp[:, :t], se[:, :, :t] if se is not None else None)
        self.held_keys, self.held_values = k[:, :, t:].clone(), v[:, :, t:].clone()
        self.held_positions, self.held_keep = pos[:, t:].clone(), kp[:, t:].clone()
        if se is not None:
            self.held_search = se[:, :, t:].clone()
        self.valid[:, s:] &= self.held_positions >= s  # a sink is not seen twice
        return out

    def reset(self, rows: list[int] | None = None) -> None:
        """Empty the tier of the given rows (all rows when None)."""
        idx = slice(None) if rows is None else torch.tensor(rows, dtype=torch.long, device=self.device)
        self.valid[idx] = False
        self.held_keep[idx] = False

    def forget(self, gone) -> None:
        """Hide every entry whose absolute position ``gone`` marks (positions [B,N] -> bool [B,N]): recent slots,
        the memory-layer entries they hold for the bank, and sinks (positions 0..S-1)."""
        hit = gone(self.held_positions)  # [B,R] aligned with the recent slots S..S+R-1
        self.held_keep &= ~hit
        self.valid[:, self.sinks :] &= ~hit
        if self.sinks:
            sinks = torch.arange(self.sinks, device=self.device)[None].expand(self.batch_size, -1)  # [B,S]
            self.valid[:, : self.sinks] &= ~gone(sinks)

    def state(self) -> dict[str, torch.Tensor]:
        """All tensors, for saving (names are stable)."""
        return {"keys": self.keys, "values": self.values, "valid": self.valid, "held_keys": self.held_keys,
                "held_values": self.held_values, "held_search": self.held_search,
                "held_positions": self.held_positions, "held_keep": self.held_keep}

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            current = getattr(self, name)
            if current.shape != value.shape or current.dtype != value.dtype:
                raise ValueError(f"recent.{name}: {tuple(value.shape)} {value.dtype}, expected "
                                 f"{tuple(current.shape)} {current.dtype}")
            setattr(self, name, value.to(self.device, copy=True))
