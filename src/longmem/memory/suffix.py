"""Exact suffix matches in a token log: earlier positions whose preceding token ids equal the current ones.

For every query token the log is searched for positions p whose last ``n`` ids equal the
query's last ``n`` ids (n-grams hashed once per log version and sorted; a binary search per
query), each hit is extended backwards to its full length (up to ``MAX_LEN``), and the ``m``
most recent hits of two orders are kept: ``n`` and ``LONG * n`` (a long match is found even
when its short suffix is common, e.g. a repeated sentence ending in "of the"). The token after
a hit (p + 1) is what an exact copy predicts next. The context being read (the segment,
or the decoding window) is searched too, for ends before each query. This is the
induction-head pattern done on ids: it finds repeats whatever the frozen layers make of
them, e.g. a passkey stated at the very start of a document, where early-layer keys are
atypical.
"""

from __future__ import annotations

import torch

from longmem.memory.token_log import UNKNOWN, TokenLog

MAX_LEN = 32  # longest match measured (tokens)
LONG = 4  # the second order is LONG * n
_P = 2_147_483_629  # prime < 2**31: (id + 1) * B**j mod P stays far inside int64
_B = 1_000_003


def ngram_hashes(ids: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """ids [S] (int64, -1 unknown) -> hash of the n ids ending at each position [S] and whether all
    n are known [S] (False for the first n - 1)."""
    h = torch.zeros_like(ids)
    ok = torch.ones_like(ids, dtype=torch.bool)
    for j in range(n):
        shifted = torch.full_like(ids, UNKNOWN)
        if j < ids.shape[0]:
            shifted[j:] = ids[: ids.shape[0] - j]
        ok &= shifted >= 0
        h = (h + (shifted + 1) * pow(_B, j, _P)) % _P
    return h, ok


def _sorted_ends(log: TokenLog, row: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The log's n-gram hashes that a copy can follow (p + 1 still in the log), sorted by hash
    and, among equal hashes, by position: hashes [M], absolute end positions [M]. Cached per log version."""
    key = (row, n, log.version)
    cache = log.__dict__.setdefault("_suffix_cache", {})
    if key in cache:
        return cache[key]
    end = log.ends()[row]
    lo = max(0, end - log.span)
    pos = torch.arange(lo, end, device=log.device)  # [S']
    ids = log.lookup_row(row, pos)  # [S']
    h, ok = ngram_hashes(ids, n)
    ok[-1:] = False  # the last id has no successor in the log
    h, pos = h[ok], pos[ok]
    order = torch.sort(h, stable=True)  # equal hashes keep their (ascending) positions
    for stale in [k for k in cache if k[0] == row and k[1] == n]:
        del cache[stale]
    cache[key] = (order.values, pos[order.indices])
    return cache[key]


def _recent_hits(keys: torch.Tensor, ends: torch.Tensor, qkey_lo: torch.Tensor, qkey_hi: torch.Tensor, m: int
                 ) -> torch.Tensor:
    """Sorted keys [M] with their end positions [M]; per query the key range [lo, hi] [Q] -> the m
    entries with the highest keys in range (the most recent ends) [Q,m] (-1: none)."""
    left = torch.searchsorted(keys, qkey_lo, side="left")
    right = torch.searchsorted(keys, qkey_hi, side="right")
    idx = right[:, None] - 1 - torch.arange(m, device=keys.device)[None, :]  # [Q,m]
    hit = idx >= left[:, None]
    if not len(ends):
        return torch.full_like(idx, UNKNOWN)
    return torch.where(hit, ends[idx.clamp(0, len(ends) - 1)], UNKNOWN)


def suffix_matches(log: TokenLog, ids: torch.Tensor, positions: torch.Tensor, queries: int, n: int,
                   m: int = 4, local: bool = True, first: list[int] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Exact matches for the last ``queries`` tokens of ids [B,C] at absolute positions [B,C]
    (contiguous, starting at or after the log's end; earlier context comes from the log; ``first``:
    positions[:, 0] where the caller knows them on the host, e.g. decoding, which then reads nothing back) ->
    matched end positions [B,Q,4m] (-1: none), match lengths [B,Q,4m] (0 there; n..MAX_LEN),
    the id after each match [B,Q,4m] (-1 there) and whether the match lies in the context
    itself [B,Q,4m] (bool). Slots: the log's m most recent hits of order n, of order LONG * n,
    then the context's (ends before the query; none unless ``local``) of each order; a hit of both
    orders counts once."""
    b, c = ids.shape
    slots, dev = 4 * m, ids.device
    out_pos = torch.full((b, queries, slots), UNKNOWN, dtype=torch.long, device=dev)
    out_len = torch.zeros(b, queries, slots, dtype=torch.long, device=dev)
    out_next = torch.full((b, queries, slots), UNKNOWN, dtype=torch.long, device=dev)
    in_context = torch.zeros(b, queries, slots, dtype=torch.bool, device=dev)
    in_context[..., 2 * m :] = True
    firsts = positions[:, 0].tolist() if first is None else first
    for row, end in enumerate(log.ends()):
        first = firsts[row]
        if first < end:
            raise ValueError(f"context starts at position {first}, inside the log (which ends at {end})")
        context = ids[row].long()  # [C] at absolute positions first..first+C-1

        def fetch(at: torch.Tensor) -> torch.Tensor:
            """ids at absolute positions (any shape; -1 unknown): the context's, else the log's."""
            inside = (at >= first) & (at < first + c)
            return torch.where(inside, context[(at - first).clamp(0, c - 1)], log.lookup_row(row, at))

        ws = max(0, first - LONG * n + 1)  # hashes need the LONG * n - 1 ids before the context, no more
        window = fetch(torch.arange(ws, first + c, device=dev))  # [W]
        qpos = positions[row, c - queries :].long()  # [Q] absolute
        cand = []
        hashes = {order: ngram_hashes(window, order) for order in (n, LONG * n)}
        query = {order: (h[qpos - ws], ok[qpos - ws]) for order, (h, ok) in hashes.items()}  # [Q] each
        for order in (n, LONG * n):  # the log's hits: every end is before every query
            qh, qok = query[order]
            if end:
                keys, ends = _sorted_ends(log, row, order)
                hits = _recent_hits(keys, ends, qh, qh, m)
            else:
                hits = torch.full((queries, m), UNKNOWN, dtype=torch.long, device=dev)
            cand.append(torch.where(qok[:, None], hits, UNKNOWN))
        for order in (n, LONG * n) if local else ():  # the context's hits: ends before the query (key hash | pos)
            h, ok = hashes[order]
            ends = torch.arange(first, first + c - 1, device=dev)  # the last context id has no successor yet
            ok = ok[ends - ws]
            keys = (h[ends - ws] << 32) | (ends - ws)
            order_idx = torch.sort(keys[ok]).indices
            keys, ends = keys[ok][order_idx], ends[ok][order_idx]
            qh, qok = query[order]
            hits = _recent_hits(keys, ends, qh << 32, (qh << 32) | (qpos - 1 - ws).clamp_min(0), m)
            cand.append(torch.where(qok[:, None] & (hits < qpos[:, None]), hits, UNKNOWN))
        pos = torch.cat(cand + [torch.full((queries, 2 * m), UNKNOWN, device=dev)] * (not local), 1)  # [Q,4m]
        earlier = torch.ones(slots, slots, dtype=torch.bool, device=dev).tril(-1)  # [4m,4m] slot j before slot i
        dup = ((pos[:, :, None] == pos[:, None, :]) & earlier).any(-1)
        pos = torch.where(dup, UNKNOWN, pos)
        back = torch.arange(MAX_LEN, device=dev)  # [L]
        qv = fetch(qpos[:, None, None] - back)  # [Q,1,L]
        pv = torch.where(pos[:, :, None] >= 0, fetch(pos[:, :, None] - back), UNKNOWN)  # [Q,4m,L]
        same = (qv == pv) & (qv >= 0)
        length = same.long().cumprod(-1).sum(-1)  # [Q,4m]
        good = length >= n  # (hash collisions fail here)
        out_pos[row] = torch.where(good, pos, UNKNOWN)
        out_len[row] = torch.where(good, length, 0)
        out_next[row] = torch.where(good, fetch(pos + 1), UNKNOWN)
    return out_pos, out_len, out_next, in_context
