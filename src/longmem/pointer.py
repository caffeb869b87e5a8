"""Copy head: a pointer to the tokens that followed earlier look-alikes of the current token.

For every token, the memory-layer key of the frozen backbone (pre-rotary) is matched
against the keys of everything the memory has read (``TokenLog.match``, cosine, top k per
KV head). In a passage that repeats earlier text the best match is, after a few tokens, the
source itself (similarity ~0.98-0.99: the frozen layer sees the same local context), and the
token that followed it is the next token. The head turns the matches into a distribution
over the vocabulary and mixes it with the model's own (kNN-LM style, weights learned):

    p(v) = (1 - lam * m) * softmax(logits)(v) + lam * mean_h sum_k w[h,k] * [id(pos[h,k] + 1) == v]

w = softmax over a head's k matches of b_h * (sim - 1) / 0.01, m = the pointer's known mass,
lam = sigmoid(a * f + c + u . h_t) with f = (mean over heads of the best similarity - 0.95)
/ 0.05: copying is trusted as much as the match is exact. With an empty memory nothing is
mixed: the logits are the SideNet's own.
"""

from __future__ import annotations

import torch
from torch import nn

from .memory.tokens import TokenLog

SIM_ORIGIN, SIM_SCALE = 0.95, 0.05  # f = 0 at cosine 0.95, 1 at an exact match


class CopyHead(nn.Module):
    """Learned mixing of a key-match pointer into the next-token distribution."""

    def __init__(self, hidden_size: int, num_kv_heads: int, topk: int = 4):
        super().__init__()
        self.topk = topk
        self.sharpness = nn.Parameter(torch.ones(num_kv_heads))  # b_h: nats per 0.01 of cosine
        self.slope = nn.Parameter(torch.tensor(6.0))  # a
        self.offset = nn.Parameter(torch.tensor(-4.0))  # c: lam = 0.88 at an exact match, 0.02 at 0.95
        self.lam = nn.Linear(hidden_size, 1)  # u (zero at the start)
        with torch.no_grad():
            self.lam.weight.zero_()
            self.lam.bias.zero_()

    def pointer(self, keys: torch.Tensor, log: TokenLog, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """keys [B,Hkv,T,Dh] -> pointer distribution [B,T,V] (fp32; mass < 1 where the next id is
        unknown) and the mean best similarity [B,T]."""
        sims, pos = log.match(keys, self.topk)  # [B,Hkv,T,k]
        b, h, t, k = sims.shape
        nxt = log.lookup(torch.where(pos >= 0, pos + 1, pos))  # [B,Hkv,T,k] the token after each match
        known = pos >= 0  # a row with an empty log has no matches at all: keep every number finite
        sims = torch.where(known, sims, torch.full_like(sims, -1.0))
        logits = self.sharpness.float().view(1, h, 1, 1) * (sims - 1) / 0.01
        w = torch.softmax(logits, -1) / h * (known & (nxt >= 0))  # [B,Hkv,T,k]
        w = w.permute(0, 2, 1, 3).reshape(b, t, h * k)  # [B,T,HK]
        ids = nxt.clamp_min(0).permute(0, 2, 1, 3).reshape(b, t, h * k)
        best = sims[..., 0].clamp_min(0).mean(1)  # [B,T]
        return torch.zeros(b, t, vocab, dtype=torch.float32).scatter_add(-1, ids, w), best

    def forward(self, logits: torch.Tensor, hidden: torch.Tensor, keys: torch.Tensor, log: TokenLog) -> torch.Tensor:
        """logits [B,T,V], final hidden [B,T,D], memory-layer keys [B,Hkv,T,Dh] -> log-probabilities [B,T,V]."""
        ptr, best = self.pointer(keys, log, logits.shape[-1])  # [B,T,V], [B,T]
        f = (best - SIM_ORIGIN) / SIM_SCALE
        gate = torch.nn.functional.linear(hidden.float(), self.lam.weight.float(), self.lam.bias.float())  # [B,T,1]
        lam = torch.sigmoid(self.slope * f + self.offset + gate.squeeze(-1)).unsqueeze(-1)  # [B,T,1]
        kept = 1 - lam * ptr.sum(-1, keepdim=True)  # the mass of unknown ids stays with the model
        mixed = kept * torch.softmax(logits.float(), -1) + lam * ptr  # [B,T,V]
        return torch.log(mixed.clamp_min(1e-30))
