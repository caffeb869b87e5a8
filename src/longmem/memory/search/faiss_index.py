"""Approximate chunk search for large memories: faiss IVF and HNSW, updated incrementally.

Both keep the exact index's copy of the chunk keys (``TorchIndex.chunk_keys``, the bank's
search dtype): it answers ``keys_of`` (saving), serves exact search while an IVF is not
yet trained, and is what an index is rebuilt from. faiss holds fp32 copies per (row, KV
head). Chunks get sequence numbers in the order they are added since the row's last
reset; the bank puts chunk number ``s`` in ring slot ``s % C`` (it starts at slot 0 and
appends in ring order), so a faiss id maps back to a slot without a table.

* ``IvfIndex`` (``IndexIVFScalarQuantizer`` with fp16 codes, lossless for bf16 keys, or
  ``IndexIVFFlat``; inner product): exact search until the row holds
  ``training_size`` chunks, then the coarse quantizer is trained once on those (a sample
  of at most 64 per list) and every later chunk is added with ``add_with_ids``; FIFO
  eviction is ``remove_ids`` over the evicted id range. Keys drift as text streams in
  (keys are rotated to absolute positions), so the quantizer is retrained from the live
  keys after ``retrain_growth`` times as many chunks were added as at the last training:
  a geometric schedule, so the amortised cost per chunk stays constant.
* ``HnswIndex`` (``IndexHNSWFlat``, inner product): a graph cannot drop nodes, so evicted
  chunks stay in it and are filtered out of every search (an id-range selector); once
  they reach ``rebuild_dead`` of the capacity the graph is rebuilt from the live keys,
  i.e. once per ``rebuild_dead * C`` chunks written, amortised.
"""

from __future__ import annotations

import numpy as np
import torch

from longmem.errors import LongMemError
from longmem.memory.search.exact import IndexConfig, TorchIndex, _pad, one_thread, retrain_due

MAX_TRAIN_PER_LIST = 64  # IVF: training sample per list (faiss warns below 39)


