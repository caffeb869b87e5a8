"""MemoryBank: one chunked FIFO ring buffer of cached keys/values per sequence (batch row).

Each row stores the memory layer's keys/values in chunks of ``csz`` consecutive kept
tokens, the absolute position of every cached token, and one chunk key (the mean of its
token keys) in a search index. Tokens that do not fill a chunk wait in a per-row pending
buffer. When a row is full the oldest chunks are evicted first. Reading (``retrieve``)
and writing (``write``) are separate calls: a segment retrieves first, then writes.

Storage dtypes: float32, bfloat16, float16, or int8 (one bf16 scale per token and head,
see ``quant.py``; dequantised to bf16 on retrieval). Pending tokens and chunk keys stay in
the float dtype (bf16 for int8), so search is unaffected by int8 storage.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from longmem.devices import canonical
from longmem.errors import LongMemError
from longmem.memory.search import IndexConfig, build_index
from longmem.memory.quant import SCALE_DTYPE, dequantize, quantize
from longmem.memory.tier import RecentCache
from longmem.memory.token_log import TokenLog

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
STORAGE_DTYPES = (*DTYPES, "int8")
STORAGE_NAMES = ("keys", "values", "key_scale", "value_scale")  # attributes holding the stored K/V


def float_dtype(storage: str) -> torch.dtype:
    """The float dtype of a storage dtype's pending tokens, chunk keys and retrieved entries."""
    return DTYPES["bfloat16" if storage == "int8" else storage]


@dataclass
class Retrieved:
    """Memory entries retrieved for every query token and searching head.

    Hs is H when every query head searched, H_kv when a group shared one search.
    """

    keys: torch.Tensor  # [B,Hs,T,K,Dh]
    values: torch.Tensor  # [B,Hs,T,K,Dh]
    positions: torch.Tensor  # [B,Hs,T,K] absolute token positions
    mask: torch.Tensor  # [B,Hs,T,K] True where the entry is real
    chunk_slots: torch.Tensor  # [B,Hs,T,K/csz] ring slots of the retrieved chunks


