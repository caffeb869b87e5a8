"""Incremental decoding: the cached twin of ``LongMemModel.forward``.

A ``DecodeCache`` holds one window of local context: the frozen backbone's own
key/value cache, every SideNet attention's rotated local keys and values, the window's
token ids and the backbone memory-layer K/V of its tokens (what moves into memory when
tokens leave the window). A memory with a short-term tier (every layer's K/V of the
last tokens read) puts the tier's entries ahead of the window in every attention, as
the model's forward does for a segment. ``decode`` computes only the new
tokens, so one more token costs one position, not a re-run of the window. Its logits
equal ``model(window, memory, positions)`` over the whole window — the slow, obviously
correct twin it is tested against. The memory is only read; it must not change while
a cache is in use (start a new cache after writing to it).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from longmem.model.attention import expand_kv, gated_fusion, joint_fusion, memory_attention
from longmem.errors import LongMemError
from longmem.model.families import apply_rope
from longmem.memory.bank import MemoryBank
from longmem.model.longmem import LongMemModel
from longmem.model.copy_head import RUN
from longmem.model.sidenet import MemoryBlock, MemoryContext, SideBlock, SideNet, paired_difference

FUSIONS = ("gated", "joint")


class KVBuffer:
    """A preallocated key/value store of one attention: [B,H_kv,capacity,Dh], filled from the left."""

    def __init__(self, capacity: int):
        self.capacity, self.length = capacity, 0
        self.keys: torch.Tensor | None = None
        self.values: torch.Tensor | None = None

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """k, v [B,H_kv,Tn,Dh] -> all keys, values so far [B,H_kv,n+Tn,Dh] (views)."""
        b, h, t, d = k.shape
        if self.keys is None:
            self.keys = k.new_empty(b, h, self.capacity, d)
            self.values = v.new_empty(b, h, self.capacity, v.shape[-1])
        end = self.length + t
        if end > self.capacity:
            raise LongMemError(f"decode window overflow: {end} tokens > capacity {self.capacity}")
        self.keys[:, :, self.length : end] = k
        self.values[:, :, self.length : end] = v  # type: ignore[index]
        self.length = end
        return self.keys[:, :, :end], self.values[:, :, :end]  # type: ignore[index]


@dataclass
class DecodeCache:
    """Explicit decoding state of one window; see the module docstring."""

    backbone: object  # the frozen HF model's key/value cache (a short-term tier's entries first)
    blocks: list[KVBuffer]  # SideNet attentions (delta SideNets: later blocks hold rows [B; B], two streams)
    memory_kv: KVBuffer  # backbone memory-layer K/V [B,H_kv,n,Dh] of the window (pre-rotary)
    ids: torch.Tensor  # [B,n] token ids of the window
    start: torch.Tensor  # [B] absolute position of the window's first token
    capacity: int  # most tokens the window may hold
    offset: int  # backbone position of the window's first token (after a short-term tier's slots)
    past: int  # short-term tier entries ahead of the window in every attention
    rope: tuple[torch.Tensor, torch.Tensor] | None  # cos/sin [capacity,Dh] of the window's positions
    memory_state: tuple | None = None  # what the memory looked like when the cache was made
    match_keys: KVBuffer | None = None  # a copy head's match keys [B,H_kv,n,Dh] of the window (no values)
    match_history: torch.Tensor | None = None  # the copy head's match positions [B,H_kv,<=RUN,k] of the last tokens

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    def window_positions(self) -> torch.Tensor:
        """Absolute positions [B,n] of the window's tokens."""
        return self.start[:, None] + torch.arange(self.length)[None, :]

    def layer_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every backbone layer's keys (rotated), values of the window: [L,B,H_kv,n,Dh] each."""
        layers = self.backbone.layers  # type: ignore[attr-defined]
        keys = torch.stack([layer.keys[:, :, self.past :] for layer in layers])
        return keys, torch.stack([layer.values[:, :, self.past :] for layer in layers])


