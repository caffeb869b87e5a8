"""Read-only views of a memory bank for contrast training: the same rows, another bank's entries.

A view passes everything (short-term tier, copy head's token log, positions seen) through to the
row's own memory and changes only what chunk retrieval returns:

- ``EmptyBankView``: nothing (the model reads its own tier and log, no long-term bank);
- ``ForeignBankView``: another memory's chunks, placed as if they had been read just before the
  row's own text (their distances from a query are what the same amount of own text would have).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .bank import MemoryBank, Retrieved


class _BankView:
    def __init__(self, own: MemoryBank):
        self._own = own

    def __getattr__(self, name: str):
        return getattr(self._own, name)


class EmptyBankView(_BankView):
    """``own`` with its long-term bank hidden."""

    def retrieve(self, queries: torch.Tensor, num_chunks: int, per_kv_head: bool = False) -> Retrieved | None:
        return None


class ForeignBankView(_BankView):
    """``own``'s tier and token log, ``foreign``'s long-term chunks (both with the same rows)."""

    def __init__(self, own: MemoryBank, foreign: MemoryBank):
        super().__init__(own)
        if foreign.batch_size != own.batch_size:
            raise ValueError(f"foreign memory has {foreign.batch_size} rows, the own memory {own.batch_size}")
        self._foreign = foreign

    def retrieve(self, queries: torch.Tensor, num_chunks: int, per_kv_head: bool = False) -> Retrieved | None:
        """queries [B,H,T,Dh] -> the foreign bank's entries, positions moved to end where the own text does."""
        found = self._foreign.retrieve(queries, num_chunks, per_kv_head)
        if found is None:
            return None
        shift = (self._own.end_position - self._foreign.end_position).view(-1, 1, 1, 1)  # [B,1,1,1]
        return replace(found, positions=found.positions + shift)
