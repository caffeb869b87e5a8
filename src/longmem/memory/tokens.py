"""Token ids of the text a memory has read, by absolute position (for the copy head).

The bank stores keys/values and positions; the copy head (``pointer: true``) also needs
to know *which token* sits at a retrieved position and which one follows it. A ring of
the last ``span`` token ids per row answers that: ``lookup(positions)`` gives the id at
each position, or -1 where it is unknown (older than the ring, not yet read, or a memory
restored without its ids).
"""

from __future__ import annotations

import torch

UNKNOWN = -1


class TokenLog:
    """Per-row ring of the last ``span`` token ids read, indexed by absolute position."""

    def __init__(self, batch_size: int, span: int):
        self.span = span
        self.ids = torch.full((batch_size, span), UNKNOWN, dtype=torch.int32)  # [B,S] id at pos % S
        self.end = torch.zeros(batch_size, dtype=torch.long)  # [B] position after the last id noted

    def note(self, ids: torch.Tensor, positions: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        """Record ids [B,T] at absolute positions [B,T] (valid [B,T] bool: which to record)."""
        for row in range(ids.shape[0]):
            keep = slice(None) if valid is None else valid[row]
            pos, tok = positions[row][keep], ids[row][keep]
            if pos.numel() == 0:
                continue
            pos, tok = pos[-self.span :], tok[-self.span :]
            self.ids[row, pos % self.span] = tok.to(torch.int32)
            self.end[row] = max(int(self.end[row]), int(pos.max()) + 1)

    def lookup(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B,...] -> token ids [B,...] (int64; -1 where unknown)."""
        b = positions.shape[0]
        flat = positions.reshape(b, -1)
        ids = self.ids.gather(1, (flat % self.span).clamp_min(0)).long()  # [B,N]
        end = self.end[:, None]
        known = (flat >= 0) & (flat < end) & (flat >= end - self.span)
        return torch.where(known, ids, torch.full_like(ids, UNKNOWN)).view(positions.shape)

    def reset(self, rows: list[int] | None = None) -> None:
        rows = range(self.ids.shape[0]) if rows is None else rows
        for row in rows:
            self.ids[row] = UNKNOWN
            self.end[row] = 0

    def nbytes(self) -> int:
        return self.ids.numel() * self.ids.element_size()
