"""Synthetic recall spans: a training signal that only the memory can satisfy.

With probability ``prob`` a row's segment gets a copy of a span of its own document's
earlier text, taken from at least ``near`` tokens back (outside the local segment and the
short-term tier, so only the long-term bank can supply it) and at most ``reach`` tokens
back (text the bank still holds: a span copied from evicted text cannot be recalled and
teaches nothing). The copy's continuation is perfectly predictable from memory and not
from local context, which rewards retrieving and copying.
"""

from __future__ import annotations

import torch

from .stream import IGNORE_INDEX, Batch
from .tokens import TokenizedCorpus


def insert_recall_spans(
    batch: Batch, corpus: TokenizedCorpus, prob: float, min_len: int = 32, max_len: int = 256,
    generator: torch.Generator | None = None, near: int | None = None, reach: int | None = None,
) -> tuple[Batch, torch.Tensor]:
    """Copy earlier document text into segments; returns (batch, span mask [B,T] bool).

    A span of L tokens starting in [max(0, p0 - reach), p0 - near - L) of the row's document
    (p0 = the segment's first position; near defaults to the segment length T, reach to the
    whole document) replaces tokens [o, o + L) of the segment; labels follow the copied text
    and the token after the span is predicted as the original text resumes.
    """
    ids, labels = batch.input_ids.clone(), batch.labels.clone()
    b, t = ids.shape
    near = t if near is None else near
    spans = torch.zeros(b, t, dtype=torch.bool)
    for row in range(b):
        p0 = int(batch.positions[row, 0])
        valid = int((batch.labels[row] != IGNORE_INDEX).sum())  # real, labelled tokens in the segment
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator))
        low = 0 if reach is None else max(0, p0 - reach)
        high = p0 - near - length  # sources end at least ``near`` tokens before this segment
        draw = float(torch.rand((1,), generator=generator))
        if draw >= prob or high <= low or valid <= length + 1:
            continue
        src = int(torch.randint(low, high, (1,), generator=generator))
        dst = int(torch.randint(1, valid - length, (1,), generator=generator))
        doc = torch.from_numpy(corpus.document(int(batch.doc_index[row]))[src : src + length].astype("int64"))
        ids[row, dst : dst + length] = doc
        labels[row, dst - 1 : dst + length - 1] = doc  # the token before the span predicts its first token
        labels[row, dst + length - 1] = ids[row, dst + length]  # the original text resumes
        spans[row, dst - 1 : dst + length - 1] = True
    return Batch(ids, labels, batch.positions, batch.reset, batch.doc_index), spans
