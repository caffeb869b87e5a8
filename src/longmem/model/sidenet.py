"""SideNet: L/r trainable copies of backbone blocks with cross-network residuals.

Block j (0-based) copies backbone layer r*(j+1)-1 and runs the same computation as that
layer (pre-norm attention + MLP) through the family adapter. The memory block (the copy
of the memory layer) also attends to the K entries retrieved for every token and fuses
them with its local attention. ``x_0 = H_0``, ``x_j = f_j(x_{j-1}) + (H_{r(j+1)} - H_{rj})``.

Two other layouts share the blocks: the memory-delta SideNet (``init: delta``, see
``_forward_delta``) and, for the MemTRM baseline, no side network at all (``init: upper``):
the backbone's own layers from the memory layer on, run on H_m and fine-tuned.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from longmem.model.attention import Past, gated_fusion, joint_fusion, local_attention, local_attention_lse, memory_attention
from longmem.model.backbone import FrozenBackbone
from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.model.families import AttnShape, Family, apply_rope, apply_rope_half
from longmem.memory.bank import MemoryBank
from longmem.memory.tier import RecentCache
from longmem.model.copy_head import CopyHead


@dataclass
class MemoryContext:
    """Everything the memory block reads; the bank is only read, never written."""

    bank: MemoryBank | None
    query_positions: torch.Tensor  # [B,T] absolute positions of the segment's tokens
    search_rope: tuple[torch.Tensor, torch.Tensor] | None  # cos/sin [B,T,Dh] to rotate search queries
    scheme: str  # 'none' | 'pre_rotary' | 'fixed' | 'true'
    rope_table: tuple[torch.Tensor, torch.Tensor] | None  # cos/sin [Dmax+1,Dh/2] of distance d (key at -d)
    max_distance: int
    fixed_distance: int
    num_chunks: int  # K / csz
    per_kv_head: bool
    recent: RecentCache | None = None  # short-term tier: every layer's K/V of the last tokens read

    def past(self, layer: int) -> Past | None:
        """The short-term tier's keys, values [B,H_kv,P,Dh] and valid [B,P] of backbone ``layer``."""
        return None if self.recent is None or self.recent.is_empty() else self.recent.layer(layer)


@dataclass
class MemoryStats:
    """Diagnostics of one memory block pass (detached)."""

    gate: torch.Tensor  # [H] sigmoid of the per-head gates ('gated'), or the memory log-bias ('joint')
    memory_share: float  # mean weight of the memory branch over tokens and heads
    entropy: float  # mean entropy (nats) of memory attention over retrieved entries
    retrieved: int  # entries retrieved per token and head that were real (mean)


