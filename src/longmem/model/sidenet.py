"""SideNet: the memory-delta side network.

Block j copies backbone layer r*(j+1)-1, from the memory layer up (5 of SmolLM2's 30 layers with
r = 2). The memory block is the memory layer on its true input H_m, run once with and once without
memory in one batched call; the difference (plus the style adapter's change) rides on the frozen
residual stream, and every later copied layer passes on f(H + delta) - f(H). So with an empty memory
and no style adapter the model *is* the backbone, and every gain it shows is the memory's:

    delta_m = f_m(H_m; memory) - f_m(H_m) + style(H_m)
    delta_j = f_j(H_j + delta_{j-1}) - f_j(H_j)           for the later copied layers j
    out     = norm(H_L + delta_last)

(The paper's layout, x_l = f_l(x_{l-1}) + (H_{rl} - H_{r(l-1)}) over L/r copied blocks, learned to
ignore its memory here: research log, *SideNet initialisation*.)
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from longmem.errors import LongMemError
from longmem.model.backbone import FrozenBackbone
from longmem.model.blocks import MemoryBlock, MemoryContext, MemoryStats, Ropes, SideBlock, paired_difference
from longmem.model.cache import KVBuffer
from longmem.model.copy_head import CopyHead
from longmem.model.style import StyleAdapter


class SideNet(nn.Module):
    """The trainable side network; see the module docstring."""

    def __init__(self, backbone: FrozenBackbone, reduction: int, style_rank: int = 0, copy_head: bool = False,
                 copy_gate: bool = False):
        super().__init__()
        family, r, m = backbone.family, reduction, backbone.memory_layer
        if (m + 1) % r:
            raise LongMemError(
                f"memory_layer={m} has no SideNet copy with r={r}: (memory_layer + 1) must be a multiple of r"
            )
        self.reduction = r
        blocks = []
        for index in range(m, backbone.num_layers, r):  # the memory layer, then every r-th layer above it
            layer = backbone.layers[index]
            shape = family.attn_shape(family.parts(layer)[1], backbone.model.config)
            block = MemoryBlock if index == m else SideBlock
            blocks.append(block(layer, family, shape, index, family.window(backbone.model.config, index)))
        self.blocks = nn.ModuleList(blocks)
        self.norm = copy.deepcopy(family.final_norm(backbone.model))  # frozen: without memory nothing may change
        hidden_size = backbone.model.config.hidden_size
        self.copy_head = CopyHead(self.memory_block.shape.num_kv_heads,
                                  context_dim=hidden_size if copy_gate else 0) if copy_head else None
        self.requires_grad_(True)  # the copies come from a frozen backbone
        self.norm.requires_grad_(False)
        self.style = StyleAdapter(hidden_size, style_rank) if style_rank else None

    @property
    def memory_block(self) -> MemoryBlock:
        return self.blocks[0]  # type: ignore[return-value]

    def forward(self, hidden: list[torch.Tensor], rope: Ropes | None, ctx: MemoryContext,
                caches: list[KVBuffer] | None = None) -> tuple[torch.Tensor, MemoryStats | None]:
        """hidden L+1 x [B,T,D] (the frozen residual stream), rope: each copied layer's cos/sin [T,Dh] (None
        without rotary positions) -> normed final state [B,T,D] and memory diagnostics. ``caches``
        (decoding): one KVBuffer per block, holding the window so far."""
        block = self.memory_block
        h_m = hidden[block.layer_index]  # [B,T,D] the memory layer's input
        delta, stats = block.delta(h_m, rope and rope[block.layer_index], ctx, caches[0] if caches else None)
        if self.style is not None:
            style = self.style(h_m)
            delta = style if delta is None else delta + style
        if delta is None:  # no memory read and no style adapter: the backbone itself
            return self.norm(hidden[-1]), None
        for i, later in enumerate(self.blocks[1:], start=1):
            h = hidden[later.layer_index]  # the copied layer's input in the backbone
            cache = caches[i] if caches else None
            past = None if cache is not None else ctx.past(later.layer_index)
            past = None if past is None else tuple(torch.cat([t, t]) for t in past)  # both streams read the tier
            lr = rope and rope[later.layer_index]
            delta = paired_difference(lambda both: later(both, lr, past, cache), h + delta, h)  # type: ignore
        return self.norm(hidden[-1] + delta), stats
