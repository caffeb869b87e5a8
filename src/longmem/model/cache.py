"""The decoding state of one window: what ``LongMemModel.forward(ids, memory, cache=...)`` keeps between calls.

A ``DecodeCache`` holds the frozen backbone's own key/value cache, every SideNet attention's rotated
local keys and values, the window's token ids and the backbone memory-layer K/V of its tokens (what
moves into memory when tokens leave the window). A memory with a short-term tier puts the tier's
entries ahead of the window in every attention, as a segment read with that memory does. The memory
is only read; it must not change while a cache is in use (make a new cache after writing to it).
``LongMemModel.new_cache`` makes one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longmem.errors import LongMemError
from longmem.memory.bank import MemoryBank


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
    blocks: list[KVBuffer]  # SideNet attentions (later blocks hold rows [B; B]: the two streams of the delta)
    memory_kv: KVBuffer  # backbone memory-layer K/V [B,H_kv,n,Dh] of the window (pre-rotary)
    ids: torch.Tensor  # [B,n] token ids of the window
    start: torch.Tensor  # [B] absolute position of the window's first token
    capacity: int  # most tokens the window may hold
    offset: int  # backbone position of the window's first token (after a short-term tier's slots)
    past: int  # short-term tier entries ahead of the window in every attention
    rope: dict[int, tuple[torch.Tensor, torch.Tensor]] | None  # per block's layer: cos/sin [capacity,Dh] of the window
    memory_state: tuple | None = None  # what the memory looked like when the cache was made
    match_keys: KVBuffer | None = None  # a copy head's match keys [B,H_kv,n,Dh] of the window (no values)
    match_history: torch.Tensor | None = None  # the copy head's match positions [B,H_kv,<=RUN,k] of the last tokens
    lead: int = 0  # entries ahead of the window in the backbone's cache only (a <bos> its first tokens lacked)
    first: list[int] | None = None  # ``start`` on the host (the copy head's matches need it every token)

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])

    def window_positions(self) -> torch.Tensor:
        """Absolute positions [B,n] of the window's tokens."""
        return self.start[:, None] + torch.arange(self.length, device=self.start.device)[None, :]

    def layer_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every backbone layer's keys (rotated), values of the window: [L,B,H_kv,n,Dh] each."""
        layers = self.backbone.layers  # type: ignore[attr-defined]
        first = self.past + self.lead
        keys = torch.stack([layer.keys[:, :, first:] for layer in layers])
        return keys, torch.stack([layer.values[:, :, first:] for layer in layers])

    def check(self, memory: MemoryBank | None, new_tokens: int) -> None:
        """Refuse tokens that do not fit, or a memory written to since the cache was made."""
        if self.length + new_tokens > self.capacity:
            raise LongMemError(f"{self.length + new_tokens} tokens do not fit the decode window of {self.capacity}")
        if memory_state(memory) != self.memory_state:
            raise LongMemError("the memory changed while decoding; start a new cache after writing to it")

    def rewind(self, n: int, match_history: torch.Tensor | None) -> None:
        """Keep the window's first n tokens only (e.g. a shared prefix); ``match_history`` is the copy
        head's history as it was after them."""
        drop = self.length - n
        if drop <= 0:
            return
        self.backbone.crop(-drop)  # type: ignore[attr-defined]
        for buf in self.blocks:  # tier entries, then the window (a block skipped so far holds only the tier)
            buf.length = min(buf.length, self.past + n)
        for buf in [self.memory_kv, *([self.match_keys] if self.match_keys is not None else [])]:
            buf.length = n
        self.ids = self.ids[:, :n]
        self.match_history = match_history


def memory_state(memory: MemoryBank | None) -> tuple | None:
    """What changes when anything is written to the memory (versions: nothing is read back from the device)."""
    if memory is None:
        return None
    log = memory.token_log
    return id(memory), memory.version, None if log is None else (id(log), log.version)


def new_cache(model, batch_size: int, start: torch.Tensor | int, capacity: int, memory: MemoryBank | None
              ) -> DecodeCache:
    """An empty window of ``capacity`` tokens for ``model`` (a LongMemModel) whose first token sits at
    absolute position ``start``; see ``LongMemModel.new_cache``."""
    backbone, blocks = model.backbone, model.sidenet.blocks
    recent = memory.recent if memory is not None else None
    offset = recent.slots if recent is not None else 0
    if not 0 < capacity <= backbone.native_context - offset:
        raise LongMemError(f"decode window {capacity} must be in 1..{backbone.native_context - offset} "
                           "(the backbone's native context, less any short-term tier)")
    past = _tier_entries(recent, batch_size)  # per backbone layer: keys, values [B,H_kv,P',Dh]
    entries = capacity + (past[0][0].shape[2] if past else 0)  # per attention: tier entries, then the window
    dt, dev = backbone.dtype, backbone.device
    hf = backbone.new_cache(entries)
    buffers = [KVBuffer(entries) for _ in blocks]
    if past:
        for i, (k, v) in enumerate(past):
            hf.update(k.to(dt), v.to(dt), i)
        for i, (buf, block) in enumerate(zip(buffers, blocks)):
            k, v = (x.to(dt) for x in past[block.layer_index])
            buf.append(*((k, v) if i == 0 else (torch.cat([k, k]), torch.cat([v, v]))))  # later: both streams
    rope = model._rope(capacity, offset) if backbone.family.rotary else None  # each block's table, computed once
    first = [start] * batch_size if isinstance(start, int) else start.tolist()  # read back once per window
    start = (torch.full((batch_size,), start, dtype=torch.long, device=dev) if isinstance(start, int)
             else start.to(dev, copy=True))
    has_head = getattr(model.sidenet, "copy_head", None) is not None
    return DecodeCache(
        backbone=hf, blocks=buffers, memory_kv=KVBuffer(capacity),
        ids=torch.zeros(batch_size, 0, dtype=torch.long, device=dev),
        start=start, capacity=capacity, offset=offset, past=past[0][0].shape[2] if past else 0, rope=rope,
        memory_state=memory_state(memory), match_keys=KVBuffer(capacity) if has_head else None, first=first,
    )


def _tier_entries(recent, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A short-term tier's valid entries of every layer: L x (keys, values [B,H_kv,P',Dh]); [] if none."""
    if recent is None or recent.is_empty():
        return []
    valid = recent.valid  # [B,P]
    if not bool((valid == valid[:1]).all()):
        raise LongMemError(f"the {batch_size} rows' short-term tiers are filled differently; decode them one by one")
    idx = valid[0].nonzero().squeeze(1)
    return [(recent.keys[i][:, :, idx], recent.values[i][:, :, idx]) for i in range(recent.num_layers)]
