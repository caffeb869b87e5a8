"""Scoring continuations after a long prefix: the one primitive every evaluation shares.

A prefix too long for one window is split into a *head* and a *local window*. How the
head is used depends on the mode (the same modes as :mod:`longmem.inference.reader`):

* ``memory``     the scorer reads the head segment by segment into its memory, then
                 reads the local window (+ continuation) with that memory;
* ``no-memory``  the same scorer on the same local window, memory empty;
* ``short-term-only`` like ``memory``, but what leaves the short-term tier is dropped
                 instead of entering the chunk bank (an ablation: the long-term memory's share);
* ``backbone``   the frozen backbone alone on the same local window;
* ``window-W``   the frozen backbone alone with a longer W-token window (a sliding-window
                 baseline; W <= the backbone's native context); ``window`` picks W = the
                 exact context of the scorer's memory mode: T + its short-term tier R.

The scorer is any object with the :class:`Scorer` interface (``LongMemModel`` has it).
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from longmem.data.tokens import document_ids
from longmem.errors import LongMemError
from longmem.inference.generate import Decoder
from longmem.model.backbone import cache_of, with_cache
from longmem.inference.reader import segments

BASE_MODES = ("memory", "no-memory", "backbone", "short-term-only")
_WINDOW = re.compile(r"window-(\d+)")


class Scorer(Protocol):
    """What the evaluations need from a model (``LongMemModel``; a MemTRM wrapper likewise).

    ``config`` is a dataclass with ``segment_length``, ``memory_size`` and ``chunk_size``;
    ``backbone.model`` is the frozen Hugging Face causal LM and ``backbone.native_context``
    its trained context (used by the ``backbone`` and ``window-W`` modes); an optional
    ``recent_tokens`` (the short-term tier) sizes the ``window`` mode.
    """

    config: Any
    tokenizer: Any
    backbone: Any
    device: torch.device  # where it computes: the evaluations move their ids there

    def __call__(self, input_ids: torch.Tensor, memory: Any = None, positions: torch.Tensor | None = None,
                 backbone_logits: bool = False) -> Any:
        """input_ids [1,T] -> an output with ``logits`` [1,T,V] (and ``backbone_logits`` if asked),
        ``mem_keys``/``mem_values``/``positions`` for ``write_memory``; never writes memory itself."""

    def new_memory(self, batch_size: int = 1) -> Any: ...

    def write_memory(self, memory: Any, out: Any, to_bank: bool = True) -> None: ...

    def eval(self) -> Any: ...


@dataclass(frozen=True)
class Mode:
    """A parsed scoring mode; ``window`` is the scorer's local window in tokens."""

    name: str
    window: int

    @property
    def reads_memory(self) -> bool:
        return self.name in ("memory", "short-term-only")

    @property
    def backbone_only(self) -> bool:
        return self.name == "backbone" or self.name.startswith("window-")


def parse_mode(model: Scorer, name: str) -> Mode:
    """'memory' | 'no-memory' | 'backbone' | 'window' | 'window-W' -> Mode, validated against the model."""
    match = _WINDOW.fullmatch(name)
    native = model.backbone.native_context
    if name in BASE_MODES:
        return Mode(name, model.config.segment_length)
    if name == "window":  # as many exact tokens as the memory mode attends to (segment + short-term tier)
        w = min(native, model.config.segment_length + getattr(model, "recent_tokens", 0))
        return Mode(f"window-{w}", w)
    if not match:
        raise LongMemError(f"mode {name!r} is not one of {', '.join(BASE_MODES)}, window or window-W "
                           "(e.g. window-2048)")
    w = int(match.group(1))
    if not 0 < w <= native:
        raise LongMemError(f"mode {name}: the window must be between 1 and the native context {native}")
    return Mode(name, w)


def parse_modes(model: Scorer, names: list[str]) -> list[Mode]:
    if not names:
        raise LongMemError("no modes given")
    modes = [parse_mode(model, n) for n in names]
    if len({m.name for m in modes}) != len(modes):
        raise LongMemError(f"duplicate modes in {', '.join(names)}")
    return modes


def variant(model: Scorer, **overrides) -> Scorer:
    """A shallow copy of ``model`` (same weights) whose config has ``overrides`` applied.

    E.g. ``variant(model, memory_size=4096, chunk_size=2)``; the config validates the values.
    """
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if not overrides:
        return model
    names = {f.name for f in dataclasses.fields(model.config)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise LongMemError(f"this scorer's config has no field {', '.join(unknown)}")
    view = copy.copy(model)
    view.config = dataclasses.replace(model.config, **overrides)
    return view


@dataclass
class Context:
    """What a mode knows before its local window: a memory (or None) and where the window starts."""

    mode: Mode
    memory: Any  # the scorer's memory bank holding the head (memory mode), else None
    start: int  # absolute position of the local window's first token


def token_ids(tokenizer, text: str) -> torch.Tensor:
    """A piece of a prompt: text -> its ids [N] (no special tokens) on the host: the evaluations build prompts
    there. A prompt that starts a stream begins with ``stream_start``."""
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long, device="cpu")


def stream_start(tokenizer) -> torch.Tensor:
    """What a prompt that starts a stream begins with: [<bos>] where the tokenizer puts one first (Gemma),
    else nothing: ids [0 or 1] on the host (``longmem.data.tokens.document_ids``)."""
    return torch.tensor(document_ids(tokenizer, ""), dtype=torch.long, device="cpu")