class SideBlock(nn.Module):
    """A trainable copy of one backbone decoder layer (pre-norm attention + MLP)."""

    def __init__(self, layer: nn.Module, family: Family, shape: AttnShape):
        super().__init__()
        attn_norm, attn, mlp_norm, mlp = (copy.deepcopy(m) for m in family.parts(layer))
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
        self.family, self.shape = family, shape

    def zero_outputs(self) -> None:
        """Make the block an identity map (identity initialisation)."""
        with torch.no_grad():
            for module in self.family.output_projections(self.attn, self.mlp):
                for param in module.parameters():
                    param.zero_()

    def project(self, x: torch.Tensor):
        """x [B,T,D] -> q [B,H,T,Dh], k, v [B,H_kv,T,Dh] (before positions)."""
        h = self.attn_norm(x)
        q = self.family.queries(self.attn, h, self.shape)
        k, v = self.family.keys_values(self.attn, h, self.shape)
        return q, k, v

    def finish(self, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Residual attention output o [B,H,T,Dh] then the MLP -> [B,T,D]."""
        b, h, t, dh = o.shape
        x = x + self.family.attn_output(self.attn, o.transpose(1, 2).reshape(b, t, h * dh))
        return x + self.mlp(self.mlp_norm(x))

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None, past: Past | None = None
    ) -> torch.Tensor:
        """x [B,T,D], rope cos/sin [T,Dh] or None, past (short-term K/V) -> [B,T,D]."""
        q, k, v = self.project(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.finish(x, local_attention(q, k, v, self.shape.scaling, past))


class MemoryBlock(SideBlock):
    """The memory-augmented block: local causal attention fused with retrieved memory."""

    def __init__(self, layer: nn.Module, family: Family, shape: AttnShape, fusion: str, layer_index: int):
        super().__init__(layer, family, shape)
        self.fusion = fusion
        self.layer_index = layer_index  # the backbone layer this block copies
        self.gate = nn.Parameter(torch.zeros(shape.num_heads))  # g_h, sigmoid(0) = 0.5

    def forward(self, x, rope, ctx: MemoryContext):  # type: ignore[override]
        """x [B,T,D] -> ([B,T,D], MemoryStats | None)."""
        local, fused, stats = self._attend(x, rope, ctx)
        return self.finish(x, local if fused is None else fused), stats

    def delta(self, x, rope, ctx: MemoryContext) -> tuple[torch.Tensor | None, MemoryStats | None]:
        """The change memory makes to this block's output: f(x; memory) - f(x; local only).

        x [B,T,D] -> delta [B,T,D] (None while the memory is empty), diagnostics.
        """
        local, fused, stats = self._attend(x, rope, ctx)
        if fused is None:
            return None, None
        return self.memory_change(x, fused, local), stats

    def memory_change(self, x: torch.Tensor, fused: torch.Tensor, local: torch.Tensor) -> torch.Tensor:
        """finish(x, fused) - finish(x, local) [B,T,D] for the attention outputs [B,H,T,Dh] with and
        without memory, both in one batched call."""
        return paired_difference(lambda both: self.finish(torch.cat([x, x]), both), fused, local)

    def _attend(self, x, rope, ctx: MemoryContext):
        """(local-only output [B,H,T,Dh], memory-fused output or None, stats or None)."""
        past = ctx.past(self.layer_index)
        q, k, v = self.project(x)
        q_loc, k_loc = (apply_rope(q, *rope), apply_rope(k, *rope)) if rope is not None else (q, k)
        scale = self.shape.scaling
        found = None
        if ctx.bank is not None:  # pre-rotary q searches, or q rotated to its absolute position
            search = q.detach() if ctx.search_rope is None else apply_rope(
                q.detach().float(), ctx.search_rope[0][:, None], ctx.search_rope[1][:, None])
            found = ctx.bank.retrieve(search, ctx.num_chunks, ctx.per_kv_head)
        if found is None:
            return local_attention(q_loc, k_loc, v, scale, past), None, None
        mem_keys = self._place(found.keys, found.positions, ctx)  # [B,Hs,T,K,Dh]
        mem, mem_lse, probs = memory_attention(q, mem_keys.to(q.dtype), found.values.to(q.dtype), found.mask, scale)
        if self.fusion == "gated":
            local = local_attention(q_loc, k_loc, v, scale, past)
            fused = gated_fusion(local, mem, mem_lse, self.gate)
            share = torch.sigmoid(self.gate.detach().float()).view(1, -1, 1) * torch.isfinite(mem_lse)
        else:  # one softmax; the gate is a learned per-head log-bias on memory scores
            local, local_lse = local_attention_lse(q_loc, k_loc, v, scale, past)
            fused, share = joint_fusion(local, local_lse, mem, mem_lse + self.gate.float().view(1, -1, 1))
        return local, fused, _stats(self.gate, share, probs, self.fusion)

    def _place(self, keys: torch.Tensor, positions: torch.Tensor, ctx: MemoryContext) -> torch.Tensor:
        """Apply the position scheme to retrieved keys [B,Hs,T,K,Dh] (positions [B,Hs,T,K])."""
        if ctx.scheme in ("none", "pre_rotary"):
            return keys
        cos, sin = ctx.rope_table  # type: ignore[misc]  # [Dmax+1,Dh/2]
        if ctx.scheme == "fixed":
            d = ctx.fixed_distance
            return apply_rope_half(keys, cos[d], sin[d])
        dist = (ctx.query_positions[:, None, :, None] - positions).clamp(0, ctx.max_distance)  # [B,Hs,T,K]
        return apply_rope_half(keys, cos[dist], sin[dist])


@torch.no_grad()
def _stats(gate: torch.Tensor, share: torch.Tensor, probs: torch.Tensor, fusion: str) -> MemoryStats:
    ent = -(probs.float() * probs.float().clamp_min(1e-12).log()).sum(-1)  # [B,H,T]
    g = gate.detach().float()
    return MemoryStats(
        gate=torch.sigmoid(g) if fusion == "gated" else g,
        memory_share=float(share.float().mean()),
        entropy=float(ent.mean()),
        retrieved=int((probs > 0).sum(-1).float().mean().round()),
    )


class SideNet(nn.Module):
    """The trainable side network; see the module docstring."""

    def __init__(self, backbone: FrozenBackbone, config: LongMemConfig):
        super().__init__()
        family, r, num = backbone.family, config.reduction, backbone.num_layers
        m = backbone.memory_layer
        if num // r < 1:
            raise LongMemError(f"reduction r={r} leaves no SideNet block for a {num}-layer backbone")
        if (m + 1) % r:
            raise LongMemError(
                f"memory_layer={m} has no SideNet copy with r={r}: (memory_layer + 1) must be a multiple of r"
            )
        self.reduction, self.num_backbone_layers = r, num
        self.memory_index = (m + 1) // r - 1
        self.delta, self.upper = config.init == "delta", config.init == "upper"
        self.first = self.memory_index if self.delta or self.upper else 0  # no blocks below memory
        blocks = []
        for j in range(self.first, num // r):
            layer = backbone.layers[r * (j + 1) - 1]
            shape = family.attn_shape(family.parts(layer)[1], backbone.model.config)
            if j == self.memory_index:
                blocks.append(MemoryBlock(layer, family, shape, config.fusion, r * (j + 1) - 1))
            else:
                blocks.append(SideBlock(layer, family, shape))
        self.blocks = nn.ModuleList(blocks)
        self.norm = copy.deepcopy(family.final_norm(backbone.model))
        self.pointer = CopyHead(self.memory_block.shape.num_kv_heads, ngram=config.pointer_ngram,
                                local=config.pointer_local,
                                context_dim=backbone.model.config.hidden_size if config.pointer_context else 0
                                ) if config.pointer else None
        self.requires_grad_(True)  # the copies come from a frozen backbone
        if config.init == "identity":
            for block in self.blocks:
                block.zero_outputs()
        if self.delta:  # the final norm stays the backbone's: without memory nothing may change
            self.norm.requires_grad_(False)
        hidden_size = backbone.model.config.hidden_size
        self.style = StyleAdapter(hidden_size, config.style_rank) if config.style_rank else None
        # style_layers 'all': one more adapter at the input of every later copied layer and one at the final state
        per_layer = config.style_rank and config.style_layers == "all"
        self.styles = nn.ModuleList(StyleAdapter(hidden_size, config.style_rank, config.style_width)
                                    for _ in self.blocks) if per_layer else None

    @property
    def memory_block(self) -> MemoryBlock:
        return self.blocks[self.memory_index - self.first]  # type: ignore[return-value]

    def forward(
        self, hidden: list[torch.Tensor], rope: tuple[torch.Tensor, torch.Tensor] | None, ctx: MemoryContext
    ) -> tuple[torch.Tensor, MemoryStats | None]:
        """hidden L+1 x [B,T,D] -> normed final state [B,T,D] and memory diagnostics."""
        if self.delta:
            return self._forward_delta(hidden, rope, ctx)
        if self.upper:
            return self._forward_upper(hidden, rope, ctx)
        r, last = self.reduction, len(self.blocks) - 1
        x, stats = hidden[0], None
        for j, block in enumerate(self.blocks):
            end = self.num_backbone_layers if j == last else r * (j + 1)
            if j == self.memory_index:
                x, stats = block(x, rope, ctx)
            else:
                x = block(x, rope, ctx.past(r * (j + 1) - 1))
            x = x + (hidden[end] - hidden[r * j])  # cross-network residual
        return self.norm(x), stats

    def _forward_upper(self, hidden, rope, ctx):
        """MemTRM layout (r = 1): the backbone's layers m..L-1, trainable, on the frozen H_m."""
        x, stats = hidden[self.first], None
        for j, block in enumerate(self.blocks, start=self.first):
            if j == self.memory_index:
                x, stats = block(x, rope, ctx)
            else:
                x = block(x, rope, ctx.past(j))
        return self.norm(x), stats

    def _forward_delta(self, hidden, rope, ctx):
        """Memory-delta SideNet: the backbone's own layers carry the change memory makes.

        The memory block is the memory layer on its true input H_m, once with and once
        without memory; the difference rides on the residual stream and every later copied
        layer passes on f(H + delta) - f(H). An empty memory gives the backbone exactly (without a style
        adapter; with one, the backbone plus the adapter's change).
        """
        r = self.reduction
        h_m = hidden[r * (self.memory_index + 1) - 1]
        delta, stats = self.memory_block.delta(h_m, rope, ctx)
        delta = self.add_style(delta, h_m)
        if delta is None:
            return self.norm(hidden[-1]), None
        for i, (j, block) in enumerate(enumerate(self.blocks[1:], start=self.first + 1)):
            h = hidden[r * (j + 1) - 1]  # the copied layer's input in the backbone
            delta = self.later_style(i, delta, h)
            past = ctx.past(r * (j + 1) - 1)
            past = None if past is None else tuple(torch.cat([t, t]) for t in past)  # both streams read it
            delta = paired_difference(lambda both: block(both, rope, past), h + delta, h)  # type: ignore[arg-type]
        return self.norm(hidden[-1] + self.later_style(-1, delta, hidden[-1])), stats

    def add_style(self, delta: torch.Tensor | None, h_m: torch.Tensor) -> torch.Tensor | None:
        """The memory block's change [B,T,D] (None: no memory read) plus the style adapter's, if any."""
        if self.style is None:
            return delta
        style = self.style(h_m)
        return style if delta is None else delta + style

    def later_style(self, i: int, delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """delta [B,T,D] plus the change of the style adapter before later copied block i (-1: before the final
        norm) on the backbone's state h [B,T,D] there; delta alone without per-layer adapters."""
        return delta if self.styles is None else delta + self.styles[i](h)


class StyleAdapter(nn.Module):
    """A change [B,T,D] -> [B,T,D] to a layer's input, the same with or without memory: low-rank
    up(down(rms(x))), or with ``width`` > 0 a small MLP up(silu(down(rms(x)))) of that hidden width;
    ``up`` starts at zero (nothing changes at step 0)."""

    def __init__(self, dim: int, rank: int, width: int = 0):
        super().__init__()
        inner = width or rank
        self.down = nn.Linear(dim, inner, bias=False)  # [inner, D]
        self.up = nn.Linear(inner, dim, bias=False)  # [D, inner]
        self.act = nn.SiLU() if width else nn.Identity()
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.nn.functional.rms_norm(x, (x.shape[-1],))
        return self.up(self.act(self.down(x)))


def paired_difference(f, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """f(a) - f(b) for a row-wise f, computed as one batch f([a; b]) (a, b [B,...]): the two streams of
    the memory-delta SideNet share every weight load and call (twice the rows, half the calls)."""
    both = f(torch.cat([a, b]))  # [2B,...]
    return both[: a.shape[0]] - both[a.shape[0] :]