class MemoryBank:
    """Per-row chunked ring buffers; see the module docstring."""

    def __init__(
        self,
        batch_size: int,
        num_kv_heads: int,
        head_dim: int,
        capacity_tokens: int,
        chunk_size: int,
        dtype: str = "bfloat16",
        index: str | IndexConfig = "torch",
        meta: dict | None = None,
        recent: RecentCache | None = None,
        storage: dict[str, torch.Tensor] | None = None,
        token_log: TokenLog | None = None,
        device: torch.device | str = "cpu",
    ):
        """``storage`` (optional): ready K/V tensors as ``new_storage`` makes them, e.g. memory-mapped.
        ``token_log`` (optional): the ids of the tokens read, by position (for a copy head). ``device``: where
        the bank's tensors and its index live (the model's device; storage and the tier must be there too)."""
        if capacity_tokens % chunk_size:
            raise LongMemError(f"memory capacity {capacity_tokens} is not a multiple of chunk size {chunk_size}")
        if dtype not in STORAGE_DTYPES:
            raise LongMemError(f"memory dtype {dtype!r} is not one of {', '.join(STORAGE_DTYPES)}")
        self.batch_size, self.num_kv_heads, self.head_dim = batch_size, num_kv_heads, head_dim
        self.chunk_size = chunk_size
        self.capacity = capacity_tokens // chunk_size  # C chunks per row
        self.index_config = index if isinstance(index, IndexConfig) else IndexConfig(kind=index)
        self.dtype_name, self.index_name = dtype, self.index_config.kind
        self.meta = dict(meta or {})
        self.device = canonical(device)
        dt = float_dtype(dtype)
        b, h, c, s, d = batch_size, num_kv_heads, self.capacity, chunk_size, head_dim
        storage = storage or self.new_storage()
        self.keys, self.values = storage["keys"], storage["values"]  # [B,Hkv,C,csz,Dh] float or int8
        self.key_scale = storage.get("key_scale")  # [B,Hkv,C,csz] int8 storage only
        self.value_scale = storage.get("value_scale")
        with self.device:  # every tensor made below is on the bank's device
            self._new_state(b, h, c, s, d, dt)
        self.recent = recent  # optional short-term tier (every layer's K/V of the last tokens read)
        self.token_log = token_log  # optional token ids by position (the copy head reads them)
        self.version = 0  # changes with every write (what the host knows of the counts is cached per version)
        self._host_counts: tuple[int, list[int]] = (0, [0] * b)  # (version, count per row) read back once

    def _new_state(self, b: int, h: int, c: int, s: int, d: int, dt: torch.dtype) -> None:
        self.positions = torch.zeros(b, c, s, dtype=torch.int64)  # [B,C,csz]
        self.start = torch.zeros(b, dtype=torch.long)  # ring slot of each row's oldest chunk
        self.count = torch.zeros(b, dtype=torch.long)  # chunks held per row
        self._end_position = torch.zeros(b, dtype=torch.long)  # position after the last token seen
        self.pending_keys = torch.zeros(b, h, s, d, dtype=dt)  # [B,Hkv,csz,Dh] partial chunk
        self.pending_values = torch.zeros(b, h, s, d, dtype=dt)
        self.pending_positions = torch.zeros(b, s, dtype=torch.int64)
        self.pending_search = torch.zeros(b, h, s, d, dtype=dt)  # keys the chunk key is averaged from
        self.pending_count = torch.zeros(b, dtype=torch.long)
        self.index = build_index(self.index_config, b, h, c, d, dt)

    def new_storage(self) -> dict[str, torch.Tensor]:
        """Zeroed K/V storage: keys, values [B,Hkv,C,csz,Dh] (+ key_scale, value_scale [B,Hkv,C,csz] for int8)."""
        shape = (self.batch_size, self.num_kv_heads, self.capacity, self.chunk_size, self.head_dim)
        on = {"device": self.device}
        if self.dtype_name != "int8":
            dt = DTYPES[self.dtype_name]
            return {"keys": torch.zeros(shape, dtype=dt, **on), "values": torch.zeros(shape, dtype=dt, **on)}
        return {"keys": torch.zeros(shape, dtype=torch.int8, **on),
                "values": torch.zeros(shape, dtype=torch.int8, **on),
                "key_scale": torch.zeros(shape[:-1], dtype=SCALE_DTYPE, **on),
                "value_scale": torch.zeros(shape[:-1], dtype=SCALE_DTYPE, **on)}

    # ------------------------------------------------------------------ state on the host
    @property
    def end_position(self) -> torch.Tensor:
        """[B] the position after the last token seen per row."""
        return self._end_position

    @end_position.setter
    def end_position(self, value: torch.Tensor) -> None:
        self._end_position = value
        self.touch()

    def touch(self) -> None:
        """Note a change made to the bank's tensors (every write does; code that sets them directly calls it)."""
        self.version += 1

    def held_chunks(self) -> list[int]:
        """Chunks held per row, read back from the device once per version (decoding reads none per token)."""
        version, counts = self._host_counts
        if version != self.version:
            self._host_counts = (self.version, counts := self.count.tolist())
        return counts

    # ------------------------------------------------------------------ sizes
    def num_tokens(self, row: int | None = None) -> int:
        """Retrievable tokens in one row (or in all rows)."""
        counts = self.held_chunks()
        return (sum(counts) if row is None else counts[row]) * self.chunk_size

    @property
    def is_empty(self) -> bool:
        return not any(self.held_chunks())

    def nbytes(self) -> int:
        """Bytes held by keys, values, positions, chunk keys and pending buffers."""
        tensors = [self.keys, self.values, self.key_scale, self.value_scale, self.positions, self.pending_keys,
                   self.pending_values, self.pending_search]
        total = sum(t.numel() * t.element_size() for t in tensors if t is not None) + self.recent_nbytes()
        total += self.token_log.nbytes() if self.token_log is not None else 0
        return total + self.index.nbytes()

    def recent_nbytes(self) -> int:
        """Bytes of the short-term tier (a fixed cost, independent of the capacity)."""
        return self.recent.nbytes() if self.recent is not None else 0

    # ------------------------------------------------------------------ write
    def write(
        self,
        keys: torch.Tensor,
        values: torch.Tensor,
        positions: torch.Tensor,
        keep: torch.Tensor | None = None,
        search_keys: torch.Tensor | None = None,
    ) -> None:
        """Append a segment: keys/values [B,H_kv,T,Dh], positions [B,T], keep [B,T] bool.

        ``search_keys`` [B,H_kv,T,Dh] (default: ``keys``) are what each chunk key averages,
        e.g. keys rotated to their absolute positions for position-aware search.
        """
        b, h, t, d = keys.shape
        if (b, h, d) != (self.batch_size, self.num_kv_heads, self.head_dim) or positions.shape != (b, t):
            raise LongMemError(
                f"memory write of shape {tuple(keys.shape)} does not fit a bank of "
                f"{self.batch_size} rows x {self.num_kv_heads} heads x {self.head_dim} dims"
            )
        search_keys = keys if search_keys is None else search_keys
        for row in range(b):
            sel = slice(None) if keep is None else keep[row].nonzero().squeeze(1)
            self.write_row(row, keys[row][:, sel], values[row][:, sel], positions[row][sel], search_keys[row][:, sel])
            if t:
                self.end_position[row] = positions[row, -1] + 1
        self.touch()

    def write_row(
        self, row: int, k: torch.Tensor, v: torch.Tensor, pos: torch.Tensor, sk: torch.Tensor | None = None
    ) -> None:
        """Append kept tokens to one row: k, v, sk [Hkv,n,Dh]; pos [n]."""
        p, s = int(self.pending_count[row]), self.chunk_size
        sk = k if sk is None else sk
        dt = self.pending_keys.dtype
        on = self.device  # e.g. tokens replayed from disk onto a GPU bank
        k = torch.cat([self.pending_keys[row, :, :p], k.to(on, dt)], 1)  # [Hkv,p+n,Dh]
        v = torch.cat([self.pending_values[row, :, :p], v.to(on, dt)], 1)
        sk = torch.cat([self.pending_search[row, :, :p], sk.to(on, dt)], 1)
        pos = torch.cat([self.pending_positions[row, :p], pos.to(on, torch.int64)])
        full = k.shape[1] // s * s
        rest = k.shape[1] - full
        self.pending_keys[row, :, :rest] = k[:, full:]
        self.pending_values[row, :, :rest] = v[:, full:]
        self.pending_search[row, :, :rest] = sk[:, full:]
        self.pending_positions[row, :rest] = pos[full:]
        self.pending_count[row] = rest
        self.touch()
        n = full // s
        if n == 0:
            return
        chunked = (self.num_kv_heads, n, s, self.head_dim)
        chunk_keys = sk[:, :full].reshape(chunked).float().mean(2).to(dt)  # [Hkv,n,Dh]
        self.append_chunks(row, k[:, :full].reshape(chunked), v[:, :full].reshape(chunked),
                           pos[:full].reshape(n, s), chunk_keys)

    def append_chunks(
        self, row: int, ck: torch.Tensor, cv: torch.Tensor, cp: torch.Tensor, chunk_keys: torch.Tensor
    ) -> None:
        """Store whole chunks: ck, cv [Hkv,n,csz,Dh], cp [n,csz], chunk_keys [Hkv,n,Dh]; FIFO eviction."""
        if self.key_scale is None:
            stored = {"keys": ck, "values": cv}
        else:
            (kq, ks), (vq, vs) = quantize(ck), quantize(cv)
            stored = {"keys": kq, "values": vq, "key_scale": ks, "value_scale": vs}
        self.append_stored(row, stored, cp, chunk_keys)

    def append_stored(self, row: int, stored: dict[str, torch.Tensor], cp: torch.Tensor,
                      chunk_keys: torch.Tensor) -> None:
        """Store whole chunks already in storage form (``row_storage``: keys, values [Hkv,n,csz,Dh] and for
        int8 key_scale, value_scale [Hkv,n,csz]), cp [n,csz], chunk_keys [Hkv,n,Dh]; FIFO eviction."""
        n = cp.shape[0]
        first = max(0, n - self.capacity)  # a write larger than the bank keeps its newest chunks
        stored = {name: t[:, first:] for name, t in stored.items()}
        cp, chunk_keys = cp[first:].to(self.device), chunk_keys[:, first:].to(self.device)
        n -= first
        overflow = self.held_chunks()[row] + n - self.capacity
        if overflow > 0:  # FIFO: evict the oldest chunks
            self.index.evict(row, overflow)
            self.start[row] = (self.start[row] + overflow) % self.capacity
            self.count[row] -= overflow
        slots = (self.start[row] + self.count[row] + torch.arange(n, device=self.device)) % self.capacity
        for name, value in stored.items():
            target = getattr(self, name)  # [B,Hkv,C,csz(,Dh)]
            target[row, :, slots] = value.to(self.device, target.dtype)
        self.positions[row, slots] = cp
        self.index.add(row, slots, chunk_keys)
        self.count[row] += n
        self.touch()

    # ------------------------------------------------------------------ read
    def retrieve(self, queries: torch.Tensor, num_chunks: int) -> Retrieved | None:
        """queries [B,Hs,T,Dh] -> the K = num_chunks * csz best entries per token and searching head.

        Every searching head searches its KV head's chunks (query head h: KV head h // (Hs / H_kv)).
        Returns None while every row is empty.
        """
        if self.is_empty:
            return None
        b, hs, t, d = queries.shape
        slots, valid = self.index.search(queries, num_chunks, self.start, self.count)  # [B,Hs,T,n]
        # canonical order, oldest chunk first (invalid last): results do not depend on the ring layout
        age = (slots - self.start.view(b, 1, 1, 1)) % self.capacity + (~valid) * self.capacity
        order = age.argsort(-1)
        slots, valid = slots.gather(-1, order), valid.gather(-1, order)
        kv_head = torch.arange(hs, device=self.device) // (hs // self.num_kv_heads)  # [Hs]
        rows = torch.arange(b, device=self.device)
        flat = (rows[:, None] * self.num_kv_heads + kv_head[None, :]) * self.capacity  # [B,Hs]
        flat = flat[:, :, None, None] + slots  # [B,Hs,T,n] index into [B*Hkv*C]
        s = self.chunk_size
        flat = flat.flatten()
        keys = self._gather(self.keys, self.key_scale, flat).view(b, hs, t, num_chunks * s, d)  # [B,Hs,T,K,Dh]
        values = self._gather(self.values, self.value_scale, flat).view(b, hs, t, num_chunks * s, d)
        row_slot = (rows[:, None, None, None] * self.capacity + slots).flatten()  # [B*Hs*T*n]
        positions = self.positions.view(-1, s).index_select(0, row_slot).view(b, hs, t, num_chunks * s)
        mask = valid.repeat_interleave(s, -1)  # [B,Hs,T,K]
        return Retrieved(keys, values, positions, mask, slots)

    def _gather(self, stored: torch.Tensor, scale: torch.Tensor | None, flat: torch.Tensor) -> torch.Tensor:
        """Chunks at flat indexes [N] into [B*Hkv*C] -> [N,csz,Dh] (int8: dequantised to the float dtype)."""
        s, d = self.chunk_size, self.head_dim
        chunks = stored.view(-1, s * d).index_select(0, flat).view(-1, s, d)
        if scale is None:
            return chunks
        return dequantize(chunks, scale.view(-1, s).index_select(0, flat), self.pending_keys.dtype)

    # ------------------------------------------------------------------ reset
    def reset(self, rows: list[int] | None = None) -> None:
        """Empty the given rows (all rows by default)."""
        for row in range(self.batch_size) if rows is None else rows:
            self.start[row] = self.count[row] = self.pending_count[row] = self.end_position[row] = 0
            self.index.reset(row)
        self.touch()
        if self.recent is not None:
            self.recent.reset(rows)
        if self.token_log is not None:
            self.token_log.reset(rows)

    # ------------------------------------------------------------------ views
    def row_chunks(self, row: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Oldest-first (keys, values [Hkv,n,csz,Dh], positions [n,csz]) of one row (int8: dequantised)."""
        stored = self.row_storage(row)
        if self.key_scale is None:
            return stored["keys"], stored["values"], self.row_positions(row)
        dt = self.pending_keys.dtype
        return (dequantize(stored["keys"], stored["key_scale"], dt),
                dequantize(stored["values"], stored["value_scale"], dt), self.row_positions(row))

    def row_positions(self, row: int) -> torch.Tensor:
        """Oldest-first positions [n,csz] of one row's chunks."""
        return self.positions[row, self._row_slots(row)]

    def row_storage(self, row: int) -> dict[str, torch.Tensor]:
        """Oldest-first stored K/V of one row as ``new_storage`` names them, without its row dim."""
        slots = self._row_slots(row)
        tensors = {name: getattr(self, name) for name in STORAGE_NAMES}
        return {name: t[row, :, slots] for name, t in tensors.items() if t is not None}

    def attach(self, row: int, positions: torch.Tensor, chunk_keys: torch.Tensor) -> None:
        """Hold the first n ring slots of an empty row, whose K/V are already in storage (e.g. mapped).

        positions [n,csz]; chunk_keys [Hkv,n,Dh].
        """
        n = positions.shape[0]
        if self.held_chunks()[row] or n > self.capacity:
            raise LongMemError(f"cannot attach {n} chunks to row {row} (holding {self.held_chunks()[row]} of "
                               f"{self.capacity})")
        slots = torch.arange(n, device=self.device)
        self.positions[row, slots] = positions.to(self.device)
        self.index.add(row, slots, chunk_keys)
        self.start[row], self.count[row] = 0, n
        self.touch()

    def row_chunk_keys(self, row: int) -> torch.Tensor:
        """Oldest-first chunk keys [Hkv,n,Dh] of one row, as the index holds them."""
        return self.index.keys_of(row, self._row_slots(row))

    def _row_slots(self, row: int) -> torch.Tensor:
        return (self.start[row] + torch.arange(self.held_chunks()[row], device=self.device)) % self.capacity