def split_prefix(prefix: torch.Tensor, window: int, room: int) -> tuple[torch.Tensor, torch.Tensor]:
    """prefix [N] -> (head [N-L], local [L]) with L = window - room tokens (room: continuation)."""
    keep = window - room
    if keep < 1:
        raise LongMemError(f"a {room}-token continuation leaves no room in a {window}-token window")
    cut = max(0, prefix.shape[0] - keep)
    return prefix[:cut], prefix[cut:]


@torch.no_grad()
def prepare(model: Scorer, mode: Mode, head: torch.Tensor, memory: Any = None) -> Context:
    """Read head [N] segment by segment into a memory (``memory`` or a new one) in the modes
    that read; the others skip it."""
    if not mode.reads_memory:
        return Context(mode, None, head.shape[0])
    memory = model.new_memory(1) if memory is None else memory
    if mode.name == "short-term-only" and getattr(memory, "recent", None) is None:
        raise LongMemError("mode 'short-term-only' needs a model with a short-term tier (recent_tokens > 0)")
    to_bank = {} if mode.name == "memory" else {"to_bank": False}
    model.eval()
    t, head = model.config.segment_length, head.to(model.device)
    for a in segments(head.shape[0], t):
        model.write_memory(memory, model(head[a : a + t][None], memory=memory), **to_bank)  # [1,T] per segment
    return Context(mode, memory, int(memory.end_position[0]))


@torch.no_grad()
def window_logits(model: Scorer, ctx: Context, ids: torch.Tensor) -> torch.Tensor:
    """ids [T] placed right after the context -> next-token logits [T,V] (float32)."""
    if ids.shape[0] > ctx.mode.window:
        raise LongMemError(f"{ids.shape[0]} tokens do not fit the {ctx.mode.window}-token window of {ctx.mode.name}")
    model.eval()
    ids = ids.to(model.device)
    if ctx.mode.backbone_only:
        return model.backbone.model(ids[None]).logits[0].float()
    positions = ctx.start + torch.arange(ids.shape[0], device=ids.device)[None]  # [1,T]
    return model(ids[None], memory=ctx.memory, positions=positions).logits[0].float()


@dataclass
class ContinuationScore:
    """How a scorer rates a continuation given a context."""

    logprob: float  # sum of log-probabilities of the continuation's tokens
    tokens: int
    argmax: list[int]  # teacher-forced argmax at each continuation position
    exact: bool  # every argmax equals the continuation token (= greedy decoding reproduces it)


def score(model: Scorer, ctx: Context, local: torch.Tensor, continuation: torch.Tensor) -> ContinuationScore:
    """Log-likelihood of continuation [C] after local [L] (L >= 1) in context ``ctx``."""
    if local.shape[0] < 1 or continuation.shape[0] < 1:
        raise LongMemError("scoring needs at least one context token and one continuation token")
    ids = torch.cat([local, continuation[:-1]])  # [L+C-1]
    logits = window_logits(model, ctx, ids)[local.shape[0] - 1 :]  # [C,V]
    continuation = continuation.to(logits.device)
    logp = torch.log_softmax(logits, -1).gather(1, continuation[:, None])[:, 0]  # [C]
    argmax = logits.argmax(-1)  # [C]
    return ContinuationScore(float(logp.sum()), continuation.shape[0], argmax.tolist(),
                             bool((argmax == continuation).all()))


def next_token_logits(model: Scorer, ctx: Context, local: torch.Tensor) -> torch.Tensor:
    """Logits [V] of the token after local [L] in context ``ctx``."""
    return window_logits(model, ctx, local)[-1]


@torch.no_grad()
def greedy(model: Scorer, ctx: Context, local: torch.Tensor, n: int, stop: int | None = None) -> list[int]:
    """Greedily decode up to n tokens after local [L] (ending with ``stop`` if it comes): one window
    pass per token (L + n - 1 must fit). The slow twin of ``decode``."""
    ids, out = local, []
    for _ in range(n):
        token = int(next_token_logits(model, ctx, ids).argmax())
        out.append(token)
        if token == stop:
            break
        ids = torch.cat([ids, torch.tensor([token], device=ids.device)])
    return out


@torch.no_grad()
def decode(model: Scorer, ctx: Context, local: torch.Tensor, n: int, stop: int | None = None) -> list[int]:
    """``greedy`` with caches: the backbone's key/value cache in the backbone modes, the model's decode
    cache over the context's memory otherwise (one position per new token). Scorers that cannot decode
    incrementally (the MemTRM baseline) take the slow path."""
    if local.shape[0] + n - 1 > ctx.mode.window:
        raise LongMemError(f"{local.shape[0]} + {n} tokens do not fit the {ctx.mode.window}-token window "
                           f"of {ctx.mode.name}")
    model.eval()
    if ctx.mode.backbone_only:
        hf = model.backbone.model
        past, ids, out = None, local[None].to(model.device), []
        for _ in range(n):
            step = hf(ids, use_cache=True, **with_cache(hf, past))
            past = cache_of(step)
            token = int(step.logits[0, -1].float().argmax())
            out.append(token)
            if token == stop:
                break
            ids = torch.tensor([[token]], device=model.device)
        return out
    if not getattr(model, "decodes_incrementally", False):
        return greedy(model, ctx, local, n, stop)
    memory = ctx.memory if ctx.memory is not None else model.new_memory(1)
    decoder = Decoder(model, memory, ctx.mode.window, model.config.chunk_size, start=ctx.start)
    logits, out = decoder.feed(local), []
    for _ in range(n):
        token = int(logits.argmax())
        out.append(token)
        if token == stop or len(out) == n:
            break
        logits = decoder.feed(torch.tensor([token], device=model.device))
    return out
