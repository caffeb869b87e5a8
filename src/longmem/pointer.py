"""Copy head: a pointer over the retrieved memory tokens, mixed into the next-token distribution.

The memory block's attention over its K retrieved entries (per head, within memory) is a
distribution over earlier positions; the memory's token log says which token sits at each
position and which one follows it. The copy head turns that into a distribution over the
vocabulary and mixes it with the model's own (kNN-LM style, with the weights learned):

    p(v) = (1 - lam) * softmax(logits)(v) + lam * sum_{c,h} w[c,h] * sum_k a[h,k] * [id_c(k) == v]

c in {own token, next token} (an induction head looks at the token after an earlier match;
a duplicate-token head at the match itself), w = softmax over (c, h), and
lam = sigmoid(u . h_t + s . share_t + b) from the final hidden state and each head's
memory share. Exact recall of a number or a name read long ago is then a matter of
*finding* it (which retrieval does well) rather than re-deriving it through a few layers.
With an empty memory nothing is mixed: the logits are the SideNet's own.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .memory.tokens import TokenLog


@dataclass
class MemoryRead:
    """What the memory block read for every token (not detached: the copy head trains through it)."""

    probs: torch.Tensor  # [B,H,T,K] attention over the retrieved entries (within memory; 0 where masked)
    positions: torch.Tensor  # [B,Hs,T,K] their absolute positions
    share: torch.Tensor  # [B,H,T] the memory's share of each head's attention


class CopyHead(nn.Module):
    """Learned mixing of a pointer distribution over retrieved tokens into the logits."""

    def __init__(self, hidden_size: int, num_heads: int, bias: float = -3.0):
        super().__init__()
        self.mix = nn.Parameter(torch.zeros(2, num_heads))  # logits of w over (own | next, head)
        self.lam = nn.Linear(hidden_size, 1)
        self.share_weight = nn.Parameter(torch.zeros(num_heads))
        with torch.no_grad():
            self.lam.weight.zero_()
            self.lam.bias.fill_(bias)  # sigmoid(-3) = 0.047 of the mass to the pointer at the start

    def pointer(self, read: MemoryRead, log: TokenLog, vocab: int) -> torch.Tensor:
        """-> pointer distribution [B,T,V] (fp32; mass < 1 where ids are unknown: that share goes to the model)."""
        probs = read.probs.float()  # [B,H,T,K]
        b, h, t, k = probs.shape
        pos = read.positions
        if pos.shape[1] != h:  # one search per KV group: its heads share the entries
            pos = pos.repeat_interleave(h // pos.shape[1], dim=1)  # [B,H,T,K]
        ids = torch.stack([log.lookup(pos), log.lookup(pos + 1)])  # [2,B,H,T,K] own, next
        w = torch.softmax(self.mix.float().flatten(), 0).view(2, 1, h, 1, 1)  # [2,1,H,1,1]
        weights = probs.unsqueeze(0) * w * (ids >= 0)  # [2,B,H,T,K]
        ids = ids.clamp_min(0)
        weights = weights.permute(1, 3, 0, 2, 4).reshape(b, t, 2 * h * k)  # [B,T,2HK]
        ids = ids.permute(1, 3, 0, 2, 4).reshape(b, t, 2 * h * k)
        return torch.zeros(b, t, vocab, dtype=torch.float32).scatter_add(-1, ids, weights)

    def forward(self, logits: torch.Tensor, hidden: torch.Tensor, read: MemoryRead, log: TokenLog) -> torch.Tensor:
        """logits [B,T,V], final hidden [B,T,D] -> log-probabilities [B,T,V] (fp32) of the mixture."""
        ptr = self.pointer(read, log, logits.shape[-1])  # [B,T,V]
        share = read.share.float().transpose(1, 2)  # [B,T,H]
        gate = torch.nn.functional.linear(hidden.float(), self.lam.weight.float(), self.lam.bias.float())  # [B,T,1]
        lam = torch.sigmoid(gate.squeeze(-1) + share @ self.share_weight.float())  # [B,T]
        lam = lam.unsqueeze(-1)  # [B,T,1]
        kept = 1 - lam * ptr.sum(-1, keepdim=True)  # the mass of unknown ids stays with the model
        mixed = kept * torch.softmax(logits.float(), -1) + lam * ptr  # [B,T,V]
        return torch.log(mixed.clamp_min(1e-30))
