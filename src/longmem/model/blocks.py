"""SideNet blocks: trainable copies of backbone decoder layers, and the memory block.

A block runs the same computation as the backbone layer it copies (pre-norm attention + MLP,
through the family adapter). Its local attention reads a short-term tier ahead of the tokens
(``past``, when a segment is read) or the window cached so far (``cache``, when decoding): the
same block code serves training, reading and decoding. The memory block (the copy of the memory
layer) also attends to the K entries retrieved for every token and merges them with its local
attention in one joint softmax.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import nn

from longmem.memory.bank import MemoryBank, Retrieved
from longmem.memory.tier import RecentCache
from longmem.model.attention import (Past, cached_attention, cached_attention_lse, joint_fusion, local_attention,
                                     local_attention_lse, memory_attention, windowed_attention_lse)
from longmem.model.cache import KVBuffer
from longmem.model.families import AttnShape, Family, apply_rope, apply_rope_half

Rope = tuple[torch.Tensor, torch.Tensor]  # cos/sin [T,Dh] of the tokens' local positions
Ropes = dict[int, Rope]  # backbone layer -> its Rope (layers of one model may use different tables: Gemma 3)


@dataclass
class MemoryContext:
    """Everything the memory block reads; the bank is only read, never written."""

    bank: MemoryBank | None
    query_positions: torch.Tensor  # [B,T] absolute positions of the tokens
    search_rope: Rope | None  # cos/sin [B,T,Dh] rotating search queries to their absolute positions (rotary)
    rope_table: Rope | None  # cos/sin [Dmax+1,Dh/2] of distance d (a key d tokens back; rotary backbones)
    max_distance: int  # retrieved keys sit at their true distance, clamped here
    num_chunks: int  # K / csz
    recent: RecentCache | None = None  # short-term tier: every layer's K/V of the last tokens read

    def past(self, layer: int) -> Past | None:
        """The short-term tier's keys, values [B,H_kv,P,Dh] and valid [B,P] of backbone ``layer``."""
        return None if self.recent is None or self.recent.is_empty() else self.recent.layer(layer)


@dataclass
class MemoryStats:
    """Diagnostics of one memory block pass (detached tensors; the numbers are read on demand, so that
    decoding never waits for them)."""

    gate: torch.Tensor  # [H] the per-head memory log-bias
    share: torch.Tensor  # [B,H,T] the memory's share of the joint softmax
    probs: torch.Tensor  # [B,H,T,K] memory attention over the retrieved entries
    positions: torch.Tensor | None = None  # [B,Hs,T,K] the retrieved entries' absolute positions

    @property
    def memory_share(self) -> float:
        """Mean weight of the memory branch over tokens and heads."""
        return float(self.share.float().mean())

    @property
    def entropy(self) -> float:
        """Mean entropy (nats) of memory attention over retrieved entries."""
        p = self.probs.float()
        return float(-(p * p.clamp_min(1e-12).log()).sum(-1).mean())

    @property
    def retrieved(self) -> int:
        """Entries retrieved per token and head that were real (mean)."""
        return int((self.probs > 0).sum(-1).float().mean().round())


class SideBlock(nn.Module):
    """A trainable copy of one backbone decoder layer (pre-norm attention + MLP)."""

    def __init__(self, layer: nn.Module, family: Family, shape: AttnShape, layer_index: int,
                 window: int | None = None):
        super().__init__()
        attn_norm, attn, mlp_norm, mlp = (copy.deepcopy(m) for m in family.parts(layer))
        self.attn_norm, self.attn, self.mlp_norm, self.mlp = attn_norm, attn, mlp_norm, mlp
        self.family, self.shape = family, shape
        self.layer_index = layer_index  # the backbone layer this block copies
        self.window = window  # a sliding-window layer sees only its last ``window`` positions (None: all)

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

    def local(self, q, k, v, past: Past | None, cache: KVBuffer | None) -> torch.Tensor:
        """Causal attention of the tokens q [B,H,T,Dh], k/v [B,H_kv,T,Dh] over what precedes them (the tier
        ``past``, or the window in ``cache``, which takes k/v) -> [B,H,T,Dh]."""
        if self.window is not None:
            return self.local_lse(q, k, v, past, cache)[0]
        if cache is not None:
            return cached_attention(q, *cache.append(k, v), self.shape.scaling)
        return local_attention(q, k, v, self.shape.scaling, past)

    def local_lse(self, q, k, v, past: Past | None, cache: KVBuffer | None):
        """``local`` with its log-sum-exp [B,H,T] (fp32)."""
        if self.window is not None:
            if cache is not None:
                return windowed_attention_lse(q, *cache.append(k, v), self.shape.scaling, self.window)
            return windowed_attention_lse(q, k, v, self.shape.scaling, self.window, past)
        if cache is not None:
            return cached_attention_lse(q, *cache.append(k, v), self.shape.scaling)
        return local_attention_lse(q, k, v, self.shape.scaling, past)

    def forward(self, x: torch.Tensor, rope: Rope | None, past: Past | None = None,
                cache: KVBuffer | None = None) -> torch.Tensor:
        """x [B,T,D], rope cos/sin [T,Dh] or None, past (short-term K/V) or cache (decoding) -> [B,T,D]."""
        q, k, v = self.project(x)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        return self.finish(x, self.local(q, k, v, past, cache))