class _Sequenced(TorchIndex):
    """Exact mirror + per-row sequence numbers of the live chunks [first, end)."""

    def __init__(self, batch: int, num_kv_heads: int, capacity: int, head_dim: int, dtype: torch.dtype,
                 config: IndexConfig):
        super().__init__(batch, num_kv_heads, capacity, head_dim, dtype)
        import faiss

        self._faiss = faiss
        self.config, self.capacity, self.head_dim, self.num_kv_heads = config, capacity, head_dim, num_kv_heads
        self.first = [0] * batch  # sequence number of each row's oldest live chunk
        self.end = [0] * batch  # sequence number the next chunk gets

    def add(self, row: int, slots: torch.Tensor, keys: torch.Tensor) -> None:
        """slots [n] ring slots; keys [Hkv,n,Dh] chunk keys."""
        if len(slots) and int(slots[0]) != self.end[row] % self.capacity:
            raise LongMemError(f"{type(self).__name__}: chunks must be added in ring order from slot 0")
        super().add(row, slots, keys)
        self.end[row] += len(slots)

    def evict(self, row: int, n: int) -> None:
        super().evict(row, n)
        self.first[row] += n

    def reset(self, row: int) -> None:
        super().reset(row)
        self.first[row] = self.end[row] = 0

    def live_keys(self, row: int) -> np.ndarray:
        """fp32 chunk keys [Hkv,n,Dh] of the live chunks, oldest first."""
        slots = torch.arange(self.first[row], self.end[row], device=self.chunk_keys.device) % self.capacity
        return np.ascontiguousarray(self.keys_of(row, slots).float().cpu().numpy())

    def _slots(self, found: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """faiss sequence ids (-1: none) -> ring slots, valid."""
        ids = torch.from_numpy(found)
        return ids.clamp(min=0) % self.capacity, ids >= 0

    def _search_rows(self, queries: torch.Tensor, n: int, start: torch.Tensor, count: torch.Tensor, search_row):
        """Exact search for rows ``search_row`` declines (returns None), its faiss search for the others."""
        b, hq, t, dh = queries.shape
        hkv = self.num_kv_heads
        group = hq // hkv
        k = min(n, self.capacity)
        q = queries.float().cpu().reshape(b, hkv, group * t, dh)  # [B,Hkv,G*T,Dh] faiss searches host copies
        slots = torch.zeros(b, hkv, group * t, k, dtype=torch.long, device="cpu")
        valid = torch.zeros(b, hkv, group * t, k, dtype=torch.bool, device="cpu")
        exact = None
        with one_thread(self._faiss):
            for row in range(b):
                for g in range(hkv):
                    found = search_row(row, g, np.ascontiguousarray(q[row, g].numpy()), k)
                    if found is None:  # not ready: exact search (all rows at once, once)
                        if exact is None:
                            exact = TorchIndex.search(self, queries, k, start, count)
                        rows = slice(g * group, (g + 1) * group)
                        slots[row, g] = exact[0][row, rows].reshape(group * t, k).cpu()
                        valid[row, g] = exact[1][row, rows].reshape(group * t, k).cpu()
                    else:
                        slots[row, g], valid[row, g] = self._slots(found)
        dev = queries.device
        return _pad(slots.view(b, hq, t, k).to(dev), valid.view(b, hq, t, k).to(dev), n)


class IvfIndex(_Sequenced):
    """A faiss IVF (inner product, fp16 or fp32 codes) per (row, KV head); see the module docstring."""

    def __init__(self, batch, num_kv_heads, capacity, head_dim, dtype, config: IndexConfig):
        super().__init__(batch, num_kv_heads, capacity, head_dim, dtype, config)
        self.train_at = config.training_size(capacity)
        self.nlist = min(config.lists(capacity), self.train_at)  # k-means needs a point per list
        self.ivf: list[list | None] = [None] * batch  # per row: one IVF per KV head, None until trained
        self.trained_on = [0] * batch  # chunks live at the last training
        self.added_since = [0] * batch  # chunks added since the last training

    def add(self, row: int, slots: torch.Tensor, keys: torch.Tensor) -> None:
        super().add(row, slots, keys)
        trained = self.ivf[row] is not None
        self.added_since[row] += len(slots) if trained else 0
        if retrain_due(self.config, trained, self.end[row] - self.first[row], self.train_at,
                       self.added_since[row], self.trained_on[row]):
            self.train(row)
            return
        if not trained:
            return
        ids = np.arange(self.end[row] - len(slots), self.end[row], dtype=np.int64)
        with one_thread(self._faiss):
            for g, index in enumerate(self.ivf[row]):
                index.add_with_ids(np.ascontiguousarray(keys[g].float().cpu().numpy()), ids)

    def train(self, row: int) -> None:
        """(Re)build the row's IVFs: train on a sample of the live keys, add all of them."""
        faiss = self._faiss
        keys = self.live_keys(row)  # [Hkv,n,Dh]
        n = keys.shape[1]
        sample = np.linspace(0, n - 1, min(n, MAX_TRAIN_PER_LIST * self.nlist)).astype(np.int64)
        ids = np.arange(self.first[row], self.end[row], dtype=np.int64)
        indexes = []
        with one_thread(faiss):
            for g in range(self.num_kv_heads):
                index = self._new_ivf()
                index.cp.min_points_per_centroid = 1  # a small memory trains quietly on what it has
                index.train(np.ascontiguousarray(keys[g, sample]))
                index.add_with_ids(np.ascontiguousarray(keys[g]), ids)
                index.nprobe = self.config.nprobe
                indexes.append(index)
        self.ivf[row], self.trained_on[row], self.added_since[row] = indexes, n, 0

    def _new_ivf(self):
        faiss, d = self._faiss, self.head_dim
        if self.config.ivf_codes == "float32":
            return faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, self.nlist, faiss.METRIC_INNER_PRODUCT)
        index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(d), d, self.nlist, faiss.ScalarQuantizer.QT_fp16,
                                              faiss.METRIC_INNER_PRODUCT)
        index.by_residual = False  # the keys themselves in fp16, not their offsets from the centroid
        return index

    def evict(self, row: int, n: int) -> None:
        first = self.first[row]
        super().evict(row, n)
        if self.ivf[row] is not None:
            selector = self._faiss.IDSelectorRange(first, first + n)
            for index in self.ivf[row]:
                index.remove_ids(selector)

    def reset(self, row: int) -> None:
        super().reset(row)
        self.ivf[row], self.trained_on[row], self.added_since[row] = None, 0, 0

    def is_trained(self, row: int) -> bool:
        return self.ivf[row] is not None

    def search(self, queries: torch.Tensor, n: int, start: torch.Tensor, count: torch.Tensor):
        """queries [B,Hq,T,Dh] -> slots [B,Hq,T,n] long, valid [B,Hq,T,n] bool."""

        def search_row(row: int, g: int, q: np.ndarray, k: int):
            if self.ivf[row] is None:
                return None
            return self.ivf[row][g].search(q, k)[1]

        return self._search_rows(queries, n, start, count, search_row)

    def nbytes(self) -> int:
        """Bytes at capacity: the exact mirror + the lists' codes and int64 ids + centroids."""
        heads = len(self.ivf) * self.num_kv_heads
        code = (2 if self.config.ivf_codes == "float16" else 4) * self.head_dim
        return super().nbytes() + heads * (self.capacity * (code + 8) + self.nlist * 4 * self.head_dim)


