"""Typed configuration of a LongMem model.

Every field has a default and a one-line meaning; JSON only fills these dataclasses,
and unknown keys are errors (see :func:`from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from longmem.errors import LongMemError
from longmem.memory.search.exact import IndexConfig

DEFAULT_BACKBONE = "smollm2-135m"

RETRIEVAL_BACKENDS = ("torch", "faiss", "ivf", "hnsw", "torch-ivf")
DTYPES = ("float32", "bfloat16", "float16")
MEMORY_DTYPES = (*DTYPES, "int8")
RUNTIME_FIELDS = ("memory_size", "retrieval", "retrieval_nlist", "retrieval_nprobe", "retrieval_ef_search",
                  "memory_dtype")
"""Settings of the memory a model reads, not of the model: chosen when a model is loaded (``from_pretrained``
overrides, CLI flags), never taken from a saved SideNet directory."""


@dataclass
class LongMemConfig:
    """Architecture and memory settings of one LongMem model; the defaults are the shipped architecture.

    The SideNet is a memory-delta SideNet: its blocks copy the backbone's layers from the memory layer
    on, the memory block reads a short-term tier and a long-term chunk bank in one joint softmax, and its
    change rides on the frozen residual stream (``longmem.model.sidenet``); a copy head and a style adapter
    sit on top.
    """

    backbone: str = DEFAULT_BACKBONE
    """Backbone: built-in name, Hugging Face id, local directory or .gguf file."""
    backbone_fingerprint: str = ""
    """Fingerprint of the backbone weights the SideNet was built for ("" = not yet bound)."""
    memory_layer: int | None = None
    """0-based backbone layer whose keys/values fill the memory (None: ~70% depth)."""
    reduction: int = 2
    """r: SideNet block j copies backbone layer r*(j+1)-1; blocks from the memory layer up."""
    chunk_size: int = 4
    """csz: tokens per memory chunk."""
    topk: int = 64
    """K: memory tokens retrieved per query token and head (K/csz chunks)."""
    memory_size: int = 65536
    """Capacity of each row's long-term bank, in tokens (FIFO beyond); a runtime setting."""
    segment_length: int = 1024
    """T: tokens per segment when reading long text."""
    max_distance: int | None = None
    """Retrieved keys sit at their true rotary distance, clamped here (None: the backbone's native context)."""
    sink_tokens: int = 1
    """First tokens of every segment kept out of the bank (attention sinks)."""
    recent_tokens: int | None = None
    """Short-term tier: the last R tokens read, kept at every layer (None: T on rotary backbones; 0: off)."""
    copy_head: bool = True
    """Copy head: mix in the tokens that followed earlier look-alikes of the current one (key matches at an
    early layer, exact token-id matches in memory and in the context being read)."""
    copy_layer: int | None = None
    """Backbone layer (0-based) whose pre-rotary keys the copy head matches (None: num_layers / 15, 2 on
    SmolLM2: early layers tell exact repeats apart best, bench/copy_probe.py)."""
    copy_gate: bool = True
    """The exact matches' trust also reads the SideNet's final hidden state (a learned linear cue, zero at
    the start), e.g. to tell a question about a stated fact from a chance repeat."""
    style_rank: int = 64
    """Rank of the style adapter: a change to the memory layer's input that does not depend on memory (zero at
    the start), so that what any text of the domain teaches is learned in the weights and memory is left to
    carry what only it holds (0: off; an empty memory is then the backbone)."""
    retrieval: str = "torch"
    """Chunk search: 'torch' (exact), 'faiss' (exact IndexFlatIP), 'ivf' or 'hnsw' (approximate, faiss),
    'torch-ivf' (approximate: k-means lists searched with torch matrix products)."""
    retrieval_nlist: int = 0
    """For 'ivf', 'torch-ivf': inverted lists (0: a power of two near sqrt(memory_size / chunk_size))."""
    retrieval_nprobe: int = 32
    """For 'ivf', 'torch-ivf': lists visited per query (more: higher recall, slower)."""
    retrieval_ef_search: int = 128
    """For 'hnsw': candidates kept per query (more: higher recall, slower)."""
    memory_dtype: str = "bfloat16"
    """Storage dtype of cached keys/values: float32, bfloat16, float16 or int8 (per-token scales;
    search keys and the short-term tier stay bfloat16)."""

    def __post_init__(self) -> None:
        _choice("retrieval", self.retrieval, RETRIEVAL_BACKENDS)
        _choice("memory_dtype", self.memory_dtype, MEMORY_DTYPES)
        _positive("reduction", self.reduction)
        _positive("chunk_size", self.chunk_size)
        _positive("memory_size", self.memory_size)
        _positive("segment_length", self.segment_length)
        if self.topk <= 0 or self.topk % self.chunk_size:
            raise LongMemError(
                f"topk={self.topk} must be a positive multiple of chunk_size={self.chunk_size}"
            )
        if self.memory_size % self.chunk_size:
            raise LongMemError(
                f"memory_size={self.memory_size} must be a multiple of chunk_size={self.chunk_size}"
            )
        if self.recent_tokens is not None and self.recent_tokens < 0:
            raise LongMemError(f"recent_tokens={self.recent_tokens} must be >= 0 (0 turns the short-term tier off)")
        if self.sink_tokens < 0:
            raise LongMemError(f"sink_tokens={self.sink_tokens} must be >= 0")
        if self.style_rank < 0:
            raise LongMemError(f"style_rank={self.style_rank} must be >= 0 (0 turns the style adapter off)")
        if self.copy_gate and not self.copy_head:
            raise LongMemError("copy_gate gates the copy head's exact matches: it needs copy_head: true")
        self.index_config()  # validates the retrieval knobs

    def index_config(self) -> IndexConfig:
        """The memory bank's chunk search."""
        return IndexConfig(kind=self.retrieval, nlist=self.retrieval_nlist, nprobe=self.retrieval_nprobe,
                           ef_search=self.retrieval_ef_search)

    @property
    def chunks_per_query(self) -> int:
        """K / csz: chunks retrieved for every query token."""
        return self.topk // self.chunk_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


T = TypeVar("T")


def from_dict(cls: type[T], data: dict[str, Any]) -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys are an error."""
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        raise LongMemError(f"unknown {cls.__name__} keys: {', '.join(unknown)}")
    return cls(**data)


def _choice(name: str, value: str, options: tuple[str, ...]) -> None:
    if value not in options:
        raise LongMemError(f"{name}={value!r} is not one of {', '.join(options)}")


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value <= 0:
        raise LongMemError(f"{name}={value!r} must be a positive integer")
