"""Typed configuration of a LongMem model.

Every field has a default and a one-line meaning; JSON only fills these dataclasses,
and unknown keys are errors (see :func:`from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, TypeVar

from longmem.errors import LongMemError

DEFAULT_BACKBONE = "smollm2-135m"
FORMAT_VERSION = 1

INITS = ("identity", "paper", "delta", "upper")
FUSIONS = ("gated", "joint")
STYLE_LAYERS = ("memory", "all")
POSITION_SCHEMES = ("auto", "pre_rotary", "fixed", "true")
RETRIEVAL_BACKENDS = ("torch", "faiss", "ivf", "hnsw", "torch-ivf")
RETRIEVAL_HEADS = ("query", "kv")
SEARCH_POSITIONS = ("none", "absolute")
DTYPES = ("float32", "bfloat16", "float16")
MEMORY_DTYPES = (*DTYPES, "int8")


@dataclass
class LongMemConfig:
    """Architecture and memory settings of one LongMem model."""

    backbone: str = DEFAULT_BACKBONE
    """Backbone: built-in name, Hugging Face id, local directory or .gguf file."""
    backbone_fingerprint: str = ""
    """Fingerprint of the backbone weights the SideNet was built for ("" = not yet bound)."""
    memory_layer: int | None = None
    """0-based backbone layer whose keys/values fill the memory (None: ~70% depth)."""
    reduction: int = 2
    """r: SideNet block l copies backbone layer r*l (1-based); L/r blocks."""
    chunk_size: int = 4
    """csz: tokens per memory chunk."""
    topk: int = 64
    """K: memory tokens retrieved per query token (K/csz chunks)."""
    memory_size: int = 65536
    """Capacity of each row's memory bank, in tokens (FIFO beyond)."""
    segment_length: int = 1024
    """T: tokens per segment when reading long text."""
    init: str = "identity"
    """SideNet: 'identity' (zeroed outputs), 'paper' (plain copies), 'delta' (memory-delta) or 'upper'
    (no SideNet: the backbone's layers from the memory layer on, fine-tuned; the MemTRM baseline, r = 1)."""
    fusion: str = "gated"
    """How memory joins local attention: 'gated' (paper, two softmaxes) or 'joint'."""
    position_scheme: str = "auto"
    """Memory keys on rotary backbones: 'pre_rotary', 'fixed', 'true' ('auto': 'true')."""
    fixed_distance: int = 1024
    """For 'fixed': the distance every memory key is placed at."""
    max_distance: int | None = None
    """For 'true': distances are clamped here (None: the backbone's native context)."""
    coupled: bool = False
    """Memory written by the trainable memory layer itself, not the frozen backbone (the MemTRM
    baseline: entries written before a weight update go stale)."""
    pointer: bool = False
    """Copy head: mix in a pointer to the tokens that followed earlier look-alikes (key match)."""
    pointer_layer: int | None = None
    """Backbone layer (0-based) whose pre-rotary keys the copy head matches (None: num_layers / 15,
    2 on SmolLM2: early layers tell exact repeats apart best, bench/copy_probe.py)."""
    pointer_ngram: int = 0
    """Copy head's second source: exact token-id suffix matches of at least this many tokens
    (0: off; 3 in the shipped stage 2). Finds repeats whatever the frozen layers make of them."""
    pointer_local: bool = False
    """Exact matches are also searched in the context being read (segment / decoding window), with
    or without a memory (a memory is then not credited with copies the context alone allows)."""
    pointer_context: bool = False
    """The exact matches' trust also reads the SideNet's final hidden state (a learned linear cue,
    zero at the start), e.g. to tell a question about a stated fact from a chance repeat."""
    search_positions: str = "absolute"
    """Chunk search on rotary backbones: 'absolute' (keys, queries rotated) or 'none' (pre-rotary)."""
    sink_tokens: int = 1
    """First tokens of every segment kept out of memory (attention sinks)."""
    retrieval: str = "torch"
    """Chunk search: 'torch' (exact), 'faiss' (exact IndexFlatIP), 'ivf' or 'hnsw' (approximate, faiss),
    'torch-ivf' (approximate: k-means lists searched with torch matrix products)."""
    retrieval_nlist: int = 0
    """For 'ivf', 'torch-ivf': inverted lists (0: a power of two near sqrt(memory_size / chunk_size))."""
    retrieval_nprobe: int = 32
    """For 'ivf', 'torch-ivf': lists visited per query (more: higher recall, slower)."""
    retrieval_ef_search: int = 128
    """For 'hnsw': candidates kept per query (more: higher recall, slower)."""
    retrieval_heads: str = "kv"
    """Who searches: one search per 'kv' head group (summed queries), or every 'query' head."""
    memory_dtype: str = "bfloat16"
    """Storage dtype of cached keys/values: float32, bfloat16, float16 or int8 (per-token scales;
    search keys and the short-term tier stay bfloat16)."""
    recent_tokens: int | None = None
    """Short-term tier: the last R tokens read, kept at every layer (None: T on rotary backbones; 0: off)."""
    style_rank: int = 0
    """Memory-delta SideNets: rank of a style adapter, a change to the memory layer's input that does not
    depend on memory (zero at the start), so that what any text of the domain teaches is learned in the
    weights and memory is left to carry what only it holds (0: off; an empty memory is then the backbone)."""
    style_layers: str = "memory"
    """Where style adapters act: 'memory' (the memory layer's input) or 'all' (also the input of every later
    copied layer and the final state before the norm; each of rank ``style_rank``)."""
    style_width: int = 0
    """With ``style_layers: all``: 0 makes the later adapters low-rank linear maps of rank ``style_rank``, W > 0
    small MLPs up(silu(down(x))) of hidden width W (the memory layer's adapter stays linear)."""

    def __post_init__(self) -> None:
        _choice("init", self.init, INITS)
        _choice("fusion", self.fusion, FUSIONS)
        _choice("position_scheme", self.position_scheme, POSITION_SCHEMES)
        _choice("retrieval", self.retrieval, RETRIEVAL_BACKENDS)
        _choice("search_positions", self.search_positions, SEARCH_POSITIONS)
        _choice("retrieval_heads", self.retrieval_heads, RETRIEVAL_HEADS)
        _choice("memory_dtype", self.memory_dtype, MEMORY_DTYPES)
        _positive("reduction", self.reduction)
        _positive("chunk_size", self.chunk_size)
        _positive("memory_size", self.memory_size)
        _positive("segment_length", self.segment_length)
        _positive("fixed_distance", self.fixed_distance)
        if self.coupled and self.init not in ("delta", "upper"):
            raise LongMemError(f"coupled memory needs init 'upper' or 'delta' (the memory layer reads H_m), "
                               f"not {self.init!r}")
        if self.init == "upper" and self.reduction != 1:
            raise LongMemError(f"init 'upper' fine-tunes every upper layer: it needs reduction 1, not {self.reduction}")
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
        if self.style_rank < 0 or (self.style_rank and self.init != "delta"):
            raise LongMemError(f"style_rank={self.style_rank}: a style adapter needs init 'delta' and a rank >= 0")
        _choice("style_layers", self.style_layers, STYLE_LAYERS)
        if self.style_layers != "memory" and not self.style_rank:
            raise LongMemError(f"style_layers={self.style_layers!r} needs style adapters: set style_rank > 0")
        if self.style_width < 0 or (self.style_width and self.style_layers != "all"):
            raise LongMemError(f"style_width={self.style_width}: MLP style adapters need style_layers 'all' and a "
                               "width >= 0")
        if self.pointer_local and not self.pointer_ngram:
            raise LongMemError("pointer_local searches exact matches in the context: it needs pointer_ngram > 0")
        if self.pointer_context and not self.pointer_ngram:
            raise LongMemError("pointer_context gates exact matches: it needs pointer_ngram > 0")
        if self.pointer_ngram and not (self.pointer and 2 <= self.pointer_ngram <= 8):
            raise LongMemError(f"pointer_ngram={self.pointer_ngram}: exact matches need a copy head (pointer: true) "
                               "and an n-gram of at least 2 and at most 8 tokens (0 turns them off)")
        self.index_config()  # validates the retrieval knobs

    def index_config(self):
        """The memory bank's chunk search (``longmem.memory.search.exact.IndexConfig``)."""
        from longmem.memory.search.exact import IndexConfig

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