class HnswIndex(_Sequenced):
    """faiss ``IndexHNSWFlat`` (inner product) per (row, KV head); see the module docstring."""

    def __init__(self, batch, num_kv_heads, capacity, head_dim, dtype, config: IndexConfig):
        super().__init__(batch, num_kv_heads, capacity, head_dim, dtype, config)
        self.graphs: list[list] = [self._new_graphs() for _ in range(batch)]
        self.base = [0] * batch  # sequence number of each graph's node 0

    def _new_graphs(self) -> list:
        faiss, graphs = self._faiss, []
        for _ in range(self.num_kv_heads):
            graph = faiss.IndexHNSWFlat(self.head_dim, self.config.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            graph.hnsw.efConstruction = self.config.ef_construction
            graphs.append(graph)
        return graphs

    def add(self, row: int, slots: torch.Tensor, keys: torch.Tensor) -> None:
        super().add(row, slots, keys)
        with one_thread(self._faiss):
            for g, graph in enumerate(self.graphs[row]):
                graph.add(np.ascontiguousarray(keys[g].float().cpu().numpy()))

    def evict(self, row: int, n: int) -> None:
        super().evict(row, n)
        if self.first[row] - self.base[row] >= self.config.rebuild_dead * self.capacity:
            self.rebuild(row)

    def rebuild(self, row: int) -> None:
        """A new graph of the live chunks only."""
        keys = self.live_keys(row)  # [Hkv,n,Dh]
        graphs = self._new_graphs()
        with one_thread(self._faiss):
            for g, graph in enumerate(graphs):
                graph.add(np.ascontiguousarray(keys[g]))
        self.graphs[row], self.base[row] = graphs, self.first[row]

    def reset(self, row: int) -> None:
        super().reset(row)
        self.graphs[row], self.base[row] = self._new_graphs(), 0

    def search(self, queries: torch.Tensor, n: int, start: torch.Tensor, count: torch.Tensor):
        """queries [B,Hq,T,Dh] -> slots [B,Hq,T,n] long, valid [B,Hq,T,n] bool."""
        faiss = self._faiss

        def search_row(row: int, g: int, q: np.ndarray, k: int):
            base = self.base[row]
            selector = faiss.IDSelectorRange(self.first[row] - base, self.end[row] - base)  # live nodes only
            params = faiss.SearchParametersHNSW(sel=selector, efSearch=max(self.config.ef_search, k))
            found = self.graphs[row][g].search(q, k, params=params)[1]
            return np.where(found >= 0, found + base, -1)

        return self._search_rows(queries, n, start, count, search_row)

    def nbytes(self) -> int:
        """Bytes at capacity (approximate): the exact mirror + fp32 keys and level-0 links, dead nodes included."""
        heads = len(self.graphs) * self.num_kv_heads
        per_node = 4 * self.head_dim + 2 * self.config.hnsw_m * 4 + 16
        return super().nbytes() + int(heads * self.capacity * (1 + self.config.rebuild_dead) * per_node)
