"""Chunk search over a memory bank's chunk keys: exact (torch, the oracle; faiss IndexFlatIP) and
approximate (torch's IVF; faiss IVF and HNSW). ``IndexConfig`` names one; ``build_index`` makes it."""

from __future__ import annotations

import torch

from longmem.memory.search.exact import FaissIndex, IndexConfig, TorchIndex
from longmem.memory.search.faiss_index import HnswIndex, IvfIndex
from longmem.memory.search.torch_ivf import TorchIvfIndex

INDEXES = {"torch": TorchIndex, "faiss": FaissIndex, "torch-ivf": TorchIvfIndex, "ivf": IvfIndex, "hnsw": HnswIndex}

__all__ = ["INDEXES", "IndexConfig", "build_index"]


def build_index(config: IndexConfig, batch: int, num_kv_heads: int, capacity: int, head_dim: int,
                dtype: torch.dtype):
    """The index ``config`` names for a bank of [batch, num_kv_heads] rings of ``capacity`` chunks."""
    if config.kind in ("torch", "faiss"):
        return INDEXES[config.kind](batch, num_kv_heads, capacity, head_dim, dtype)
    return INDEXES[config.kind](batch, num_kv_heads, capacity, head_dim, dtype, config)
