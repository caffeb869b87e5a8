"""Slow, obviously correct twins of the fast paths, used only by the tests."""

from __future__ import annotations

import torch

from longmem.errors import LongMemError
from longmem.inference.generate import Decoder, copy_memory, oldest
from longmem.memory.bank import MemoryBank
from longmem.model.longmem import LongMemModel, LongMemOutput


class ReferenceDecoder(Decoder):
    """The slow twin: every token re-runs the whole window through ``model.forward``."""

    def __init__(self, model: LongMemModel, memory: MemoryBank, window: int, evict: int,
                 start: int | None = None, copy_on_write: bool = False):
        super().__init__(model, memory, window, evict, start, copy_on_write)
        self.ids = torch.zeros(0, dtype=torch.long)
        self.start = int(self.cache.start[0])

    @property
    def window_ids(self) -> torch.Tensor:
        return self.ids

    def _feed(self, ids: torch.Tensor) -> torch.Tensor:
        logits = None
        for token in ids:
            if self.ids.numel() == self.window:
                self._evict()
            self.ids = torch.cat([self.ids, token[None]])
            logits = self._forward().logits[0, -1].float()
        if logits is None:
            raise LongMemError("nothing to feed: no tokens")
        return logits

    @torch.no_grad()
    def _forward(self) -> LongMemOutput:
        positions = self.start + torch.arange(self.ids.numel())[None, :]
        return self.model(self.ids[None, :], memory=self.memory, positions=positions)

    def _evict(self) -> None:
        if self.copy_on_write:
            self.memory, self.copy_on_write = copy_memory(self.memory), False
        self.model.write_memory(self.memory, oldest(self._forward(), self.evict))
        self.ids, self.start = self.ids[self.evict :], self.start + self.evict
