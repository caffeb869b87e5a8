"""Synthetic recall spans: a training signal that only the memory can satisfy.

With probability ``prob`` a row's segment gets a copy of a span of its own document's
earlier text, taken from at least ``near`` tokens back (outside the local segment and the
short-term tier, so only the long-term bank can supply it) and at most ``reach`` tokens
back (text the bank still holds: a span copied from evicted text cannot be recalled and
teaches nothing). The copy's continuation is perfectly predictable from memory and not
from local context, which rewards retrieving and copying.

Every span token's *source* (the absolute position of the earlier token it repeats, whose
successor is its label) is returned too, so a trainer can supervise where the memory
attention should look; sources are drawn away from text that earlier spans overwrote
(``avoid``), since the memory holds what the model read, not the original document.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from longmem.train.stream import IGNORE_INDEX, Batch
from longmem.data.tokens import TokenizedCorpus


@dataclass
class RecallSpans:
    """Where the spans went: mask [B,T] of span targets, their sources, overwritten ranges."""

    mask: torch.Tensor  # [B,T] bool: label is a copied token (or the token after a span)
    sources: torch.Tensor  # [B,T] long: position of the earlier token each span input repeats, -1 elsewhere
    # (set where the label is a copied token too: the token after the source is the label)
    written: list[tuple[int, int, int]] = field(default_factory=list)  # (row, start, end) positions overwritten
    answers: torch.Tensor | None = None  # [B,T] bool: label is a synthetic fact's answer token (``facts.py``)


def insert_recall_spans(
    batch: Batch, corpus: TokenizedCorpus, prob: float, min_len: int = 32, max_len: int = 256,
    generator: torch.Generator | None = None, near: int | None = None, reach: int | None = None,
    avoid: list[list[tuple[int, int]]] | None = None, tries: int = 8,
) -> tuple[Batch, RecallSpans]:
    """Copy earlier document text into segments; returns (batch, RecallSpans).

    A span of L tokens starting in [max(0, p0 - reach), p0 - near - L) of the row's document
    (p0 = the segment's first position; near defaults to the segment length T, reach to the
    whole document) replaces tokens [o, o + L) of the segment; labels follow the copied text
    and the token after the span is predicted as the original text resumes. ``avoid[row]``
    lists position ranges [a, b) that no source may overlap (up to ``tries`` draws).
    """
    ids, labels = batch.input_ids.clone(), batch.labels.clone()
    b, t = ids.shape
    dev = ids.device  # the batch is prepared on the host
    near = t if near is None else near
    spans = torch.zeros(b, t, dtype=torch.bool, device=dev)
    sources = torch.full((b, t), -1, dtype=torch.long, device=dev)
    written = []
    for row in range(b):
        p0 = int(batch.positions[row, 0])
        valid = int((batch.labels[row] != IGNORE_INDEX).sum())  # real, labelled tokens in the segment
        length = int(torch.randint(min_len, max_len + 1, (1,), generator=generator, device=dev))
        low = 0 if reach is None else max(0, p0 - reach)
        high = p0 - near - length  # sources end at least ``near`` tokens before this segment
        draw = float(torch.rand((1,), generator=generator, device=dev))
        if draw >= prob or high <= low or valid <= length + 1:
            continue
        blocked = avoid[row] if avoid is not None else []
        for _ in range(tries):
            src = int(torch.randint(low, high, (1,), generator=generator, device=dev))
            if not any(a < src + length and src < e for a, e in blocked):
                break
        else:
            continue
        dst = int(torch.randint(1, valid - length, (1,), generator=generator, device=dev))
        doc = torch.from_numpy(corpus.document(int(batch.doc_index[row]))[src : src + length].astype("int64"))
        ids[row, dst : dst + length] = doc
        labels[row, dst - 1 : dst + length - 1] = doc  # the token before the span predicts its first token
        labels[row, dst + length - 1] = ids[row, dst + length]  # the original text resumes
        spans[row, dst - 1 : dst + length - 1] = True
        sources[row, dst : dst + length - 1] = torch.arange(src, src + length - 1, device=dev)  # dst+j repeats src+j
        written.append((row, p0 + dst, p0 + dst + length))
    return Batch(ids, labels, batch.positions, batch.reset, batch.doc_index), RecallSpans(spans, sources, written)
