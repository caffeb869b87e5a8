"""What a copy head needs of the text a memory has read: token ids and match keys, by position.

The bank stores keys/values and positions for attention; the copy head (``pointer: true``)
also needs to know *which token* sits at an earlier position and which one follows it, and
to find the earlier positions whose context looks like the current one. A ring of the last
``span`` tokens per row keeps both: their ids, and their match keys (pre-rotary keys of the
copy head's early ``copy_layer``, unit length, bf16) — in a copied passage a token's key is
nearly identical to its source's, because the frozen layer sees the same local context (a
duplicate detector that needs no training). ``lookup(positions)`` gives the id at each
position, or -1 where it is unknown (older than the ring, not yet read, or a memory restored
without its log).
"""

from __future__ import annotations

import torch

from longmem.devices import canonical

UNKNOWN = -1


def _unit(x: torch.Tensor) -> torch.Tensor:
    """x [...,Dh] -> fp32 vectors of unit length (cosine similarity is then a dot product)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-6)


class TokenLog:
    """Per-row ring of the last ``span`` token ids (and match keys) read, indexed by absolute position."""

    def __init__(self, batch_size: int, span: int, num_kv_heads: int = 0, head_dim: int = 0,
                 device: torch.device | str = "cpu"):
        self.span = span
        self.device = on = canonical(device)
        self.ids = torch.full((batch_size, span), UNKNOWN, dtype=torch.int32, device=on)  # [B,S] id at pos % S
        self.end = torch.zeros(batch_size, dtype=torch.long, device=on)  # [B] position after the last id noted
        self.version = 0  # changes with every write (derived indexes are cached per version)
        self._host_end: tuple[int, list[int]] = (0, [0] * batch_size)  # (version, end per row) on the host
        self.keys = (torch.zeros(batch_size, num_kv_heads, span, head_dim, dtype=torch.bfloat16, device=on)
                     if num_kv_heads else None)  # [B,Hkv,S,Dh] unit-length match keys

    def note(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None,
             keys: torch.Tensor | None = None) -> None:
        """Record ids [B,T] (and keys [B,Hkv,T,Dh]) at absolute positions [B,T] (valid [B,T]: which)."""
        ends = list(self.ends())
        self.version += 1
        for row in range(ids.shape[0]):
            keep = torch.ones(ids.shape[1], dtype=torch.bool, device=ids.device) if valid is None else valid[row]
            pos, tok = positions[row][keep][-self.span :], ids[row][keep][-self.span :]
            if pos.numel() == 0:
                continue
            slots = pos.to(self.device) % self.span
            self.ids[row, slots] = tok.to(self.device, torch.int32)
            if self.keys is not None and keys is not None:
                k = keys[row][:, keep][:, -self.span :]  # [Hkv,n,Dh]
                self.keys[row][:, slots] = _unit(k).to(self.device, self.keys.dtype)
            ends[row] = max(ends[row], int(pos.max()) + 1)
            self.end[row] = ends[row]
        self._host_end = (self.version, ends)

    def note_row(self, row: int, ids: torch.Tensor, positions: torch.Tensor, keys: torch.Tensor | None) -> None:
        """Record one row: ids [n], positions [n], keys [Hkv,n,Dh] (e.g. replayed from disk)."""
        ids, positions = ids[-self.span :], positions[-self.span :]  # only the last span can stay
        b, n = self.ids.shape[0], ids.shape[0]
        valid = torch.zeros(b, n, dtype=torch.bool, device=ids.device)
        valid[row] = True
        full_keys = None if keys is None else keys[:, -self.span :][None].expand(b, -1, -1, -1)
        self.note(ids[None].expand(b, n), positions[None].expand(b, n), valid, full_keys)

    def ends(self) -> list[int]:
        """The position after the last id noted, per row, read back from the device once per version."""
        version, ends = self._host_end
        if version != self.version:
            self._host_end = (self.version, ends := self.end.tolist())
        return ends

    @property
    def is_empty(self) -> bool:
        return not any(self.ends())

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B,...] -> token ids [B,...] (int64; -1 where unknown)."""
        return self._lookup(slice(None), positions.reshape(positions.shape[0], -1)).view(positions.shape)

    def lookup_row(self, row: int, positions: torch.Tensor) -> torch.Tensor:
        """One row's ids at positions [...] (int64; -1 where unknown)."""
        return self._lookup(slice(row, row + 1), positions.reshape(1, -1)).view(positions.shape)

    def _lookup(self, rows: slice, flat: torch.Tensor) -> torch.Tensor:
        """The ids of ``rows`` at positions flat [R,N] -> [R,N] (-1 where the ring does not hold them)."""
        ids = self.ids[rows].gather(1, (flat % self.span).clamp_min(0)).long()  # [R,N]
        end = self.end[rows, None]
        known = (flat >= 0) & (flat < end) & (flat >= end - self.span)
        return torch.where(known, ids, torch.full_like(ids, UNKNOWN))

    def keys_at(self, positions: torch.Tensor) -> torch.Tensor | None:
        """positions [B,N] -> the logged match keys [B,Hkv,N,Dh] (zero where unknown; None if no keys)."""
        if self.keys is None:
            return None
        known = self.lookup(positions) >= 0  # [B,N]
        slots = (positions % self.span).clamp_min(0)  # [B,N]
        keys = torch.stack([self.keys[row][:, slots[row]] for row in range(positions.shape[0])])  # [B,Hkv,N,Dh]
        return keys * known[:, None, :, None]

    def match(self, queries: torch.Tensor, k: int, block: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B,Hkv,T,Dh] -> the k most similar logged keys per head: cosine [B,Hkv,T,k] (fp32,
        best first, -inf where fewer are known) and their absolute positions [B,Hkv,T,k] (-1 there).

        Candidates are scored in bf16 (AMX), ``block`` queries at a time, and the k chosen are
        re-scored in fp32 (bf16 cannot tell 0.98 from 0.99 apart reliably).
        """
        b, h, t, d = queries.shape
        k = min(k, self.span)
        q = _unit(queries)  # [B,Hkv,T,Dh]
        on = {"device": self.device}
        slots = torch.arange(self.span, **on)
        sims = torch.full((b, h, t, k), float("-inf"), **on)
        positions = torch.full((b, h, t, k), UNKNOWN, dtype=torch.long, **on)
        for row, end in enumerate(self.ends()):
            base = end - end % self.span  # absolute position of slot 0 in the current lap
            pos = torch.where(slots < end % self.span, base + slots, base - self.span + slots)  # [S] >= end - S
            if end == 0:  # nothing known
                continue
            known = pos >= 0
            keys = self.keys[row]  # [Hkv,S,Dh]
            for a in range(0, t, block):
                qb = q[row, :, a : a + block]  # [Hkv,tb,Dh]
                score = torch.matmul(qb.to(keys.dtype), keys.transpose(-1, -2))  # [Hkv,tb,S] bf16
                idx = score.masked_fill(~known, float("-inf")).topk(k, dim=-1).indices  # [Hkv,tb,k]
                chosen = keys.gather(1, idx.flatten(1)[..., None].expand(-1, -1, d)).view(h, -1, k, d)
                exact = torch.einsum("htd,htkd->htk", qb, chosen.float())  # [Hkv,tb,k]
                exact = exact.masked_fill(~known[idx], float("-inf"))
                order = exact.sort(dim=-1, descending=True)
                sims[row, :, a : a + block] = order.values
                got = pos[idx.gather(-1, order.indices)]
                positions[row, :, a : a + block] = torch.where(order.values > float("-inf"), got, UNKNOWN)
        return sims, positions

    def state(self) -> dict[str, torch.Tensor]:
        """All tensors, for saving (names are stable): ids [B,S], end [B], keys [B,Hkv,S,Dh] if any."""
        out = {"ids": self.ids, "end": self.end}
        return out | ({"keys": self.keys} if self.keys is not None else {})

    def load_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore what ``state`` saved (shapes and dtypes must match this log's)."""
        for name, value in tensors.items():
            current = getattr(self, name)
            if current is None or current.shape != value.shape or current.dtype != value.dtype:
                raise ValueError(f"token_log.{name}: {tuple(value.shape)} {value.dtype} does not fit this log")
            setattr(self, name, value.to(self.device, copy=True))
        self.version += 1

    def reset(self, rows: list[int] | None = None) -> None:
        rows = range(self.ids.shape[0]) if rows is None else rows
        self.version += 1
        for row in rows:
            self.ids[row] = UNKNOWN
            self.end[row] = 0
            if self.keys is not None:
                self.keys[row] = 0

    def forget(self, gone) -> None:
        """Unknow every id (and match key) whose absolute position ``gone`` marks (positions [N] -> bool [N])."""
        for row, end in enumerate(self.ends()):
            pos = torch.arange(max(0, end - self.span), end, device=self.device)  # [S'] what the ring holds
            slots = pos[gone(pos)] % self.span
            self.ids[row, slots] = UNKNOWN
            if self.keys is not None:
                self.keys[row][:, slots] = 0
        self.version += 1

    def nbytes(self) -> int:
        keys = self.keys.numel() * self.keys.element_size() if self.keys is not None else 0
        return self.ids.numel() * self.ids.element_size() + keys
