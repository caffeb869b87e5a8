"""Keyed matches: find where the question's key was stated, then what followed the same words there.

A question such as "What is the special magic number for amber-acorn? ... for amber-acorn is" ends
with words (" is") that every statement of its form shares, and it names its key many tokens back: an
n-gram match right before the answer cannot tell the statements apart. A two-step pointer can:

1. **Locate the key.** A word of the query's last ``window`` tokens (a distinct token id, seen at most
   ``max_count`` times) may be a key word if it also occurs before that window and, within ``reach``
   tokens after one of its ``occurrences`` most recent places there, the query's own id occurs (the
   anchor, e.g. " is"): a word that never led to the anchor cannot name a statement of the question's
   form. The key words are the ``keys`` rarest of these (rarity: how often an id occurs in everything the
   log and the context hold up to the query, S tokens; weight ``idf = log((S + 1) / (count + 1))``).
2. **Copy after it.** Within ``reach`` tokens after each of their places, a position p holding the
   anchor is a candidate; the token at p + 1 is what it predicts. Its ``overlap`` is the idf summed over
   the query's key words that occur in the ``reach`` tokens up to p, its ``length`` how many ids before p
   (up to ``MAX_ANCHOR``) equal the query's, and it is **said** when the ``SAID`` ids after p occur
   together in the query's window: an answer given already. A list ("... are: 4550622, 9039812, ") asks
   again after each item with the same anchor (" "); the said mark lets it move on to a value not given.

The ``slots`` candidates of highest overlap (then the most recent) are kept per query. The copy head
(:mod:`longmem.model.copy_head`) learns how much to trust them. Everything is exact integer work on
token ids, like :mod:`longmem.memory.suffix`: no training is needed to find the statement, only to
decide when its answer should be believed.
"""

from __future__ import annotations

import math

import torch

from longmem.memory.token_log import UNKNOWN, TokenLog

MAX_ANCHOR = 8  # longest anchor match measured (tokens)
WINDOW, KEYS, OCCURRENCES, REACH, SLOTS, MAX_COUNT = 64, 4, 8, 12, 8, 64
SAID = 3  # ids after a candidate that, found together in the window, mark its answer as given


def _row_ids(log: TokenLog, row: int, ids: torch.Tensor, first: int) -> tuple[torch.Tensor, int]:
    """Everything known of one row: the log's ids then the context's, with positions from ``lo``: [S], lo."""
    dev = ids.device
    end = log.ends()[row]
    lo = max(0, end - log.span)
    known = (log.lookup_row(row, torch.arange(lo, end, device=dev)) if end > lo
             else torch.empty(0, dtype=torch.long, device=dev))
    gap = torch.full((max(0, first - end),), UNKNOWN, dtype=torch.long, device=dev)  # a context after a gap
    return torch.cat([known.long(), gap, ids.long()]), lo


