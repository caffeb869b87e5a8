"""int8 storage of cached keys/values: symmetric, one scale per token and head.

A vector x [Dh] is stored as q = round(x / s) in [-127, 127] (int8) with s = max|x| / 127,
rounded up to bf16 (so any float range fits and |x / s| <= 127). Dequantising gives q * s;
the error of every element is at most s / 2, about max|x| / 252. One bf16 scale per
Dh = 64 int8 values adds 3%.
"""

from __future__ import annotations

import torch

SCALE_DTYPE = torch.bfloat16


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., Dh] float -> (q [..., Dh] int8, scale [...] bf16)."""
    x = x.float()
    scale = (x.abs().amax(-1) * ((1 + 2**-7) / 127)).to(SCALE_DTYPE)  # [...] >= max|x| / 127 after rounding
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]  # the rounded scale, as stored
    q = (x / s).round().clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(q [..., Dh] int8, scale [...]) -> x [..., Dh] in ``dtype``."""
    return (q.float() * scale.float()[..., None]).to(dtype)