class MemoryBlock(SideBlock):
    """The memory-augmented block: local causal attention and retrieved memory in one joint softmax."""

    def __init__(self, layer: nn.Module, family: Family, shape: AttnShape, layer_index: int,
                 window: int | None = None):
        super().__init__(layer, family, shape, layer_index, window)
        self.gate = nn.Parameter(torch.zeros(shape.num_heads))  # per-head log-bias on memory scores

    def delta(self, x: torch.Tensor, rope: Rope | None, ctx: MemoryContext, cache: KVBuffer | None = None
              ) -> tuple[torch.Tensor | None, MemoryStats | None]:
        """The change memory makes to this block's output: f(x; memory) - f(x; local only).

        x [B,T,D] -> delta [B,T,D] (None while the memory is empty), diagnostics.
        """
        local, fused, stats = self.attend(x, rope, ctx, cache)
        if fused is None:
            return None, None
        return paired_difference(lambda both: self.finish(torch.cat([x, x]), both), fused, local), stats

    def attend(self, x: torch.Tensor, rope: Rope | None, ctx: MemoryContext, cache: KVBuffer | None = None):
        """x [B,T,D] -> (local-only attention output [B,H,T,Dh], memory-fused output or None, stats or None)."""
        past = None if cache is not None else ctx.past(self.layer_index)
        q, k, v = self.project(x)
        q_loc, k_loc = (apply_rope(q, *rope), apply_rope(k, *rope)) if rope is not None else (q, k)
        found = self.retrieve(q, ctx)
        if found is None:
            return self.local(q_loc, k_loc, v, past, cache), None, None
        mem_keys = self.place(found.keys, found.positions, ctx)  # [B,H,T,K,Dh]
        mem, mem_lse, probs = memory_attention(q, mem_keys.to(q.dtype), found.values.to(q.dtype), found.mask,
                                               self.shape.scaling)
        local, fused, share = self.fuse(q_loc, k_loc, v, past, cache, mem, mem_lse)
        gate = self.gate.detach().float()
        return local, fused, MemoryStats(gate, share.detach(), probs.detach(), found.positions)

    def fuse(self, q, k, v, past, cache, mem, mem_lse):
        """Local attention merged with the memory's (mem [B,H,T,Dh], mem_lse [B,H,T]) -> (local, fused
        [B,H,T,Dh], memory share [B,H,T]): one softmax over both, the gate a per-head log-bias on memory."""
        local, local_lse = self.local_lse(q, k, v, past, cache)
        fused, share = joint_fusion(local, local_lse, mem, mem_lse + self.gate.float().view(1, -1, 1))
        return local, fused, share

    @staticmethod
    def retrieve(q: torch.Tensor, ctx: MemoryContext) -> Retrieved | None:
        """Every query head's K entries for q [B,H,T,Dh] (searched rotated to their absolute positions on
        rotary backbones), or None while the bank is empty."""
        if ctx.bank is None:
            return None
        search = q.detach()
        if ctx.search_rope is not None:
            search = apply_rope(search.float(), ctx.search_rope[0][:, None], ctx.search_rope[1][:, None])
        return ctx.bank.retrieve(search, ctx.num_chunks)

    @staticmethod
    def place(keys: torch.Tensor, positions: torch.Tensor, ctx: MemoryContext) -> torch.Tensor:
        """Retrieved keys [B,H,T,K,Dh] at positions [B,H,T,K], rotated to their true distance from each query
        (clamped to ``max_distance``; unchanged on backbones without rotary positions)."""
        if ctx.rope_table is None:
            return keys
        cos, sin = ctx.rope_table  # [Dmax+1,Dh/2]
        dist = (ctx.query_positions[:, None, :, None] - positions).clamp(0, ctx.max_distance)  # [B,H,T,K]
        return apply_rope_half(keys, cos[dist], sin[dist])


def paired_difference(f, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """f(a) - f(b) for a row-wise f, computed as one batch f([a; b]) (a, b [B,...]): the two streams of
    the memory-delta SideNet share every weight load and call (twice the rows, half the calls)."""
    both = f(torch.cat([a, b]))  # [2B,...]
    return both[: a.shape[0]] - both[a.shape[0] :]
