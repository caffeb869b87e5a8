"""Copy head: a pointer to the tokens that followed earlier look-alikes of the current token.

For every token, the pre-rotary key of an early layer of the frozen backbone
(``pointer_layer``) is matched against the keys of everything the memory has read
(``TokenLog.match``, cosine, top k per KV head). In a passage that repeats earlier text the
best match is the source itself (early layers see mostly the local context, so a copied
token's key is nearly identical to its source's: cosine 0.99-1.0 at SmolLM2's layers 2-3,
bench/copy_probe.py), and the token that followed it is the next token. The head turns
the matches into a distribution over the vocabulary and mixes it with the model's own
(kNN-LM style, weights learned):

    p(v) = (1 - lam * m) * softmax(logits)(v) + lam * mean_h sum_k w[h,k] * [id(pos[h,k] + 1) == v]

w = softmax over a head's k matches of b_h * (sim - 1) / 0.01 + s * [the previous token's matches
include the position right before this match] (a match that continues a copy beats a
look-alike elsewhere), m = the pointer's known mass,
lam = sigmoid(a * f + g * agree + e * run + c) with f = (mean over heads of the best similarity
- 0.95) / 0.05, agree = the largest mass the pointer gives one token and run = how many of the
previous tokens (up to RUN) had their best match right before this token's best match (mean
over heads, / RUN): copying is trusted as much as the match is exact, its candidates agree
and it continues a copied run (an induction signal: a common phrase matches for a token or
two, a repeated passage for many). (A gate that also read the SideNet's hidden
state learned, on book text, to suppress copying in unfamiliar contexts such as a passkey:
30% passkey accuracy against 100% without it; removed.) Only the <= H_kv * k candidate ids
change from the model's log-probabilities (no dense [B,T,V] pointer is built). With an
empty memory nothing is mixed: the logits are the SideNet's own.
"""

from __future__ import annotations

import torch
from torch import nn

from .memory.tokens import TokenLog

SIM_ORIGIN, SIM_SCALE = 0.95, 0.05  # f = 0 at cosine 0.95, 1 at an exact match
RUN = 4  # previous tokens a copied run is counted over (decoding passes their match keys as history)


class CopyHead(nn.Module):
    """Learned mixing of a key-match pointer into the next-token distribution."""

    def __init__(self, num_kv_heads: int, topk: int = 4):
        super().__init__()
        self.topk = topk
        self.sharpness = nn.Parameter(torch.ones(num_kv_heads))  # b_h: nats per 0.01 of cosine
        self.slope = nn.Parameter(torch.tensor(6.0))  # a
        self.agree = nn.Parameter(torch.tensor(2.0))  # g
        self.run = nn.Parameter(torch.tensor(4.0))  # e
        self.follow = nn.Parameter(torch.tensor(3.0))  # s: nats for a match that continues the previous one
        self.offset = nn.Parameter(torch.tensor(-8.0))  # c: lam = 0.98 at an exact, unanimous run; 0.5 without run

    def candidates(self, keys: torch.Tensor, log: TokenLog, history: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """keys [B,Hkv,T,Dh] (after ``history`` [B,Hkv,P,Dh], the previous tokens' keys, if any) ->
        candidate ids [B,T,N] (N = Hkv * k; 0 where unknown), the pointer's mass on each
        candidate's id [B,T,N] (fp32; equal for repeated ids), its known mass [B,T], the mean
        best similarity [B,T] and the copied-run feature [B,T] in [0, 1]."""
        p = 0 if history is None else history.shape[2]
        if p:
            keys = torch.cat([history.to(keys.dtype), keys], 2)  # [B,Hkv,P+T,Dh]
        sims, pos = log.match(keys, self.topk)  # [B,Hkv,P+T,k]
        run = _runs(pos[..., 0])[:, :, p:].float().mean(1) / RUN  # [B,T]
        follows = torch.zeros_like(pos, dtype=torch.bool)  # [B,Hkv,P+T,k] continues one of t-1's matches
        follows[:, :, 1:] = ((pos[:, :, 1:, :, None] == pos[:, :, :-1, None, :] + 1)
                             & (pos[:, :, :-1, None, :] >= 0)).any(-1)
        sims, pos, follows = sims[:, :, p:], pos[:, :, p:], follows[:, :, p:]
        b, h, t, k = sims.shape
        nxt = log.lookup(torch.where(pos >= 0, pos + 1, pos))  # [B,Hkv,T,k] the token after each match
        found = pos >= 0  # a row with an empty log has no matches at all: keep every number finite
        sims = torch.where(found, sims, torch.full_like(sims, -1.0))
        logits = self.sharpness.float().view(1, h, 1, 1) * (sims - 1) / 0.01 + self.follow * follows
        w = torch.softmax(logits, -1) / h * (found & (nxt >= 0))  # [B,Hkv,T,k]
        w = w.permute(0, 2, 1, 3).reshape(b, t, h * k)  # [B,T,N]
        ids = nxt.clamp_min(0).permute(0, 2, 1, 3).reshape(b, t, h * k)  # [B,T,N]
        same = ids[..., :, None] == ids[..., None, :]  # [B,T,N,N]
        mass = (same * w[..., None, :]).sum(-1)  # [B,T,N]
        best = sims[..., 0].clamp_min(0).mean(1)  # [B,T]
        return ids, mass, w.sum(-1), best, run

    def pointer(self, keys: torch.Tensor, log: TokenLog, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys [B,Hkv,T,Dh] -> the dense pointer distribution [B,T,V] (fp32; mass < 1 where the next
        id is unknown) and the mean best similarity [B,T] (for analysis and tests)."""
        ids, mass, _, best, _ = self.candidates(keys, log)
        b, t, _ = ids.shape
        return torch.zeros(b, t, vocab, dtype=torch.float32).scatter(-1, ids, mass), best

    def weight(self, mass: torch.Tensor, best: torch.Tensor, run: torch.Tensor) -> torch.Tensor:
        """Candidate masses [B,T,N], mean best similarity [B,T], run feature [B,T] -> lam [B,T]."""
        f = (best - SIM_ORIGIN) / SIM_SCALE
        return torch.sigmoid(self.slope * f + self.agree * mass.amax(-1) + self.run * run + self.offset)

    def forward(self, logits: torch.Tensor, keys: torch.Tensor, log: TokenLog,
                history: torch.Tensor | None = None) -> torch.Tensor:
        """logits [B,T,V], match keys [B,Hkv,T,Dh] (history [B,Hkv,P,Dh]: the previous tokens' keys
        in the same window, P <= RUN) -> log-probabilities [B,T,V] (fp32)."""
        ids, mass, known, best, run = self.candidates(keys, log, history)  # [B,T,N] x2, [B,T] x3
        lam = self.weight(mass, best, run)  # [B,T]
        kept = (1 - lam * known).clamp_min(1e-30)[..., None]  # [B,T,1] the mass of unknown ids stays with the model
        logp = torch.log_softmax(logits.float(), -1)  # [B,T,V]
        mixed = torch.log((kept * logp.gather(-1, ids).exp() + lam[..., None] * mass).clamp_min(1e-30))  # [B,T,N]
        return (logp + kept.log()).scatter(-1, ids, mixed)


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
