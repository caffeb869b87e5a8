"""Long-text perplexity of held-out books by length bucket, memory size and chunk size.

Every book is read from its start in segments (:func:`longmem.inference.reader.perplexity`); each
scored token's NLL is assigned to the bucket of its position from the document start
(default 0-1k, 1k-4k, 4k-16k, 16k-65k, 65k+ tokens). Runs:

* ``backbone``        the frozen backbone on the same segments (same local window);
* ``window-W``        the backbone with a W-token sliding window (stride W/2);
* ``longmem-empty``   LongMem with its memory kept empty (memory size 0);
* ``longmem-short-term`` (scorers with a short-term tier) the tier kept, the chunk bank
  never filled: what the long-term memory adds is this run against the others;
* ``longmem-mM-cC``   LongMem with an M-token memory of C-token chunks: every memory size
  at the model's chunk size, and every chunk size at ``ablation_memory_size``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import torch

from longmem.errors import LongMemError
from longmem.files import read_text
from longmem.inference.reader import PerplexityResult, perplexity, sliding_window_perplexity, tokenize
from longmem.evals.scoring import Scorer, variant

log = logging.getLogger(__name__)

TEST_BOOKS = ["data/books/test/austen-emma.txt", "data/books/test/austen-persuasion.txt"]
BUCKETS = [0, 1024, 4096, 16384, 65536]


@dataclass
class PplConfig:
    """Settings of one perplexity evaluation."""

    files: list[str] = field(default_factory=lambda: list(TEST_BOOKS))
    """UTF-8 text files, each read from its start (default: the held-out books)."""
    memory_sizes: list[int] = field(default_factory=lambda: [0, 4096, 16384, 65536])
    """Memory capacities in tokens at the model's chunk size (0: LongMem with an empty memory)."""
    chunk_sizes: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    """Chunk sizes of the ablation, at ``ablation_memory_size`` ([] for none)."""
    ablation_memory_size: int | None = None
    """Memory size of the chunk-size ablation (None: the largest of ``memory_sizes``)."""
    backbone: bool = True
    """Also score the frozen backbone on the same segments."""
    windows: list[int] = field(default_factory=list)
    """Backbone sliding-window baselines: window sizes in tokens (stride W/2)."""
    buckets: list[int] = field(default_factory=lambda: list(BUCKETS))
    """Bucket edges: token positions from the document start, ascending from 0."""
    max_tokens: int | None = None
    """Read at most this many tokens of each file."""

    def __post_init__(self) -> None:
        if not self.files:
            raise LongMemError("no files to score")
        if any(m < 0 for m in self.memory_sizes) or any(c <= 0 for c in self.chunk_sizes):
            raise LongMemError(f"memory sizes must be >= 0 and chunk sizes > 0, not {self.memory_sizes} / "
                               f"{self.chunk_sizes}")
        if not self.buckets or self.buckets[0] != 0 or sorted(set(self.buckets)) != self.buckets:
            raise LongMemError(f"buckets must ascend strictly from 0, not {self.buckets}")
        if self.max_tokens is not None and self.max_tokens < 2:
            raise LongMemError(f"max_tokens={self.max_tokens} must be at least 2")
        if not (self.memory_sizes or self.chunk_sizes or self.backbone or self.windows):
            raise LongMemError("nothing to run: no memory sizes, chunk sizes, backbone or windows")

    def settings(self, default_chunk: int) -> list[tuple[int, int]]:
        """(memory size, chunk size) of every LongMem run, in order, without repeats."""
        ablation = self.ablation_memory_size or max(self.memory_sizes or [0])
        runs = [(m, default_chunk) for m in self.memory_sizes] + [(ablation, c) for c in self.chunk_sizes]
        runs = [(0, 0) if m == 0 else (m, c) for m, c in runs]
        return list(dict.fromkeys(runs))


def bucket_label(lo: int, hi: int | None) -> str:
    """'0-1k', '1k-4k', ..., '65k+' (thousands, rounded down)."""
    lo_s, hi_s = (f"{n // 1000}k" if n >= 1000 else str(n) for n in (lo, hi or 0))
    return f"{lo_s}+" if hi is None else f"{lo_s}-{hi_s}"


def bucket_stats(token_nll: torch.Tensor, edges: list[int]) -> dict[str, dict]:
    """token_nll [N-1] (NLL of tokens 1..N-1) -> {label: {tokens, nll_sum, nll, perplexity}}."""
    position = torch.arange(1, token_nll.shape[0] + 1, device=token_nll.device)  # [N-1] position of each scored token
    out = {}
    for lo, hi in zip(edges, [*edges[1:], None]):
        sel = (position >= lo) & (position < hi if hi is not None else True)
        n = int(sel.sum())
        if n:
            total = float(token_nll[sel].double().sum())
            out[bucket_label(lo, hi)] = {"tokens": n, "nll_sum": total, "nll": total / n,
                                         "perplexity": math.exp(total / n)}
    return out