def new_cache(model: LongMemModel, batch_size: int, start: torch.Tensor | int, capacity: int | None = None,
              memory: MemoryBank | None = None) -> DecodeCache:
    """An empty window whose first token sits at absolute position ``start`` ([B] or int).

    With a ``memory`` that has a short-term tier, the window follows the tier's entries in
    every attention, as a segment read with that memory does.
    """
    capacity = capacity or model.config.segment_length
    if not model.decodes_incrementally:
        raise LongMemError("incremental decoding does not support the MemTRM layout (init 'upper', coupled memory)")
    sidenet: SideNet = model.sidenet
    if sidenet.memory_block.fusion not in FUSIONS:
        raise LongMemError(f"incremental decoding does not support fusion {sidenet.memory_block.fusion!r}")
    recent = memory.recent if memory is not None else None
    offset = recent.slots if recent is not None else 0
    if not 0 < capacity <= model.backbone.native_context - offset:
        raise LongMemError(f"decode window {capacity} must be in 1..{model.backbone.native_context - offset} "
                           "(the backbone's native context, less any short-term tier)")
    layers = _attention_layers(sidenet)
    past = _tier_entries(recent, batch_size)  # per backbone layer: keys, values [B,H_kv,P',Dh]
    entries = capacity + (past[0][0].shape[2] if past else 0)  # per attention: tier entries, then the window
    buffers = [KVBuffer(entries) for _ in layers]
    hf = model.backbone.new_cache(entries)
    if past:
        for i, (k, v) in enumerate(past):
            hf.update(k.to(model.backbone.dtype), v.to(model.backbone.dtype), i)
        for i, (buf, layer) in enumerate(zip(buffers, layers)):
            k, v = past[layer][0].to(model.backbone.dtype), past[layer][1].to(model.backbone.dtype)
            if sidenet.delta and i:  # the two streams of a later block
                k, v = torch.cat([k, k]), torch.cat([v, v])
            buf.append(k, v)
    rope = None
    if model.backbone.family.rotary:
        cos, sin = model.backbone.family.rope_cos_sin(model.backbone.model, torch.arange(offset, offset + capacity),
                                                      torch.float32)
        rope = (cos.to(model.backbone.dtype), sin.to(model.backbone.dtype))
    start = torch.full((batch_size,), start, dtype=torch.long) if isinstance(start, int) else start.clone()
    return DecodeCache(
        backbone=hf, blocks=buffers, memory_kv=KVBuffer(capacity), ids=torch.zeros(batch_size, 0, dtype=torch.long),
        start=start, capacity=capacity, offset=offset, past=past[0][0].shape[2] if past else 0, rope=rope,
        memory_state=_memory_state(memory), match_keys=KVBuffer(capacity) if sidenet.pointer is not None else None,
    )


def _attention_layers(sidenet: SideNet) -> list[int]:
    """The backbone layer each SideNet attention copies, in cache order."""
    r = sidenet.reduction
    copied = [r * (j + 1) - 1 for j in range(sidenet.first, sidenet.first + len(sidenet.blocks))]
    return copied  # a delta SideNet's later blocks keep both streams (h + delta, h) as rows [B; B] of one cache


