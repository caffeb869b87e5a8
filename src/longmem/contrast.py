"""Contrast training: a row read under another document's long-term bank must predict as without one.

On ordinary text most of what a memory of the same domain gives is the domain itself (an Austen bank
helps on any Austen novel). ``ForeignBanks`` keeps, for every row, a bank filled from another document
of the row's group (documents whose ids share the prefix before the first '-': one author); the trainer
reads the row's segment once more under that bank (own short-term tier and token log) and adds
``foreign_weight * KL(p_no_bank || p_foreign_bank)`` to the loss, the no-bank side held fixed. What any
text of the domain teaches then has to go to weights that act without memory (``style_rank``).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .data.tokens import TokenizedCorpus
from .memory import MemoryBank


def group_of(doc_id: str) -> str:
    """A document's group: its id up to the first '-' ('austen-emma' -> 'austen')."""
    return doc_id.split("-", 1)[0]


class ForeignBanks:
    """Per row, a bank of ``tokens`` tokens from another document of the row's group (any other document
    when the group has one), rebuilt every ``every`` steps and whenever a row starts a new document."""

    def __init__(self, model, corpus: TokenizedCorpus, batch_size: int, tokens: int, every: int, seed: int):
        self.model, self.corpus, self.batch_size = model, corpus, batch_size
        self.tokens, self.every, self.seed = tokens, every, seed
        self.memory: MemoryBank | None = None
        self.sources: list[int] = []  # the foreign document of every row
        self.owners: list[int] = []  # the row's own document when its bank was built

    def for_batch(self, doc_index: torch.Tensor, step: int) -> MemoryBank:
        """The foreign memory for a batch whose rows read documents doc_index [B]."""
        owners = [int(i) for i in doc_index]
        if self.memory is None or step % self.every == 0 or owners != self.owners:
            self._build(owners, step)
        return self.memory  # type: ignore[return-value]

    def pick(self, own: int, rng: np.random.Generator) -> int:
        """Another document of ``own``'s group (any other when it has none)."""
        ids = self.corpus.doc_ids
        others = [i for i in range(len(ids)) if i != own and self.corpus.lengths[i] > 0]
        same = [i for i in others if group_of(ids[i]) == group_of(ids[own])]
        return int(rng.choice(same or others))

    @torch.no_grad()
    def _build(self, owners: list[int], step: int) -> None:
        rng = np.random.default_rng([self.seed, step])
        self.sources = [self.pick(own, rng) for own in owners]
        t = self.model.config.segment_length
        rows = []
        for src in self.sources:
            doc = self.corpus.document(src)
            n = min(self.tokens, len(doc)) // t * t or len(doc)
            start = int(rng.integers(0, len(doc) - n + 1))
            rows.append(torch.from_numpy(doc[start : start + n].astype("int64")))
        n = min(len(r) for r in rows)
        ids = torch.stack([r[:n] for r in rows])  # [B,N]
        memory = self.model.new_memory(self.batch_size)
        was_training = self.model.training
        self.model.eval()
        for a in range(0, n, t):
            out = self.model(ids[:, a : a + t], memory=memory)
            self.model.write_memory(memory, out)
        self.model.train(was_training)
        self.memory, self.owners = memory, owners


def held_kl(reference: torch.Tensor, logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean KL(softmax(reference) || softmax(logits)) over the tokens of mask [B,T]; reference is
    held fixed. reference, logits [B,T,V] (logits or log-probabilities)."""
    ref = F.log_softmax(reference.detach()[mask].float(), -1)  # [N,V]
    cur = F.log_softmax(logits[mask].float(), -1)
    return (ref.exp() * (ref - cur)).sum(-1).mean()