@dataclass
class PplRun:
    """One run on one file."""

    file: str
    name: str  # backbone | window-W | longmem-empty | longmem-mM-cC
    memory_size: int
    chunk_size: int
    perplexity: float
    nll: float
    tokens: int
    seconds: float
    tokens_per_s: float
    buckets: dict[str, dict]


@dataclass
class PplResult:
    """Every run on every file, and token-weighted totals over the files."""

    config: PplConfig
    runs: list[PplRun]
    lead: str  # the LongMem run the targets are checked for (largest memory, model's chunk size)

    def totals(self) -> dict[str, dict]:
        """{run name: {perplexity, tokens, memory_size, chunk_size, buckets: {label: {...}}}} over all files."""
        out: dict[str, dict] = {}
        for run in self.runs:
            t = out.setdefault(run.name, {"memory_size": run.memory_size, "chunk_size": run.chunk_size,
                                          "tokens": 0, "nll_sum": 0.0, "buckets": {}})
            t["tokens"] += run.tokens
            t["nll_sum"] += run.nll * run.tokens
            for label, b in run.buckets.items():
                tb = t["buckets"].setdefault(label, {"tokens": 0, "nll_sum": 0.0})
                tb["tokens"] += b["tokens"]
                tb["nll_sum"] += b["nll_sum"]
        for t in out.values():
            for d in [t, *t["buckets"].values()]:
                d["nll"] = d["nll_sum"] / d["tokens"]
                d["perplexity"] = math.exp(d["nll"])
        return out

    def checks(self) -> dict[str, dict]:
        """Per bucket: the lead LongMem run against every baseline (lower perplexity is better)."""
        totals = self.totals()
        if self.lead not in totals:
            return {}
        fixed = ("backbone", "longmem-empty", "longmem-short-term")
        baselines = [n for n in totals if n != self.lead and (n in fixed or n.startswith("window-"))]
        out = {}
        for label, b in totals[self.lead]["buckets"].items():
            others = {n: totals[n]["buckets"][label]["perplexity"] for n in baselines if label in totals[n]["buckets"]}
            out[label] = {"longmem": b["perplexity"], **others,
                          "below_all_baselines": all(b["perplexity"] < v for v in others.values())}
        return out

    def to_dict(self) -> dict:
        return {"lead": self.lead, "totals": self.totals(), "checks": self.checks(),
                "runs": [asdict(r) for r in self.runs]}


def run_name(memory_size: int, chunk_size: int) -> str:
    return "longmem-empty" if memory_size == 0 else f"longmem-m{memory_size}-c{chunk_size}"


RunHook = Callable[[PplRun, float], None]
"""Called with every newly finished run of one file and the seconds it took."""


def ppl(model: Scorer, config: PplConfig | None = None, progress: bool = False,
        done: list[PplRun] | None = None, on_run: RunHook | None = None) -> PplResult:
    """Score every file of ``config`` with every run (see the module docstring).

    ``done``: runs of an interrupted evaluation of the same config, kept instead of scored again.
    """
    config = config or PplConfig()
    texts = {f: read_text(f) for f in config.files}
    for w in config.windows:
        if not 0 < w <= model.backbone.native_context:
            raise LongMemError(f"window {w} must be between 1 and the native context {model.backbone.native_context}")
    settings = config.settings(model.config.chunk_size)
    scorers = {run_name(m, c): variant(model, memory_size=m or None, chunk_size=c or None) for m, c in settings}
    finished = {(r.file, r.name): r for r in done or []}
    runs = []

    def add(path: str, name: str, m: int, c: int, score: Callable[[], PerplexityResult]) -> None:
        if (path, name) in finished:
            runs.append(finished[path, name])
            return
        runs.append(_run(path, name, m, c, score(), config))
        if on_run is not None:
            on_run(runs[-1], runs[-1].seconds)

    for path, text in texts.items():
        ids = tokenize(model, text)[: config.max_tokens]
        if config.backbone:
            add(path, "backbone", 0, 0, lambda: perplexity(model, ids, "backbone", progress=progress, token_nll=True))
        for w in config.windows:
            add(path, f"window-{w}", 0, 0,
                lambda w=w: sliding_window_perplexity(model, ids, w, progress=progress, token_nll=True))
        for m, c in settings:
            scorer, mode = scorers[run_name(m, c)], "no-memory" if m == 0 else "memory"
            add(path, run_name(m, c), m, c,
                lambda scorer=scorer, mode=mode: perplexity(scorer, ids, mode, progress=progress, token_nll=True))
            if m == 0 and getattr(model, "recent_tokens", 0):
                add(path, "longmem-short-term", 0, 0,
                    lambda: perplexity(model, ids, "short-term-only", progress=progress, token_nll=True))
    lead = run_name(max(config.memory_sizes or [0]), model.config.chunk_size)
    return PplResult(config, runs, lead)


def _run(path: str, name: str, m: int, c: int, res: PerplexityResult, config: PplConfig) -> PplRun:
    log.info("%s %s: perplexity %.3f over %d tokens", path, name, res.perplexity, res.tokens)
    return PplRun(path, name, m, c, res.perplexity, res.nll, res.tokens, res.seconds, res.tokens_per_s,
                  bucket_stats(res.token_nll, config.buckets))
