"""What one forward pass of ``LongMemModel`` returns (its own module, so that the decoding loop can build one
without importing the model, whose ``generate`` calls that loop)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longmem.model.blocks import MemoryStats
from longmem.model.copy_head import CopySources


@dataclass
class LongMemOutput:
    """Result of one segment (or of the new tokens of a decode step)."""

    logits: torch.Tensor | None  # [B,T,V] (log-probabilities once the copy head mixes)
    loss: torch.Tensor | None  # scalar mean cross-entropy over labelled tokens
    mem_keys: torch.Tensor  # [B,H_kv,T,Dh] backbone memory-layer keys of this segment
    mem_values: torch.Tensor  # [B,H_kv,T,Dh]
    positions: torch.Tensor  # [B,T] absolute positions of the segment's tokens
    backbone_logits: torch.Tensor | None = None  # [B,T,V] the frozen backbone's own logits
    stats: MemoryStats | None = None
    layer_keys: torch.Tensor | None = None  # [L,B,H_kv,T,Dh] every layer's keys, when a short-term tier is read
    layer_values: torch.Tensor | None = None  # [L,B,H_kv,T,Dh]
    input_ids: torch.Tensor | None = None  # [B,T] the segment's tokens (a copy head's memory notes them)
    match_keys: torch.Tensor | None = None  # [B,H_kv,T,Dh] pre-rotary keys of the copy head's match layer
    copy_sources: CopySources | None = None  # where the copy head's candidates sit (``forward(trace=True)``)
