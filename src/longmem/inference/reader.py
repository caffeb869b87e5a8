"""Reading long text segment by segment while the memory fills; perplexity.

Segment s covers tokens [a, b); its logits predict tokens a+1 .. b (the last one is the
first token of the next segment), so every token but the first is scored exactly once.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields

import torch
from tqdm.auto import tqdm

from longmem.data.tokens import document_ids
from longmem.errors import LongMemError
from longmem.memory.bank import MemoryBank
from longmem.model.longmem import LongMemModel

MODES = ("memory", "no-memory", "backbone", "foreign-memory", "short-term-only")


@dataclass
class PerplexityResult:
    """Perplexity of one text read in segments."""

    mode: str  # 'memory' | 'no-memory' | 'backbone'
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token (nats)
    tokens: int  # scored tokens
    seconds: float
    tokens_per_s: float
    segment_length: int
    memory_tokens: int  # tokens in memory at the end
    segment_nll: list[float] = field(default_factory=list)  # mean NLL of every segment
    token_nll: torch.Tensor | None = field(default=None, repr=False)  # [tokens] NLL of tokens 1..N-1 (if asked)

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name != "token_nll"}


def tokenize(model: LongMemModel, text: str) -> torch.Tensor:
    """text -> ids [N] with the model's tokenizer (``document_ids``: no special tokens but a <bos> the model needs)."""
    if model.tokenizer is None:
        raise LongMemError("this model has no tokenizer; pass token ids instead")
    ids = document_ids(model.tokenizer, text)
    if len(ids) < 2:
        raise LongMemError("text is too short: at least 2 tokens are needed to score it")
    return torch.tensor(ids, dtype=torch.long, device="cpu")


def segments(n: int, t: int) -> range:
    """Start offsets of the T-token segments covering n tokens."""
    return range(0, n, t)


@torch.no_grad()
def read(
    model: LongMemModel, ids: torch.Tensor, memory: MemoryBank, segment_length: int | None = None,
    progress: bool = False,
) -> MemoryBank:
    """Stream ids [N] through the model segment by segment, filling ``memory`` (row 0)."""
    t = segment_length or model.config.segment_length
    ids = ids.to(model.device)
    model.eval()
    with tqdm(total=ids.shape[0], unit="tok", desc="reading", disable=not progress, leave=False) as bar:
        for a in segments(ids.shape[0], t):
            seg = ids[a : a + t][None, :]  # [1,T]
            model.write_memory(memory, model(seg, memory=memory))
            bar.update(seg.shape[1])
    return memory


@torch.no_grad()
def perplexity(
    model: LongMemModel,
    ids: torch.Tensor,
    mode: str = "memory",
    segment_length: int | None = None,
    memory: MemoryBank | None = None,
    progress: bool = False,
    token_nll: bool = False,
) -> PerplexityResult:
    """Read ids [N] in segments of T tokens and score every token after the first.

    mode 'memory' reads with a memory that fills as it reads (``memory`` or a new one),
    'no-memory' runs the same model with an empty memory, 'backbone' the frozen backbone
    alone on the same segments, 'foreign-memory' (a control) reads with ``memory`` — e.g.
    another text — and never writes to it. Positions continue after what ``memory`` saw.
    'short-term-only' (an ablation) keeps the short-term tier but never fills the chunk bank.
    ``token_nll`` keeps every token's NLL (e.g. for length buckets).
    """
    if mode not in MODES:
        raise LongMemError(f"mode {mode!r} is not one of {', '.join(MODES)}")
    if mode == "foreign-memory" and memory is None:
        raise LongMemError("mode 'foreign-memory' needs a memory read from another text")
    t = segment_length or model.config.segment_length
    n, ids = ids.shape[0], ids.to(model.device)
    if mode in ("memory", "short-term-only") and memory is None:
        memory = model.new_memory(1)
    if mode == "short-term-only" and memory.recent is None:
        raise LongMemError("mode 'short-term-only' needs a model with a short-term tier (recent_tokens > 0)")
    reads = mode in ("memory", "foreign-memory", "short-term-only")
    offset = int(memory.end_position[0]) if reads else 0
    model.eval()
    nll_sum, scored, seg_nll, per_token = 0.0, 0, [], []
    start_time = time.perf_counter()
    bar = tqdm(total=n, unit="tok", desc=f"ppl ({mode})", disable=not progress, leave=False)
    for a in segments(n - 1, t):
        seg = ids[a : a + t][None, :]  # [1,T]
        labels = ids[a + 1 : a + t + 1][None, :]  # [1,<=T]
        positions = offset + a + torch.arange(seg.shape[1], device=seg.device)[None, :]  # [1,T]
        out = model(seg, memory=memory if reads else None, positions=positions, backbone_logits=mode == "backbone")
        logits = (out.backbone_logits if mode == "backbone" else out.logits)[:, : labels.shape[1]]
        losses = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none")
        nll = losses.sum()
        if token_nll:
            per_token.append(losses)
        nll_sum += float(nll)
        scored += labels.shape[1]
        seg_nll.append(float(nll) / labels.shape[1])
        if mode in ("memory", "short-term-only"):
            model.write_memory(memory, out, to_bank=mode == "memory")
        bar.update(seg.shape[1])
    bar.close()
    seconds = time.perf_counter() - start_time
    mean = nll_sum / scored
    return PerplexityResult(
        mode=mode,
        perplexity=math.exp(mean),
        nll=mean,
        tokens=scored,
        seconds=seconds,
        tokens_per_s=n / seconds,
        segment_length=t,
        memory_tokens=memory.num_tokens() if reads else 0,
        segment_nll=seg_nll,
        token_nll=torch.cat(per_token).cpu() if token_nll else None,
    )