def keyed_matches(log: TokenLog, ids: torch.Tensor, positions: torch.Tensor, queries: int,
                  window: int = WINDOW, keys: int = KEYS, occurrences: int = OCCURRENCES, reach: int = REACH,
                  slots: int = SLOTS, max_count: int = MAX_COUNT, first: list[int] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Keyed matches for the last ``queries`` tokens of ids [B,C] at absolute positions [B,C] (contiguous,
    at or after the log's end; ``first``: positions[:, 0] where the caller knows them on the host, e.g.
    decoding, which then reads nothing back) -> candidate positions [B,Q,S] (-1: none), overlap [B,Q,S] (fp32, 0 there),
    anchor length [B,Q,S] (0 there), the id after each candidate [B,Q,S] (-1 there) and whether the
    candidate's answer was said already [B,Q,S] (bool: its next SAID ids occur together in the window)."""
    b, c = ids.shape
    dev = ids.device
    out_pos = torch.full((b, queries, slots), UNKNOWN, dtype=torch.long, device=dev)
    out_overlap = torch.zeros(b, queries, slots, device=dev)
    out_len = torch.zeros(b, queries, slots, dtype=torch.long, device=dev)
    out_next = torch.full((b, queries, slots), UNKNOWN, dtype=torch.long, device=dev)
    out_said = torch.zeros(b, queries, slots, dtype=torch.bool, device=dev)
    firsts = positions[:, 0].tolist() if first is None else first
    for row in range(b):
        seq, lo = _row_ids(log, row, ids[row], firsts[row])  # [S] at absolute positions lo..
        known = seq >= 0
        qi = positions[row, c - queries:].long() - lo  # [Q] query indices into seq
        back = qi[:, None] - torch.arange(window, device=dev)[None, :]  # [Q,W]
        wid = torch.where(back >= 0, seq[back.clamp_min(0)], UNKNOWN)  # [Q,W] the query window's ids
        earlier = torch.ones(window, window, dtype=torch.bool, device=dev).tril(-1)  # j before i: a repeat of an id
        dup = ((wid[:, :, None] == wid[:, None, :]) & earlier).any(-1)
        # where each id occurs: a sorted (id, index) list; counts and occurrences up to a query only (causal)
        span = seq.shape[0] + 1
        by_id = seq * span + torch.arange(seq.shape[0], device=dev)  # [S] (id, index) as one number
        order = torch.argsort(by_id)
        sorted_key = by_id[order]  # [S] ascending
        lo_w = torch.searchsorted(sorted_key, wid * span, side="left")  # [Q,W] the id's first entry
        cnt = torch.searchsorted(sorted_key, wid * span + qi[:, None] + 1, side="left") - lo_w  # [Q,W] seen so far
        total = known.long().cumsum(0)[qi]  # [Q] known tokens up to each query
        idf = torch.log((total[:, None] + 1) / (cnt.float() + 1))  # [Q,W]
        limit = (qi - window + 1).clamp_min(0)  # [Q] occurrences end before the window
        hi = torch.searchsorted(sorted_key, wid * span + limit[:, None], side="left")  # [Q,W]
        ok = (wid >= 0) & ~dup & (cnt <= max_count) & (hi > lo_w)  # a key word was said before
        idf = torch.where(ok, idf, 0.0)
        # candidates: within reach after an occurrence, the anchor id (the query's own), p + 1 known
        idx = hi[..., None] - 1 - torch.arange(occurrences, device=dev)  # [Q,W,O] each word's most recent occurrences
        occ = torch.where((idx >= lo_w[..., None]) & ok[..., None], order[idx.clamp(0, seq.shape[0] - 1)], UNKNOWN)
        p = occ[..., None] + 1 + torch.arange(reach, device=dev)  # [Q,W,O,D]
        inside = (occ[..., None] >= 0) & (p + 1 < qi[:, None, None, None])
        pc = p.clamp(0, seq.shape[0] - 2)
        anchor = seq[qi][:, None, None, None]
        good = inside & (seq[pc] == anchor) & (seq[pc + 1] >= 0) & (anchor >= 0)  # [Q,W,O,D]
        idf = torch.where(good.flatten(2).any(-1), idf, 0.0)  # a key word leads to the anchor somewhere
        k = min(keys, window)
        kat = (idf - 1e-6 * torch.arange(window, device=dev)).topk(k, -1).indices  # [Q,K] ties: the newest word first
        kidf = idf.gather(1, kat)
        on = kidf > 0  # [Q,K] a key word (else: none)
        occ = torch.where(on[..., None], occ.gather(1, kat[..., None].expand(-1, -1, occurrences)), UNKNOWN)  # [Q,K,O]
        at = kat[..., None, None].expand(-1, -1, occurrences, reach)
        p, good = p.gather(1, at), good.gather(1, at) & on[..., None, None]  # [Q,K,O,D]
        cand = torch.where(good, p, UNKNOWN).reshape(queries, -1)  # [Q,N]
        # overlap: the key words that occur in the reach up to p (from their occurrence lists)
        flat_occ = occ.reshape(queries, 1, -1)  # [Q,1,K*O]
        occ_word = torch.arange(k, device=dev).repeat_interleave(occurrences)  # [K*O] which key word each occurrence is
        near = (flat_occ >= 0) & (flat_occ <= cand[..., None]) & (flat_occ > cand[..., None] - reach - 1)  # [Q,N,K*O]
        present = torch.zeros(queries, cand.shape[1], k, dtype=torch.long, device=dev)
        present.scatter_reduce_(2, occ_word.expand_as(near), near.long(), reduce="amax")
        overlap = (present.float() * kidf[:, None, :]).sum(-1)  # [Q,N]
        overlap = torch.where(cand >= 0, overlap, -1.0)
        # the same candidate reached from several occurrences counts once
        srt, perm = cand.sort(-1)
        rep = torch.zeros_like(srt, dtype=torch.bool)
        rep[:, 1:] = (srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)
        dup_c = torch.zeros_like(rep).scatter(1, perm, rep)
        overlap = torch.where(dup_c, -1.0, overlap)
        rank = overlap * (seq.shape[0] + 1) + cand.clamp_min(0).float() / (seq.shape[0] + 1)  # overlap, then recency
        top = rank.topk(min(slots, rank.shape[1]), -1).indices  # [Q,S']
        pos = cand.gather(1, top)
        ov = overlap.gather(1, top)
        keep = (pos >= 0) & (ov >= 0)
        s = top.shape[1]
        backs = torch.arange(MAX_ANCHOR, device=dev)
        qv = torch.where(qi[:, None] - backs >= 0, seq[(qi[:, None] - backs).clamp_min(0)], UNKNOWN)  # [Q,L]
        pv_at = (pos[..., None] - backs).clamp_min(0)
        pv = torch.where(keep[..., None] & (pos[..., None] - backs >= 0), seq[pv_at], -2)  # [Q,S',L]
        length = ((pv == qv[:, None, :]) & (qv[:, None, :] >= 0)).long().cumprod(-1).sum(-1)
        # said: the three ids after the candidate occur together in the query's window (an answer given already)
        ahead = pos[..., None] + 1 + torch.arange(SAID, device=dev)  # [Q,S',3]
        nid = torch.where(keep[..., None] & (ahead < qi[:, None, None]), seq[ahead.clamp(0, seq.shape[0] - 1)], -2)
        start = qi[:, None] - torch.arange(SAID - 1, window, device=dev)  # [Q,W'] window positions, 3 ids all read
        three = (start[..., None] + torch.arange(SAID, device=dev)).clamp_min(0)  # [Q,W',3]
        tri = torch.where((start >= 0)[..., None], seq[three], -3)
        said = ((nid[:, :, None, :] == tri[:, None, :, :]) & (nid[:, :, None, :] >= 0)).all(-1).any(-1)  # [Q,S']
        out_pos[row, :, :s] = torch.where(keep, pos + lo, UNKNOWN)
        out_overlap[row, :, :s] = torch.where(keep, ov, 0.0)
        out_len[row, :, :s] = torch.where(keep, length, 0)
        out_next[row, :, :s] = torch.where(keep, seq[(pos + 1).clamp(0, seq.shape[0] - 1)], UNKNOWN)
        out_said[row, :, :s] = keep & said
    return out_pos, out_overlap, out_len, out_next, out_said


def overlap_scale(span: int) -> float:
    """A typical idf of a word seen once among ``span`` tokens (features are divided by it)."""
    return math.log(span + 1)
