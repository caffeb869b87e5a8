"""Copy head: a pointer to the tokens that followed earlier look-alikes of the current token.

Three sources, mixed into the next-token distribution kNN-LM style (weights learned):

**Key matches.** For every token, the pre-rotary key of an early layer of the frozen backbone
(``copy_layer``) is matched against the keys of everything the memory has read (``TokenLog.match``,
cosine, top k per KV head). In a passage that repeats earlier text the best match is the source
itself (early layers see mostly the local context, so a copied token's key is nearly identical to its
source's: cosine 0.99-1.0 at SmolLM2's layers 2-3, bench/copy_probe.py), and the token that followed
it is the next token:

    p(v) = (1 - lam * m) * softmax(logits)(v) + lam * mean_h sum_k w[h,k] * [id(pos[h,k] + 1) == v]

w = softmax over a head's k matches of b_h * (sim - 1) / 0.01 + s * [the previous token's matches
include the position right before this match] (a match that continues a copy beats a look-alike
elsewhere), m = the pointer's known mass, lam = sigmoid(a * f + g * agree + e * run + c) with
f = (mean over heads of the best similarity - 0.95) / 0.05, agree = the largest mass the pointer gives
one token and run = how many of the previous tokens (up to RUN) had their best match right before
this token's best match (mean over heads, / RUN): copying is trusted as much as the match is exact,
its candidates agree and it continues a copied run (an induction signal).

**Exact matches.** Token-id suffix matches of at least MIN_MATCH tokens (extended up to 32) in the log
and in the context being read (``memory.suffix``), so that an empty memory gets the same local copies
and the memory is not credited with them. Candidates are weighted by softmax(kappa * length) and
trusted by lam_n = sigmoid(u[bucket(longest length)] + g_n * agree_n + h * entropy + local bias
[+ w . hidden]):

    p = (1 - lam_n) * p_keys + lam_n * sum_i w_i * [id(pos_i + 1) == v]

**Keyed matches.** A question that names its key many tokens back and ends with words every
statement of its form shares ("... for amber-acorn mentioned in the provided text is") has no exact
match that tells the statements apart. ``memory.keyed`` finds where the question's rarest words were
said and, within a few tokens after, the question's last token: the token after it is a candidate,
weighted by softmax(o * key words matched + l * anchor length - r * recency rank - d * said) and
trusted by lam_k = sigmoid(g_b * best match not said + g_a * agree + g_l * [any said] + bias [+ w_k .
hidden]), where "said" marks a candidate whose answer is already in the window (a list moves on to the
next one, and the trust that it goes on rises):

    p = (1 - lam_k) * p + lam_k * sum_i w_i * [id(pos_i + 1) == v]

A fresh head trusts them at sigmoid(-8) = 3e-4; stage 6 of the recipe (``keyed_prob`` facts) trains it.

With ``context_dim`` (``copy_gate``) lam_n's logit also reads the SideNet's final hidden state
(zero at the start); trained with synthetic facts (``train/facts.py``) it learns to trust a short
match where a question restates something stated earlier (passkey 78% -> 95%). Only the candidate ids
change from the model's log-probabilities (no dense [B,T,V] pointer is built).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import nn

from longmem.memory.keyed import keyed_matches, overlap_scale
from longmem.memory.suffix import suffix_matches
from longmem.memory.token_log import TokenLog

SIM_ORIGIN, SIM_SCALE = 0.95, 0.05  # f = 0 at cosine 0.95, 1 at an exact match
RUN = 4  # previous tokens a copied run is counted over (decoding keeps their match positions as history)
LENGTH_EDGES = (3, 4, 5, 6, 8, 11, 16, 23, 32)  # exact-match length buckets: <3, 3, 4, 5, 6-7, ..., 32
MIN_MATCH = 3  # exact matches count from this many tokens
KEYED_FRESH_BIAS = -8.0  # a fresh head's keyed trust: sigmoid(-8) = 3e-4, learned from there
LENGTH_REP = (2.0, 3.0, 4.0, 5.0, 6.5, 9.0, 13.0, 19.0, 27.0, 32.0)  # a typical length in each bucket


class Candidates(NamedTuple):
    """What the key matches of T tokens propose (N = Hkv * k candidates per token)."""

    ids: torch.Tensor  # [B,T,N] the id after each match (0 where unknown)
    weights: torch.Tensor  # [B,T,N] pointer weight (fp32; 0 where unknown; sums to <= 1)
    best: torch.Tensor  # [B,T] mean over heads of the best cosine similarity
    run: torch.Tensor  # [B,T] the copied-run feature in [0, 1]
    positions: torch.Tensor  # [B,Hkv,T,k] the matches' absolute positions (-1: none): the next call's history


class CopySources(NamedTuple):
    """Where the copy head's mixture took its candidates from (for provenance; N' candidates per token)."""

    positions: torch.Tensor  # [B,T,N'] absolute position of the token each candidate copies (-1: none)
    weights: torch.Tensor  # [B,T,N'] its probability mass in the final distribution
    ids: torch.Tensor  # [B,T,N'] the id it proposes


def _after(pos: torch.Tensor) -> torch.Tensor:
    """Match positions -> the positions of the tokens they copy (the next one; -1 stays)."""
    return torch.where(pos >= 0, pos + 1, pos)


class CopyHead(nn.Module):
    """Learned mixing of a key-match pointer into the next-token distribution."""

    def __init__(self, num_kv_heads: int, topk: int = 4, context_dim: int = 0):
        super().__init__()
        self.topk = topk
        self.sharpness = nn.Parameter(torch.ones(num_kv_heads))  # b_h: nats per 0.01 of cosine
        self.slope = nn.Parameter(torch.tensor(6.0))  # a
        self.agree = nn.Parameter(torch.tensor(2.0))  # g
        self.run = nn.Parameter(torch.tensor(4.0))  # e
        self.follow = nn.Parameter(torch.tensor(3.0))  # s: nats for a match that continues the previous one
        self.offset = nn.Parameter(torch.tensor(-8.0))  # c: lam = 0.98 at an exact, unanimous run; 0.5 without run
        rep = torch.tensor(LENGTH_REP)
        self.length_bias = nn.Parameter(-4.0 + 1.6 * rep.log2())  # [NB] u(l): trust by match-length bucket
        self.length_sharp = nn.Parameter(torch.tensor(1.0))  # kappa: nats per matched token among hits
        self.ngram_agree = nn.Parameter(torch.tensor(2.0))  # g_n
        self.uncertain = nn.Parameter(torch.tensor(0.0))  # h: trust per unit of the model's normalised entropy
        self.local_bias = nn.Parameter(torch.tensor(0.0))  # added when the longest match is in the context
        self.context: nn.Linear | None = None
        if context_dim:  # trust read from the model's own state (e.g. "a stated fact is being asked for")
            self.context = nn.Linear(context_dim, 1, bias=False)
            nn.init.zeros_(self.context.weight)  # neutral at the start: the head's trust is unchanged
        # keyed matches (memory/keyed.py): the statement found by the question's key words
        self.keyed_overlap = nn.Parameter(torch.tensor(4.0))  # nats per key word matched, among candidates
        self.keyed_length = nn.Parameter(torch.tensor(0.5))  # nats per anchor token matched
        self.keyed_recent = nn.Parameter(torch.tensor(0.5))  # nats per rank of recency (the latest wins)
        self.keyed_said = nn.Parameter(torch.tensor(4.0))  # nats against an answer given already (lists)
        self.keyed_list = nn.Parameter(torch.tensor(2.0))  # trust where a candidate's answer was given: a list goes on
        self.keyed_best = nn.Parameter(torch.tensor(0.0))  # trust per key word the best candidate matched
        self.keyed_agree = nn.Parameter(torch.tensor(0.0))  # trust when the candidates agree
        self.keyed_bias = nn.Parameter(torch.tensor(KEYED_FRESH_BIAS))  # fresh: lam_k = 3e-4 wherever a match is
        self.keyed_context: nn.Linear | None = None
        if context_dim:
            self.keyed_context = nn.Linear(context_dim, 1, bias=False)
            nn.init.zeros_(self.keyed_context.weight)

    def candidates(self, keys: torch.Tensor, log: TokenLog, history: torch.Tensor | None = None) -> Candidates:
        """keys [B,Hkv,T,Dh] -> the key-match candidates (see ``Candidates``). ``history``
        [B,Hkv,P,k]: the match positions of the P <= RUN tokens right before these (``Candidates.
        positions`` of earlier calls on the same log; incremental decoding keeps them), for
        runs and follows across calls."""
        sims, pos = log.match(keys, self.topk)  # [B,Hkv,T,k]
        p = 0 if history is None else history.shape[2]
        both = pos if not p else torch.cat([history, pos], 2)  # [B,Hkv,P+T,k]
        run = _runs(both[..., 0])[:, :, p:].float().mean(1) / RUN  # [B,T]
        follows = torch.zeros_like(both, dtype=torch.bool)  # [B,Hkv,P+T,k] continues one of t-1's matches
        follows[:, :, 1:] = ((both[:, :, 1:, :, None] == both[:, :, :-1, None, :] + 1)
                             & (both[:, :, :-1, None, :] >= 0)).any(-1)
        follows = follows[:, :, p:]
        b, h, t, k = sims.shape
        nxt = log.lookup(torch.where(pos >= 0, pos + 1, pos))  # [B,Hkv,T,k] the token after each match
        found = pos >= 0  # a row with an empty log has no matches at all: keep every number finite
        sims = torch.where(found, sims, torch.full_like(sims, -1.0))
        logits = self.sharpness.float().view(1, h, 1, 1) * (sims - 1) / 0.01 + self.follow * follows
        w = torch.softmax(logits, -1) / h * (found & (nxt >= 0))  # [B,Hkv,T,k]
        w = w.permute(0, 2, 1, 3).reshape(b, t, h * k)  # [B,T,N]
        ids = nxt.clamp_min(0).permute(0, 2, 1, 3).reshape(b, t, h * k)  # [B,T,N]
        best = sims[..., 0].clamp_min(0).mean(1)  # [B,T]
        return Candidates(ids, w, best, run, pos)

    def exact(self, log: TokenLog, context: tuple[torch.Tensor, torch.Tensor], logp: torch.Tensor,
              hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``exact_at`` without the matches' positions."""
        return self.exact_at(log, context, logp, hidden)[:3]

    def exact_at(self, log: TokenLog, context: tuple[torch.Tensor, torch.Tensor], logp: torch.Tensor,
                 hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """Exact suffix matches for the last T tokens of context (ids [B,C], absolute positions [B,C]);
        logp [B,T,V] the model's log-probabilities (hidden [B,T,D]: the SideNet's final states, read
        by a head with a context gate) -> candidate ids [B,T,M], their weights [B,T,M] (fp32, sum 1
        where any match; softmax of kappa * length), lam_n [B,T] (0 without a match) and the matches' end
        positions [B,T,M] (-1: none)."""
        ids_c, pos_c, first = _window(context)
        pos, length, nxt, local = suffix_matches(log, ids_c, pos_c, logp.shape[1], MIN_MATCH, local=True, first=first)
        found = (pos >= 0) & (nxt >= 0)  # [B,T,M]
        score = torch.where(found, self.length_sharp * length.float(), torch.full_like(length, -1e4, dtype=torch.float))
        w = torch.softmax(score, -1) * found  # [B,T,M]
        ids = nxt.clamp_min(0)
        longest = torch.where(found, length, -1).amax(-1, keepdim=True)  # [B,T,1]
        edges = torch.tensor(LENGTH_EDGES, device=logp.device)
        bucket = torch.bucketize(longest[..., 0].clamp_min(0), edges, right=True)  # [B,T]
        with torch.no_grad():  # a feature, not a path for gradients; one product-sum pass over the vocabulary
            entropy = -torch.einsum("btv,btv->bt", logp.exp(), logp) / math.log(logp.shape[-1])  # [B,T] in [0, 1]
        u = self.length_bias[bucket] + self.ngram_agree * _id_mass(ids, w).amax(-1) + self.uncertain * entropy
        from_context = (local & found & (length == longest)).any(-1)  # [B,T] the longest match is local
        u = u + self.local_bias * from_context + _gate(self.context, hidden)
        return ids, w, torch.sigmoid(u) * found.any(-1), pos

    def keyed_source(self, log: TokenLog, context: tuple[torch.Tensor, torch.Tensor], queries: int,
                     hidden: torch.Tensor | None = None, window: int | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``keyed_at`` without the candidates' positions."""
        return self.keyed_at(log, context, queries, hidden, window)[:3]

    def keyed_at(self, log: TokenLog, context: tuple[torch.Tensor, torch.Tensor], queries: int,
                 hidden: torch.Tensor | None = None, window: int | None = None) -> tuple[torch.Tensor, ...]:
        """Keyed matches for the last ``queries`` tokens of context (ids [B,C], positions [B,C]) ->
        candidate ids [B,T,S], weights [B,T,S] (fp32, sum 1 where any) and lam_k [B,T] (0 without one):
        weights = softmax(overlap * o + anchor length * l - recency rank * r - said * d), lam_k =
        sigmoid(best overlap not said * g_b + agreement * g_a + any said * g_l + bias [+ w . hidden]); then the
        candidates' anchor positions [B,T,S] (-1: none)."""
        ids_c, pos_c, first = _window(context)
        pos, overlap, length, nxt, said = keyed_matches(log, ids_c, pos_c, queries, first=first)  # [B,T,S] each
        found = (pos >= 0) & (nxt >= 0)
        # [B,T,S] ~ key words matched; the scale: the log's span and the model's window (``window``, so that
        # decoding, whose context grows token by token, scales as the forward pass does; default: the context)
        ov = overlap / overlap_scale(log.span + (context[0].shape[1] if window is None else window))
        recency = (pos[..., :, None] < pos[..., None, :]).sum(-1).float()  # [B,T,S] 0 = the latest candidate
        score = (self.keyed_overlap * ov + self.keyed_length * length.float() - self.keyed_recent * recency
                 - self.keyed_said * said)
        w = torch.softmax(torch.where(found, score, torch.full_like(score, -1e4)), -1) * found
        ids = nxt.clamp_min(0)
        best = torch.where(found & ~said, ov, 0.0).amax(-1)  # [B,T] the best answer not given yet
        listing = (found & said).any(-1)  # [B,T] one of the candidates' answers is in the window already
        u = self.keyed_best * best + self.keyed_agree * _id_mass(ids, w).amax(-1) + self.keyed_list * listing
        u = u + self.keyed_bias + _gate(self.keyed_context, hidden)
        return ids, w, torch.sigmoid(u) * found.any(-1), pos

    def pointer(self, keys: torch.Tensor, log: TokenLog, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys [B,Hkv,T,Dh] -> the key-match pointer as a dense distribution [B,T,V] (fp32; mass < 1
        where the next id is unknown) and the mean best similarity [B,T] (for analysis and tests)."""
        c = self.candidates(keys, log)
        ids, w, best = c.ids, c.weights, c.best
        b, t, _ = ids.shape
        return torch.zeros(b, t, vocab, dtype=torch.float32, device=ids.device).scatter(-1, ids, _id_mass(ids, w)), best

    def weight(self, mass: torch.Tensor, best: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """Candidate masses [B,T,N], mean best similarity [B,T], run feature [B,T] -> lam [B,T]."""
        f = (best - SIM_ORIGIN) / SIM_SCALE
        return torch.sigmoid(self.slope * f + self.agree * mass.amax(-1) + self.run * run + self.offset)

    def forward(self, logits: torch.Tensor, keys: torch.Tensor, log: TokenLog, history: torch.Tensor | None = None,
                context: tuple[torch.Tensor, torch.Tensor] | None = None, hidden: torch.Tensor | None = None
                ) -> torch.Tensor:
        """logits [B,T,V], match keys [B,Hkv,T,Dh] (history [B,Hkv,P,k]: the previous tokens' match
        positions in the same window, P <= RUN; context: ids [B,C] and absolute positions [B,C] of the
        window whose last T tokens these are, for exact matches) -> log-probabilities [B,T,V] (fp32)."""
        return self.mix(logits, self.candidates(keys, log, history), log, context, hidden)

    def mix(self, logits: torch.Tensor, cand: Candidates, log: TokenLog,
            context: tuple[torch.Tensor, torch.Tensor] | None = None, hidden: torch.Tensor | None = None,
            window: int | None = None, sources: list | None = None) -> torch.Tensor:
        """logits [B,T,V] and their key-match candidates -> log-probabilities [B,T,V] (fp32):

        p = (1 - lam_n) * [(1 - lam * m) * p_model + lam * pointer] + lam_n * exact pointer, then
        p = (1 - lam_k) * p + lam_k * keyed pointer (with keyed matches). ``sources`` (a list): gets the
        ``CopySources`` of this mixture appended (where each candidate's token sits)."""
        ids, w = cand.ids, cand.weights  # [B,T,N] x2
        lam = self.weight(_id_mass(ids, w), cand.best, cand.run)  # [B,T]
        kept = 1 - lam * w.sum(-1)  # [B,T] the model's share (the mass of unknown ids stays with it)
        w = lam[..., None] * w
        logp = torch.log_softmax(logits.float(), -1)  # [B,T,V]
        if context is None:
            raise ValueError("the copy head's exact matches need the context ids")
        ids_n, w_n, lam_n, pos_n = self.exact_at(log, context, logp, hidden)  # [B,T,M] x2, [B,T], [B,T,M]
        kept = (1 - lam_n) * kept
        ids = torch.cat([ids, ids_n], -1)
        w = torch.cat([(1 - lam_n)[..., None] * w, lam_n[..., None] * w_n], -1)
        # p = (1 - lam_k) * p + lam_k * keyed pointer
        ids_k, w_k, lam_k, pos_k = self.keyed_at(log, context, logp.shape[1], hidden, window)  # [B,T,S] x2, [B,T]
        kept = (1 - lam_k) * kept
        ids = torch.cat([ids, ids_k], -1)
        w = torch.cat([(1 - lam_k)[..., None] * w, lam_k[..., None] * w_k], -1)
        if sources is not None:
            b, h, t, k = cand.positions.shape
            pointer = cand.positions.permute(0, 2, 1, 3).reshape(b, t, h * k)  # as ids: [B,T,Hkv*k]
            at = torch.cat([_after(pointer), _after(pos_n), _after(pos_k)], -1)
            sources.append(CopySources(at, w.detach(), ids))
        mass = _id_mass(ids, w)  # [B,T,N']
        kept = kept.clamp_min(1e-30)[..., None]  # [B,T,1]
        mixed = torch.log((kept * logp.gather(-1, ids).exp() + mass).clamp_min(1e-30))  # [B,T,N']
        if torch.is_grad_enabled():  # log_softmax's backward needs its output as it was
            return (logp + kept.log()).scatter(-1, ids, mixed)
        return logp.add_(kept.log()).scatter_(-1, ids, mixed)  # no [B,T,V] copies when only reading


def _window(context: tuple) -> tuple[torch.Tensor, torch.Tensor, list[int] | None]:
    """A context: ids [B,C], absolute positions [B,C] and, optionally, positions[:, 0] known on the host
    (decoding knows them: its matches then read nothing back from the device) -> the three (None: unknown)."""
    ids, positions, *first = context
    return ids, positions, first[0] if first else None


def _gate(linear: nn.Linear | None, hidden: torch.Tensor | None) -> torch.Tensor | float:
    """A context gate's logit read from the SideNet's final states hidden [B,T,D] -> [B,T] (0 without a gate)."""
    if linear is None:
        return 0.0
    if hidden is None:
        raise ValueError("a copy head with a context gate needs the SideNet's hidden states")
    return hidden.float() @ linear.weight[0].float()  # (weights may be stored in bf16)


def _id_mass(ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Candidate ids [...,N] and weights [...,N] -> the total weight on each candidate's id [...,N]."""
    same = ids[..., :, None] == ids[..., None, :]  # [...,N,N]
    return (same * w[..., None, :]).sum(-1)


def _runs(top: torch.Tensor) -> torch.Tensor:
    """Best-match positions [B,H,T] (-1: none) -> for each token, how many of the RUN tokens
    before it continue an unbroken run of consecutive matches ending at it [B,H,T] (int)."""
    cont = torch.zeros_like(top, dtype=torch.bool)
    cont[..., 1:] = (top[..., 1:] == top[..., :-1] + 1) & (top[..., :-1] >= 0)  # t's match follows t-1's
    run = torch.zeros_like(top)
    alive = torch.ones_like(cont)
    for j in range(RUN):
        shifted = torch.zeros_like(cont)
        shifted[..., j:] = cont[..., : cont.shape[-1] - j]
        alive = alive & shifted
        run = run + alive
    return run
