"""Chunk search: exact torch search (default, the oracle) and faiss IndexFlatIP.

Every index holds the chunk keys of a ring buffer with one slot per chunk. A search
returns, for every query, the ring slots of its best ``n`` chunks by inner product, and
which of those are valid (a row holding fewer than ``n`` chunks pads with invalid slots).
Grouped-query heads search their KV head's chunks: query head h uses KV head h // G.
The approximate indexes (faiss IVF and HNSW) are in ``faiss_index.py``, torch's IVF in
``torch_ivf.py``; ``IndexConfig`` chooses one per memory bank (``longmem.memory.search.build_index``).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch

from longmem.errors import LongMemError

NEG_INF = float("-inf")
KINDS = ("torch", "faiss", "ivf", "hnsw", "torch-ivf")
IVF_CODES = ("float16", "float32")


@dataclass
class IndexConfig:
    """Which chunk search a memory bank uses, and the knobs of the approximate ones."""

    kind: str = "torch"
    """'torch' (exact, the oracle), 'faiss' (exact IndexFlatIP), 'ivf' (faiss IVF), 'hnsw' (faiss HNSW) or
    'torch-ivf' (k-means lists searched with torch matrix products; nlist, nprobe, train_chunks, retrain_growth)."""
    nlist: int = 0
    """IVF: inverted lists (0: a power of two near sqrt(capacity in chunks), at least 16)."""
    nprobe: int = 32
    """IVF: lists visited per query (more: higher recall, slower)."""
    train_chunks: int = 0
    """IVF: chunks held before the quantizer is trained, exact search until then (0: 32 per list)."""
    retrain_growth: float = 4.0
    """IVF: retrain once this many times the chunks of the last training were added since (0: never)."""
    ivf_codes: str = "float16"
    """IVF: how the lists store chunk keys, 'float16' (exact for bf16 keys, half the bytes) or 'float32'."""
    hnsw_m: int = 32
    """HNSW: links per node."""
    ef_construction: int = 64
    """HNSW: candidates kept while inserting."""
    ef_search: int = 128
    """HNSW: candidates kept per query (raised to the chunks wanted if lower)."""
    rebuild_dead: float = 0.25
    """HNSW: rebuild once evicted (filtered-out) entries reach this share of the capacity."""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise LongMemError(f"retrieval index {self.kind!r} is not one of {', '.join(KINDS)}")
        for name in ("nlist", "train_chunks"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise LongMemError(f"index {name}={getattr(self, name)!r} must be an integer >= 0 (0: automatic)")
        for name in ("nprobe", "hnsw_m", "ef_construction", "ef_search"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) <= 0:
                raise LongMemError(f"index {name}={getattr(self, name)!r} must be a positive integer")
        if self.ivf_codes not in IVF_CODES:
            raise LongMemError(f"index ivf_codes={self.ivf_codes!r} is not one of {', '.join(IVF_CODES)}")
        if self.retrain_growth < 0:
            raise LongMemError(f"index retrain_growth={self.retrain_growth} must be >= 0 (0: train once)")
        if not 0 < self.rebuild_dead <= 1:
            raise LongMemError(f"index rebuild_dead={self.rebuild_dead} must be in (0, 1]")

    def lists(self, capacity: int) -> int:
        """IVF lists for a ring of ``capacity`` chunks."""
        return self.nlist or max(16, 2 ** round(math.log2(math.sqrt(capacity))))

    def training_size(self, capacity: int) -> int:
        """IVF: chunks held when the quantizer is trained (at most the capacity)."""
        return min(capacity, self.train_chunks or 32 * self.lists(capacity))

    def to_dict(self) -> dict:
        return asdict(self)


def retrain_due(config: IndexConfig, trained: bool, live: int, train_at: int, added_since: int,
                trained_on: int) -> bool:
    """An IVF row's schedule: train once it holds ``train_at`` chunks, then again once
    ``retrain_growth`` times the chunks of the last training were added since."""
    if not trained:
        return live >= train_at
    return bool(config.retrain_growth) and added_since >= config.retrain_growth * trained_on


class TorchIndex:
    """Exact inner-product search: a matrix product + top-k over valid slots."""

    def __init__(self, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype):
        self.chunk_keys = torch.zeros(batch, num_kv_heads, capacity, head_dim, dtype=dtype)  # [B,Hkv,C,Dh]
        self.held = [0] * batch  # chunks per row, known on the host (the bank evicts before it adds)

    def add(self, row: int, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """slots [n] ring slots; keys [Hkv,n,Dh] chunk keys."""
        self.chunk_keys[row, :, slots] = keys.to(self.chunk_keys.dtype)
        self.held[row] = min(self.chunk_keys.shape[2], self.held[row] + slots.shape[0])

    def keys_of(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """Chunk keys [Hkv,n,Dh] at the given ring slots."""
        return self.chunk_keys[row][:, slots]

    def evict(self, row: int, n: int) -> None:
        """Slots are overwritten in place; only the count changes."""
        self.held[row] -= n

    def nbytes(self) -> int:
        """Bytes of the index at capacity."""
        return self.chunk_keys.numel() * self.chunk_keys.element_size()

    def reset(self, row: int) -> None:
        """Stale slots are masked by the bank's counts."""
        self.held[row] = 0

    def search(
        self, queries: torch.Tensor, n: int, start: torch.Tensor, count: torch.Tensor, block: int = 1024
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B,Hq,T,Dh] -> slots [B,Hq,T,n] long, valid [B,Hq,T,n] bool."""
        b, hq, t, dh = queries.shape
        hkv, cap = self.chunk_keys.shape[1], self.chunk_keys.shape[2]
        group = hq // hkv
        dev = self.chunk_keys.device
        offset = (torch.arange(cap, device=dev)[None, :] - start[:, None]) % cap  # [B,C] age rank of each slot
        invalid = (offset >= count[:, None])[:, None, :]  # [B,1,C]
        full = all(n_held == cap for n_held in self.held)  # then nothing needs masking
        k = min(n, cap)
        slots = torch.empty(b, hq, t, k, dtype=torch.long, device=dev)
        scores = torch.empty(b, hq, t, k, dtype=torch.float32, device=dev)
        q = queries.to(self.chunk_keys.dtype).reshape(b, hkv, group * t, dh)  # [B,Hkv,G*T,Dh]
        for row in range(b):  # 2-D products: a batched bf16 product of a few queries is ~8x slower on CPU
            for g in range(hkv):
                keys_t = self.chunk_keys[row, g].t()  # [Dh,C]
                for i in range(0, group * t, block):
                    s = torch.mm(q[row, g, i : i + block], keys_t)  # [blk,C]
                    if not full:
                        s.masked_fill_(invalid[row], NEG_INF)
                    values, indices = topk_two_level(s, k)
                    rows = slice(i, i + s.shape[0])
                    slots.view(b, hkv, group * t, k)[row, g, rows] = indices
                    scores.view(b, hkv, group * t, k)[row, g, rows] = values.float()
        return _pad(slots, scores > NEG_INF, n)


def topk_two_level(scores: torch.Tensor, k: int, group: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k over the last dim, via the k best groups of ``group`` columns.

    Every element of the top k lies in a group whose maximum is among the k largest
    group maxima, so searching only those k groups is exact (up to ties). On CPU this
    is ~2x faster than ``topk`` over the full row. scores [..., C] -> values, indices [..., k].
    """
    c = scores.shape[-1]
    if c % group or c < 4 * k * group:
        return scores.topk(k, dim=-1, sorted=False)
    grouped = scores.unflatten(-1, (c // group, group))  # [...,C/G,G]
    best = grouped.amax(-1).topk(k, dim=-1, sorted=False).indices  # [...,k] group ids
    cand = grouped.gather(-2, best.unsqueeze(-1).expand(*best.shape, group)).flatten(-2)  # [...,k*G]
    values, pos = cand.topk(k, dim=-1, sorted=False)
    return values, best.gather(-1, pos // group) * group + pos % group


class FaissIndex:
    """faiss ``IndexFlatIP`` per (row, KV head), chunks kept oldest-first.

    faiss id i of row b is ring slot (start_b + i) % C, because chunks are added in ring
    order and evicted from the front.
    """

    def __init__(self, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype):
        import faiss

        self._faiss = faiss
        self.capacity = capacity
        self.head_dim = head_dim
        self.indexes = [[faiss.IndexFlatIP(head_dim) for _ in range(num_kv_heads)] for _ in range(batch)]

    def nbytes(self) -> int:
        """Bytes of the index at capacity (fp32 chunk keys)."""
        return 4 * self.capacity * self.head_dim * len(self.indexes) * len(self.indexes[0])

    def add(self, row: int, slots: torch.Tensor, keys: torch.Tensor) -> None:
        for g, index in enumerate(self.indexes[row]):
            index.add(np.ascontiguousarray(keys[g].float().cpu().numpy()))

    def keys_of(self, row: int, slots: torch.Tensor) -> torch.Tensor:
        """Chunk keys [Hkv,n,Dh] (fp32, on the slots' device) in insertion order; slots only give the count."""
        keys = torch.stack([torch.from_numpy(index.reconstruct_n(0, len(slots))) for index in self.indexes[row]])
        return keys.to(slots.device)

    def evict(self, row: int, n: int) -> None:
        for index in self.indexes[row]:
            index.remove_ids(self._faiss.IDSelectorRange(0, n))

    def reset(self, row: int) -> None:
        for index in self.indexes[row]:
            index.reset()

    def search(
        self, queries: torch.Tensor, n: int, start: torch.Tensor, count: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """queries [B,Hq,T,Dh] -> slots [B,Hq,T,n] long, valid [B,Hq,T,n] bool."""
        b, hq, t, dh = queries.shape
        hkv = len(self.indexes[0])
        group = hq // hkv
        k = min(n, self.capacity)
        ids = np.empty((b, hkv, group * t, k), dtype=np.int64)
        q = queries.float().cpu().reshape(b, hkv, group * t, dh)  # [B,Hkv,G*T,Dh] faiss searches host copies
        with one_thread(self._faiss):
            for row in range(b):
                for g, index in enumerate(self.indexes[row]):
                    _, ids[row, g] = index.search(np.ascontiguousarray(q[row, g].numpy()), k)
        found = torch.from_numpy(ids).to(queries.device).view(b, hq, t, k)
        valid = found >= 0
        slots = (found.clamp(min=0) + start.view(b, 1, 1, 1)) % self.capacity
        return _pad(slots, valid, n)


@contextmanager
def one_thread(faiss):
    """Run faiss on one thread, then restore torch's thread count.

    faiss shares torch's OpenMP pool here; its multi-threaded search beside torch slowed
    the backbone ~6x, so it works on one thread and torch's setting is restored after.
    """
    threads = torch.get_num_threads()
    try:
        faiss.omp_set_num_threads(1)
        yield
    finally:
        torch.set_num_threads(threads)


def _pad(slots: torch.Tensor, valid: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad the last dim to n with invalid slot 0 (when capacity < n)."""
    missing = n - slots.shape[-1]
    if missing <= 0:
        return slots, valid
    shape = (*slots.shape[:-1], missing)
    return (
        torch.cat([slots, slots.new_zeros(shape)], -1),
        torch.cat([valid, valid.new_zeros(shape)], -1),
    )

