"""MemTRM, the Memorizing Transformer (Wu et al. 2022), on the same backbone: the baseline of the paper.

No side network: the backbone's own layers from the memory layer on are fine-tuned on the frozen H_m
(r = 1), and the memory layer's attention reads a memory written by that same trainable layer
(``coupled``), so every entry written before a weight update is stale. Local and memory attention are
fused with MemTRM's learned per-head gate (two softmaxes):

    out_h = (1 - sigmoid(g_h)) * A_local + sigmoid(g_h) * A_memory

``coupled: false`` writes the frozen backbone's K/V instead: LongMem's decoupled memory with MemTRM's
capacity (the research log's equal-capacity comparison). The same trainer (``kind: memtrm``), memories,
short-term tier and evaluations as LongMem; no incremental decoding and no named memories (its memory
must be written by its own forward pass).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.model.backbone import FrozenBackbone
from longmem.model.blocks import MemoryBlock, MemoryContext, MemoryStats, Ropes, SideBlock
from longmem.model.longmem import LongMemModel

KIND = "longmem-memtrm"


@dataclass
class MemTRMConfig(LongMemConfig):
    """LongMem's settings where they apply; MemTRM has no copy head and no style adapter."""

    reduction: int = 1
    """Every layer from the memory layer up is fine-tuned (must be 1)."""
    copy_head: bool = False
    """MemTRM has no copy head (must be false)."""
    copy_gate: bool = False
    """(must be false)"""
    style_rank: int = 0
    """MemTRM has no style adapter (must be 0)."""
    coupled: bool = True
    """The memory is written by the trainable memory layer itself (MemTRM); false: by the frozen backbone."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduction != 1:
            raise LongMemError(f"MemTRM fine-tunes every upper layer: it needs reduction 1, not {self.reduction}")
        if self.copy_head or self.style_rank:
            raise LongMemError("MemTRM has no copy head and no style adapter (copy_head: false, style_rank: 0)")


def gated_fusion(local: torch.Tensor, mem: torch.Tensor, mem_lse: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """(1 - sigmoid(g)) * A + sigmoid(g) * M per head: local/mem [B,H,T,Dh], mem_lse [B,H,T], gate [H].
    Tokens with no memory entry keep A."""
    g = torch.sigmoid(gate.float()).view(1, -1, 1, 1)  # [1,H,1,1]
    g = torch.where(torch.isfinite(mem_lse).unsqueeze(-1), g, torch.zeros_like(g))  # [B,H,T,1]
    return ((1 - g) * local.float() + g * mem.float()).to(local.dtype)


class GatedMemoryBlock(MemoryBlock):
    """The memory layer with MemTRM's gate: two softmaxes mixed per head."""

    def fuse(self, q, k, v, past, cache, mem, mem_lse):
        local = self.local(q, k, v, past, cache)
        share = torch.sigmoid(self.gate.detach().float()).view(1, -1, 1) * torch.isfinite(mem_lse)  # [B,H,T]
        return local, gated_fusion(local, mem, mem_lse, self.gate), share


class UpperLayers(nn.Module):
    """The backbone's layers m..L-1 and its final norm, trainable copies, run on the frozen H_m."""

    def __init__(self, backbone: FrozenBackbone):
        super().__init__()
        family, m = backbone.family, backbone.memory_layer
        blocks = []
        for index in range(m, backbone.num_layers):
            layer = backbone.layers[index]
            shape = family.attn_shape(family.parts(layer)[1], backbone.model.config)
            window = family.window(backbone.model.config, index)
            blocks.append((GatedMemoryBlock if index == m else SideBlock)(layer, family, shape, index, window))
        self.blocks = nn.ModuleList(blocks)
        self.norm = copy.deepcopy(family.final_norm(backbone.model))
        self.requires_grad_(True)  # the copies come from a frozen backbone

    @property
    def memory_block(self) -> GatedMemoryBlock:
        return self.blocks[0]  # type: ignore[return-value]

    def forward(self, hidden: list[torch.Tensor], rope: Ropes | None, ctx: MemoryContext,
                caches=None) -> tuple[torch.Tensor, MemoryStats | None]:
        """hidden L+1 x [B,T,D] -> normed final state [B,T,D] and memory diagnostics."""
        if caches is not None:
            raise LongMemError("MemTRM does not decode incrementally")
        x, stats = hidden[self.memory_block.layer_index], None  # [B,T,D] H_m
        for block in self.blocks:
            if block is self.memory_block:
                local, fused, stats = block.attend(x, rope and rope[block.layer_index], ctx)
                x = block.finish(x, local if fused is None else fused)
            else:
                x = block(x, rope and rope[block.layer_index], ctx.past(block.layer_index))
        return self.norm(x), stats


class MemTRM(LongMemModel):
    """The MemTRM baseline as a model with LongMemModel's interface (forward, memories, save/load)."""

    kind = KIND
    decodes_incrementally = False

    @staticmethod
    def config_class() -> type:
        return MemTRMConfig

    @staticmethod
    def build_sidenet(backbone: FrozenBackbone, config: LongMemConfig) -> nn.Module:
        return UpperLayers(backbone)

    @property
    def frozen_memory(self) -> bool:
        return not self.config.coupled

    @torch.no_grad()
    def memory_entries(self, frozen) -> tuple[torch.Tensor, torch.Tensor]:
        """Coupled: the trainable memory layer's own K/V of H_m [B,H_kv,T,Dh] (stale after the next update)."""
        if not self.config.coupled:
            return frozen.mem_keys, frozen.mem_values
        _, keys, values = self.sidenet.memory_block.project(frozen.hidden[self.backbone.memory_layer])
        return keys, values