@torch.no_grad()
def sliding_window_perplexity(
    model: LongMemModel, ids: torch.Tensor, window: int, stride: int | None = None, progress: bool = False,
    token_nll: bool = False,
) -> PerplexityResult:
    """The frozen backbone alone with a sliding window: what users do without a memory.

    Every token after the first is scored once. The first step reads ``window`` tokens and
    scores them all; each later step scores the next ``stride`` tokens (default window/2)
    from an input of the ``window`` tokens before each. ids [N]. With window == stride == T
    this is exactly the backbone on consecutive T-token segments.
    """
    stride = stride or window // 2
    if not 0 < stride <= window <= model.backbone.native_context:
        raise LongMemError(f"need 0 < stride={stride} <= window={window} <= native context "
                           f"{model.backbone.native_context}")
    n, ids = ids.shape[0], ids.to(model.device)
    nll_sum, seg_nll, per_token, s = 0.0, [], [], 1
    start_time = time.perf_counter()
    bar = tqdm(total=n, initial=1, unit="tok", desc=f"ppl (window {window})", disable=not progress, leave=False)
    while s < n:
        e = min(n, s + stride if s > 1 else window + 1)  # score tokens [s, e)
        b = max(0, e - 1 - window)  # input ids[b:e-1] predicts ids[b+1:e]
        logits = model.backbone.model(ids[b : e - 1][None, :]).logits[0, s - b - 1 :]  # [e-s,V]
        losses = torch.nn.functional.cross_entropy(logits.float(), ids[s:e], reduction="none")  # [e-s]
        nll = float(losses.sum())
        if token_nll:
            per_token.append(losses)
        nll_sum += nll
        seg_nll.append(nll / (e - s))
        bar.update(e - s)
        s = e
    bar.close()
    seconds = time.perf_counter() - start_time
    mean = nll_sum / (n - 1)
    return PerplexityResult(mode=f"window-{window}", perplexity=math.exp(mean), nll=mean, tokens=n - 1,
                            seconds=seconds, tokens_per_s=n / seconds, segment_length=stride, memory_tokens=0,
                            segment_nll=seg_nll, token_nll=torch.cat(per_token).cpu() if token_nll else None)


def side_by_side(model: LongMemModel, ids: torch.Tensor, window: int = 2048, progress: bool = False
                 ) -> list[PerplexityResult]:
    """ids [N] read four ways, every token scored once in each: with memory, with the memory kept empty, the
    bare backbone on the same segments, and the backbone with a ``window``-token sliding window (what users do
    without a memory)."""
    runs = [perplexity(model, ids, mode=mode, progress=progress) for mode in ("memory", "no-memory", "backbone")]
    return runs + [sliding_window_perplexity(model, ids, window, progress=progress)]
