"""Copy head: a pointer to the tokens that followed earlier look-alikes of the current token.

Two sources, mixed into the next-token distribution kNN-LM style (weights learned):

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

from longmem.memory.suffix import suffix_matches
from longmem.memory.token_log import TokenLog

SIM_ORIGIN, SIM_SCALE = 0.95, 0.05  # f = 0 at cosine 0.95, 1 at an exact match
RUN = 4  # previous tokens a copied run is counted over (decoding keeps their match positions as history)
LENGTH_EDGES = (3, 4, 5, 6, 8, 11, 16, 23, 32)  # exact-match length buckets: <3, 3, 4, 5, 6-7, ..., 32
MIN_MATCH = 3  # exact matches count from this many tokens
LENGTH_REP = (2.0, 3.0, 4.0, 5.0, 6.5, 9.0, 13.0, 19.0, 27.0, 32.0)  # a typical length in each bucket


class Candidates(NamedTuple):
    """What the key matches of T tokens propose (N = Hkv * k candidates per token)."""

    ids: torch.Tensor  # [B,T,N] the id after each match (0 where unknown)
    weights: torch.Tensor  # [B,T,N] pointer weight (fp32; 0 where unknown; sums to <= 1)
    best: torch.Tensor  # [B,T] mean over heads of the best cosine similarity
    run: torch.Tensor  # [B,T] the copied-run feature in [0, 1]
    positions: torch.Tensor  # [B,Hkv,T,k] the matches' absolute positions (-1: none): the next call's history


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
        """Exact suffix matches for the last T tokens of context (ids [B,C], absolute positions [B,C]);
        logp [B,T,V] the model's log-probabilities (hidden [B,T,D]: the SideNet's final states, read
        by a head with a context gate) -> candidate ids [B,T,M], their weights [B,T,M] (fp32, sum 1
        where any match; softmax of kappa * length) and lam_n [B,T] (0 without a match)."""
        pos, length, nxt, local = suffix_matches(log, *context, logp.shape[1], MIN_MATCH, local=True)
        found = (pos >= 0) & (nxt >= 0)  # [B,T,M]
        score = torch.where(found, self.length_sharp * length.float(), torch.full_like(length, -1e4, dtype=torch.float))
        w = torch.softmax(score, -1) * found  # [B,T,M]
        ids = nxt.clamp_min(0)
        longest = torch.where(found, length, -1).amax(-1, keepdim=True)  # [B,T,1]
        bucket = torch.bucketize(longest[..., 0].clamp_min(0), torch.tensor(LENGTH_EDGES), right=True)  # [B,T]
        with torch.no_grad():  # a feature, not a path for gradients; one product-sum pass over the vocabulary
            entropy = -torch.einsum("btv,btv->bt", logp.exp(), logp) / math.log(logp.shape[-1])  # [B,T] in [0, 1]
        u = self.length_bias[bucket] + self.ngram_agree * _id_mass(ids, w).amax(-1) + self.uncertain * entropy
        from_context = (local & found & (length == longest)).any(-1)  # [B,T] the longest match is local
        u = u + self.local_bias * from_context
        if self.context is not None:
            if hidden is None:
                raise ValueError("a copy head with a context gate needs the SideNet's hidden states")
            u = u + hidden.float() @ self.context.weight[0].float()  # [B,T] (weights may be stored in bf16)
        return ids, w, torch.sigmoid(u) * found.any(-1)

    def pointer(self, keys: torch.Tensor, log: TokenLog, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys [B,Hkv,T,Dh] -> the key-match pointer as a dense distribution [B,T,V] (fp32; mass < 1
        where the next id is unknown) and the mean best similarity [B,T] (for analysis and tests)."""
        c = self.candidates(keys, log)
        ids, w, best = c.ids, c.weights, c.best
        b, t, _ = ids.shape
        return torch.zeros(b, t, vocab, dtype=torch.float32).scatter(-1, ids, _id_mass(ids, w)), best

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
            context: tuple[torch.Tensor, torch.Tensor] | None = None, hidden: torch.Tensor | None = None
            ) -> torch.Tensor:
        """logits [B,T,V] and their key-match candidates -> log-probabilities [B,T,V] (fp32):

        p = (1 - lam_n) * [(1 - lam * m) * p_model + lam * pointer] + lam_n * exact pointer."""
        ids, w = cand.ids, cand.weights  # [B,T,N] x2
        lam = self.weight(_id_mass(ids, w), cand.best, cand.run)  # [B,T]
        kept = 1 - lam * w.sum(-1)  # [B,T] the model's share (the mass of unknown ids stays with it)
        w = lam[..., None] * w
        logp = torch.log_softmax(logits.float(), -1)  # [B,T,V]
        if context is None:
            raise ValueError("the copy head's exact matches need the context ids")
        ids_n, w_n, lam_n = self.exact(log, context, logp, hidden)  # [B,T,M] x2, [B,T]
        kept = (1 - lam_n) * kept
        ids = torch.cat([ids, ids_n], -1)
        w = torch.cat([(1 - lam_n)[..., None] * w, lam_n[..., None] * w_n], -1)
        mass = _id_mass(ids, w)  # [B,T,N']
        kept = kept.clamp_min(1e-30)[..., None]  # [B,T,1]
        mixed = torch.log((kept * logp.gather(-1, ids).exp() + mass).clamp_min(1e-30))  # [B,T,N']
        if torch.is_grad_enabled():  # log_softmax's backward needs its output as it was
            return (logp + kept.log()).scatter(-1, ids, mixed)
        return logp.add_(kept.log()).scatter_(-1, ids, mixed)  # no [B,T,V] copies when only reading


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
