"""The style adapter: a change to the memory layer's input that is the same with or without memory.

What any text of a domain teaches (its register, names, idiom) is learned here, in the weights, so that
the memory is left to carry what only it holds (research log: *Style adapter*). Low-rank
up(down(rms(x))); ``up`` starts at zero, so a fresh adapter changes nothing, and ``down`` from a fixed seed, so
that two fresh SideNets are the same SideNet (a memory read by one is read by the other).
"""

from __future__ import annotations

import math

import torch
from torch import nn


class StyleAdapter(nn.Module):
    """x [B,T,D] -> a change [B,T,D] of rank ``rank``."""

    def __init__(self, dim: int, rank: int):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)  # [R,D]
        self.up = nn.Linear(rank, dim, bias=False)  # [D,R]
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=torch.Generator().manual_seed(0))
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],))
        return self.up(self.down(x))