def _tier_entries(recent, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A short-term tier's valid entries of every layer: L x (keys, values [B,H_kv,P',Dh]); [] if none."""
    if recent is None or recent.is_empty():
        return []
    valid = recent.valid  # [B,P]
    if not bool((valid == valid[:1]).all()):
        raise LongMemError(f"the {batch_size} rows' short-term tiers are filled differently; decode them one by one")
    idx = valid[0].nonzero().squeeze(1)
    return [(recent.keys[i][:, :, idx], recent.values[i][:, :, idx]) for i in range(recent.num_layers)]


@torch.no_grad()
def decode(model: LongMemModel, cache: DecodeCache, input_ids: torch.Tensor, memory: MemoryBank | None) -> torch.Tensor:
    """Append input_ids [B,Tn] to the window -> their logits [B,Tn,V].

    Equal to ``model(window, memory, cache.window_positions())`` on the last Tn tokens.
    """
    b, tn = input_ids.shape
    n0 = cache.length
    if n0 + tn > cache.capacity:
        raise LongMemError(f"{n0 + tn} tokens do not fit the decode window of {cache.capacity}")
    if _memory_state(memory) != cache.memory_state:
        raise LongMemError("the memory changed while decoding; start a new cache after writing to it")
    local = torch.arange(n0, n0 + tn)  # [Tn] window positions
    frozen = model.backbone(input_ids, cache=cache.backbone,
                            position_ids=(cache.offset + local)[None, :].expand(b, tn))
    positions = cache.start[:, None] + local[None, :]  # [B,Tn] absolute
    rope = None if cache.rope is None else (cache.rope[0][n0 : n0 + tn], cache.rope[1][n0 : n0 + tn])
    ctx = model._context(memory, positions)
    h = _sidenet_step(model.sidenet, frozen.hidden, rope, ctx, cache.blocks)  # [B,Tn,D]
    cache.memory_kv.append(frozen.mem_keys, frozen.mem_values)
    cache.ids = torch.cat([cache.ids, input_ids], 1)
    logits = model.backbone.head(h)
    match = model.match_keys(frozen.hidden)
    if match is not None:  # the window's match keys: written to the memory's log when tokens move there
        cache.match_keys.append(match, match[..., :0])  # type: ignore[union-attr]
    context = (cache.ids, cache.window_positions())  # the window so far, for exact matches
    logp, matched = model.copy_head_step(logits, match, memory, cache.match_history, context, h)
    if matched is not None:  # the copy head counts runs over the last RUN tokens' matches
        both = matched if cache.match_history is None else torch.cat([cache.match_history, matched], 2)
        cache.match_history = both[:, :, -RUN:]
    return logp


def _memory_state(memory: MemoryBank | None) -> tuple | None:
    """What changes when anything is written to the memory."""
    return None if memory is None else (id(memory), tuple(memory.end_position.tolist()), int(memory.count.sum()),
                                        int(memory.pending_count.sum()))


def _sidenet_step(sidenet: SideNet, hidden, rope, ctx: MemoryContext, caches: list[KVBuffer]) -> torch.Tensor:
    """SideNet.forward on the new tokens: hidden L+1 x [B,Tn,D] -> normed state [B,Tn,D]."""
    if sidenet.delta:
        return _delta_step(sidenet, hidden, rope, ctx, caches)
    r, last = sidenet.reduction, len(sidenet.blocks) - 1
    x = hidden[0]
    for j, block in enumerate(sidenet.blocks):
        end = sidenet.num_backbone_layers if j == last else r * (j + 1)
        if j == sidenet.memory_index:
            local, fused = _memory_attend(block, x, rope, ctx, caches[j])  # type: ignore[arg-type]
            x = block.finish(x, local if fused is None else fused)
        else:
            x = _block_step(block, x, rope, caches[j])
        x = x + (hidden[end] - hidden[r * j])  # cross-network residual
    return sidenet.norm(x)


def _delta_step(sidenet: SideNet, hidden, rope, ctx: MemoryContext, caches: list[KVBuffer]) -> torch.Tensor:
    """The memory-delta SideNet on the new tokens (see SideNet._forward_delta)."""
    r, block = sidenet.reduction, sidenet.memory_block
    h_m = hidden[r * (sidenet.memory_index + 1) - 1]  # [B,Tn,D] the memory layer's input
    local, fused = _memory_attend(block, h_m, rope, ctx, caches[0])
    delta = sidenet.add_style(None if fused is None else block.memory_change(h_m, fused, local), h_m)
    if delta is None:
        return sidenet.norm(hidden[-1])
    for i, (j, later) in enumerate(enumerate(sidenet.blocks[1:], start=sidenet.first + 1)):
        h = hidden[r * (j + 1) - 1]  # both streams in one call; their window keys are rows [B; B] of one cache
        delta = sidenet.later_style(i, delta, h)
        delta = paired_difference(lambda both: _block_step(later, both, rope, caches[1 + i]), h + delta, h)
    return sidenet.norm(hidden[-1] + sidenet.later_style(-1, delta, hidden[-1]))


def _block_step(block: SideBlock, x: torch.Tensor, rope, buf: KVBuffer) -> torch.Tensor:
    """A SideNet block on new tokens x [B,Tn,D] with its cached window keys -> [B,Tn,D]."""
    q, k, v = block.project(x)
    if rope is not None:
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    k_all, v_all = buf.append(k, v)
    return block.finish(x, cached_attention(q, k_all, v_all, block.shape.scaling))


def _memory_attend(block: MemoryBlock, x: torch.Tensor, rope, ctx: MemoryContext, buf: KVBuffer):
    """MemoryBlock._attend on new tokens -> (local [B,H,Tn,Dh], memory-fused or None)."""
    q, k, v = block.project(x)
    q_loc, k_loc = (apply_rope(q, *rope), apply_rope(k, *rope)) if rope is not None else (q, k)
    k_all, v_all = buf.append(k_loc, v)
    scale = block.shape.scaling
    found = None
    if ctx.bank is not None:  # pre-rotary q searches, or q rotated to its absolute position
        search = q if ctx.search_rope is None else apply_rope(
            q.float(), ctx.search_rope[0][:, None], ctx.search_rope[1][:, None])
        found = ctx.bank.retrieve(search, ctx.num_chunks, ctx.per_kv_head)
    if found is None:
        return cached_attention(q_loc, k_all, v_all, scale), None
    mem_keys = block._place(found.keys, found.positions, ctx)  # [B,Hs,Tn,K,Dh]
    mem, mem_lse, _ = memory_attention(q, mem_keys.to(q.dtype), found.values.to(q.dtype), found.mask, scale)
    if block.fusion == "gated":
        local = cached_attention(q_loc, k_all, v_all, scale)
        return local, gated_fusion(local, mem, mem_lse, block.gate)
    local, local_lse = cached_attention_lse(q_loc, k_all, v_all, scale)
    fused, _ = joint_fusion(local, local_lse, mem, mem_lse + block.gate.float().view(1, -1, 1))
    return local, fused


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last Tn window tokens: q [B,H,Tn,Dh], k/v [B,H_kv,N,Dh] -> [B,H,Tn,Dh]."""
    b, h, tn, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if tn == 1:  # one new token sees every key: its G query heads per KV head are rows, K/V are not copied
        out = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv, d), k, v, scale=scale)  # [B,Hkv,G,Dh]
        return out.reshape(b, h, 1, d)
    k, v = expand_kv(k, h), expand_kv(v, h)
    if tn == n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(tn, n), scale=scale)


def cached_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """``cached_attention`` with its log-sum-exp: -> out [B,H,Tn,Dh], lse [B,H,Tn] (fp32)."""
    b, h, tn, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    qg = q.reshape(b, hkv, h // hkv * tn, d)  # [B,Hkv,G*Tn,Dh]: query head h reads KV head h // G
    scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale  # [B,Hkv,G*Tn,N]
    scores = scores.view(b, hkv, h // hkv, tn, n).masked_fill(~_allowed(tn, n), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B,Hkv,G,Tn]
    probs = torch.exp(scores - lse.unsqueeze(-1)).view(b, hkv, -1, n)
    out = torch.matmul(probs, v.float()).view(b, h, tn, d)  # [B,H,Tn,Dh]
    return out.to(q.dtype), lse.reshape(b, h, tn)


def _allowed(tn: int, n: int) -> torch.Tensor:
    """[Tn,N] True where new token i (window position n-Tn+i) may attend to window token j."""
    return torch.arange(n)[None, :] <= torch.arange(n - tn, n)[:, None]
