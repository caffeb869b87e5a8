"""Streaming generation: a sliding local window over a long-term memory, and sampling.

The window holds at most ``window`` tokens of local context. When it is full, its oldest
``evict`` tokens move into the memory — their backbone memory-layer keys/values, written
with ``model.write_memory`` exactly as reading writes a segment (the window's first
token, an attention sink, stays out) — and the rest of the window is read again as a
new window. ``Decoder`` does this with the model's decode cache (one position per token);
the tests compare it with a slow twin that re-runs the whole window through the model for
every token (``tests/reference.py``).
"""

from __future__ import annotations

import contextlib
import time
from copy import deepcopy
from dataclasses import asdict, dataclass, field
from typing import Iterator

import torch

from longmem.data.tokens import document_ids
from longmem.errors import LongMemError
from longmem.memory.bank import MemoryBank
from longmem.model.outputs import LongMemOutput

LongMemModel = torch.nn.Module  # a LongMemModel, not imported: its generate() runs the Decoder below


@dataclass
class GenerationConfig:
    """How to sample and how the local window slides."""

    max_new_tokens: int = 128
    """Most tokens to generate."""
    temperature: float = 0.0
    """Softmax temperature; 0 = greedy (always the most likely token)."""
    top_p: float = 1.0
    """Nucleus sampling: sample among the smallest set of tokens holding this probability."""
    stop: list[str] = field(default_factory=list)
    """Stop before the first occurrence of any of these strings (not included in the text)."""
    stop_at_eos: bool = True
    """Stop at the tokenizer's end-of-sequence token."""
    seed: int | None = None
    """Seed of the sampler (None: nondeterministic)."""
    window: int | None = None
    """Local window in tokens (None: the model's segment length)."""
    evict: int | None = None
    """Tokens moved into memory when the window is full (None: half the window, whole chunks)."""
    explain: bool = False
    """Also return, per generated token, the memory entries it drew on (``Generation.provenance``)."""

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens <= 0:
            raise LongMemError(f"max_new_tokens={self.max_new_tokens!r} must be a positive integer")
        if not 0 <= self.temperature <= 100:
            raise LongMemError(f"temperature={self.temperature!r} must be in 0..100 (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise LongMemError(f"top_p={self.top_p!r} must be in (0, 1]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise LongMemError(f"stop strings must be non-empty strings, not {self.stop!r}")
        for name in ("window", "evict"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise LongMemError(f"{name}={value!r} must be a positive integer")


def window_sizes(model: LongMemModel, config: GenerationConfig, memory: MemoryBank | None = None) -> tuple[int, int]:
    """(window, evict) in tokens: evict is a positive multiple of the chunk size, at most the window.

    Default evict: half the window; the whole window when the memory has a short-term tier
    (which then keeps the evicted tokens' keys/values at every layer, so nothing is re-read).
    """
    window = config.window or model.config.segment_length
    csz = model.config.chunk_size
    tier = memory is not None and memory.recent is not None
    evict = config.evict or (window if tier else max(csz, window // 2 // csz * csz))
    if evict % csz or not 0 < evict <= window or (evict == window and not tier):
        raise LongMemError(f"evict={evict} must be a multiple of chunk_size={csz} and below window={window}"
                           f"{'' if tier else ' (the window keeps some local context)'}")
    return window, evict


class Decoder:
    """Feeds tokens through the model with a sliding window over ``memory`` (fast, cached)."""

    def __init__(self, model: LongMemModel, memory: MemoryBank, window: int, evict: int,
                 start: int | None = None, copy_on_write: bool = False, lock=None, trace: bool = False):
        if memory.batch_size != 1:
            raise LongMemError(f"generation reads one sequence, not a memory of {memory.batch_size} rows")
        self.model, self.memory, self.window, self.evict = model, memory, window, evict
        self.copy_on_write = copy_on_write  # copy the memory before the first eviction writes to it
        self.lock = lock or contextlib.nullcontext()  # held around every model computation
        self.trace = trace  # keep the last step's output with its copy sources (``last``), for provenance
        self.last: LongMemOutput | None = None
        first = int(memory.end_position[0]) if start is None else start
        self.cache = model.new_cache(1, first, window, memory)

    @property
    def window_ids(self) -> torch.Tensor:
        return self.cache.ids[0]

    def feed(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [N] -> logits [V] (fp32) after the last of them."""
        with self.lock:
            return self._feed(ids)

    def _feed(self, ids: torch.Tensor) -> torch.Tensor:
        logits = None
        while ids.numel():
            if self.cache.length == self.window:
                self._evict()
            take = min(self.window - self.cache.length, ids.numel())
            logits = self._run(ids[:take])
            ids = ids[take:]
        if logits is None:
            raise LongMemError("nothing to feed: no tokens")
        return logits

    @torch.no_grad()
    def _run(self, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(self.model.device)
        if not self.trace:
            return self.model(ids[None, :], self.memory, cache=self.cache).logits[0, -1].float()
        self.last = self.model(ids[None, :], self.memory, cache=self.cache, trace=True)
        return self.last.logits[0, -1].float()

    def _evict(self) -> None:
        cache, e = self.cache, self.evict
        if self.copy_on_write:
            self.memory, self.copy_on_write = copy_memory(self.memory), False
        keys, values = cache.memory_kv.keys, cache.memory_kv.values
        out = LongMemOutput(None, None, keys, values, cache.window_positions(), input_ids=cache.ids,
                            match_keys=None if cache.match_keys is None else cache.match_keys.keys[:, :, :cache.length])
        if self.memory.recent is not None:
            out.layer_keys, out.layer_values = cache.layer_kv()  # [L,B,H_kv,n,Dh] for the short-term tier
        self.model.write_memory(self.memory, oldest(out, e))
        keep = cache.ids[0, e:]
        self.cache = self.model.new_cache(1, cache.start + e, self.window, self.memory)
        if keep.numel():
            self._run(keep)  # read the rest again as a new window with the new memory


def oldest(out: LongMemOutput, e: int) -> LongMemOutput:
    """What ``write_memory`` needs of a window's first e tokens."""
    head = LongMemOutput(None, None, out.mem_keys[:, :, :e], out.mem_values[:, :, :e], out.positions[:, :e])
    if out.layer_keys is not None:  # every layer's K/V, for a short-term tier
        head.layer_keys, head.layer_values = out.layer_keys[:, :, :, :e], out.layer_values[:, :, :, :e]
    if out.input_ids is not None:  # token ids, for a copy head's memory
        head.input_ids = out.input_ids[:, :e]
    if out.match_keys is not None:  # and its match keys
        head.match_keys = out.match_keys[:, :, :e]
    return head


def copy_memory(bank: MemoryBank) -> MemoryBank:
    """An independent copy of a bank (same chunks, pending tokens, positions; any index)."""
    copy = MemoryBank(bank.batch_size, bank.num_kv_heads, bank.head_dim, bank.capacity * bank.chunk_size,
                      bank.chunk_size, dtype=bank.dtype_name, index=bank.index_config, meta=bank.meta,
                      recent=deepcopy(bank.recent), token_log=deepcopy(bank.token_log),  # tier, token ids too
                      device=bank.device)
    for row in range(bank.batch_size):  # stored form: int8 entries are copied, not quantised again
        copy.append_stored(row, bank.row_storage(row), bank.row_positions(row), bank.row_chunk_keys(row))
    for name in ("pending_keys", "pending_values", "pending_search", "pending_positions", "pending_count",
                 "end_position"):
        getattr(copy, name).copy_(getattr(bank, name))
    copy.touch()
    return copy


def sample(logits: torch.Tensor, config: GenerationConfig, rng: torch.Generator | None = None) -> int:
    """logits [V] -> one token id: greedy at temperature 0, else temperature + top-p sampling (on the host,
    with a host generator: a seed draws the same tokens on every device)."""
    if config.temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float().cpu() / config.temperature, dim=-1)  # [V]
    if config.top_p < 1:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the tokens ranked above each one
        sorted_probs[before >= config.top_p] = 0  # keep the smallest set reaching top_p
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
    return int(torch.multinomial(probs / probs.sum(), 1, generator=rng))


@dataclass
class Generation:
    """Summary of one generation."""

    text: str
    prompt_tokens: int
    tokens: int  # generated tokens (including a stop string's tokens, excluding EOS)
    finish_reason: str  # 'length' | 'stop' | 'eos'
    prompt_seconds: float  # reading the prompt
    seconds: float  # generating
    tokens_per_s: float  # generated tokens per second of generation
    memory_tokens: int  # tokens in memory at the end
    provenance: list[dict] | None = None  # per generated token (``explain``): see ``explain_token``

    def to_dict(self) -> dict:
        return asdict(self)


class TextStream:
    """Iterate to get the generated text piece by piece as tokens are produced.

    After the iteration ``result`` holds the ``Generation``. Text that could still turn
    out to be the start of a stop string, or half a UTF-8 character, is held back.
    """

    def __init__(self, model: LongMemModel, decoder: Decoder, prompt: torch.Tensor, config: GenerationConfig):
        if model.tokenizer is None:
            raise LongMemError("this model has no tokenizer; generation needs one")
        if prompt.numel() == 0:
            raise LongMemError("the prompt is empty: at least one token is needed")
        self.model, self.decoder, self.prompt, self.config = model, decoder, prompt, config
        self.result: Generation | None = None

    def __iter__(self) -> Iterator[str]:
        cfg, tok = self.config, self.model.tokenizer
        rng = None
        if cfg.seed is not None:
            rng = torch.Generator().manual_seed(cfg.seed)
        t0 = time.perf_counter()
        logits = self.decoder.feed(self.prompt)
        t1 = time.perf_counter()
        out: list[int] = []
        provenance: list[dict] = []
        sent, text, reason = 0, "", "length"
        while len(out) < cfg.max_new_tokens:
            token = sample(logits, cfg, rng)
            if cfg.explain:
                provenance.append(explain_token(self.decoder.last, token, logits, tok))
            if cfg.stop_at_eos and token == tok.eos_token_id:
                reason = "eos"
                break
            out.append(token)
            text = tok.decode(out, skip_special_tokens=True)
            cut = _first_stop(text, cfg.stop)
            if cut is not None:
                text, reason = text[:cut], "stop"
                break
            safe = _safe_length(text, cfg.stop)
            if safe > sent:
                yield text[sent:safe]
                sent = safe
            if len(out) < cfg.max_new_tokens:
                logits = self.decoder.feed(torch.tensor([token], device=self.model.device))
        if len(text) > sent:
            yield text[sent:]
        seconds = time.perf_counter() - t1
        self.result = Generation(
            text=text, prompt_tokens=int(self.prompt.numel()), tokens=len(out), finish_reason=reason,
            prompt_seconds=t1 - t0, seconds=seconds, tokens_per_s=len(out) / max(seconds, 1e-9),
            memory_tokens=self.decoder.memory.num_tokens(), provenance=provenance if cfg.explain else None,
        )


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Index of the earliest stop string in text, or None."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _safe_length(text: str, stops: list[str]) -> int:
    """How much of text can be sent: not a trailing partial stop string or a half character."""
    n = len(text)
    while n and text[n - 1] == "\ufffd":  # an incomplete multi-byte character
        n -= 1
    for s in stops:
        for k in range(min(len(s) - 1, n), 0, -1):
            if text[:n].endswith(s[:k]):
                n -= k
                break
    return n


def stream(model: LongMemModel, prompt: str | torch.Tensor, memory: MemoryBank | None = None,
           config: GenerationConfig | None = None, copy_on_write: bool = True, lock=None) -> TextStream:
    """Generate after ``prompt`` (text or ids [N]) with ``memory`` (default: an empty one).

    Positions continue after what the memory has read. With ``copy_on_write`` the given
    memory is never changed: tokens leaving the window go into a private copy of it.
    ``lock`` (e.g. a threading.Lock shared by all users of the model) is held around every
    model computation.
    """
    config = config or GenerationConfig()
    if memory is None:
        memory, copy_on_write = model.new_memory(1), False
    if isinstance(prompt, str):
        if model.tokenizer is None:
            raise LongMemError("this model has no tokenizer; pass token ids instead")
        ids = document_ids(model.tokenizer, prompt, start=int(memory.end_position.max()) == 0)
        prompt = torch.tensor(ids, dtype=torch.long, device="cpu")
    window, evict = window_sizes(model, config, memory)
    decoder = Decoder(model, memory, window, evict, copy_on_write=copy_on_write, lock=lock, trace=config.explain)
    return TextStream(model, decoder, prompt, config)


def explain_token(out: LongMemOutput | None, token: int, logits: torch.Tensor, tokenizer=None) -> dict:
    """Which memory entries the token sampled after ``out`` (a traced step) drew on:
    ``copied``: the copy head's candidate proposing it with the most weight -- the absolute position of the
    token it copies, and ``share``, how much of the token's probability copying gave; ``attended``: the
    memory entry the memory attention weighed most (summed over heads, times each head's memory share) --
    its position and that weight. Either is None when there is none."""
    entry = {"token": token, "text": tokenizer.decode([token]) if tokenizer is not None else None,
             "copied": None, "attended": None}
    if out is None:
        return entry
    src = out.copy_sources
    if src is not None:
        pos, w, ids = src.positions[0, -1], src.weights[0, -1].float(), src.ids[0, -1]  # [N']
        hit = (ids == token) & (pos >= 0) & (w > 0)
        if bool(hit.any()):
            best = int(torch.where(hit, w, -1.0).argmax())
            p = float(torch.exp(logits.float()[token]))  # the mixture's log-probabilities
            entry["copied"] = {"position": int(pos[best]), "share": min(1.0, float(w[hit].sum()) / max(p, 1e-30))}
    stats = out.stats
    if stats is not None and stats.positions is not None:
        probs, share = stats.probs[0, :, -1].float(), stats.share[0, :, -1].float()  # [H,K], [H]
        positions = stats.positions[0, :, -1]  # [Hs,K]
        positions = positions.repeat_interleave(probs.shape[0] // positions.shape[0], 0)  # [H,K]
        weight = (share[:, None] * probs).flatten()
        flat = positions.flatten()
        real = (flat >= 0) & (weight > 0)
        if bool(real.any()):
            unique, inverse = torch.unique(flat[real], return_inverse=True)
            total = torch.zeros(unique.shape[0]).index_add_(0, inverse.cpu(), weight[real].cpu()) / probs.shape[0]
            best = int(total.argmax())
            entry["attended"] = {"position": int(unique[best]), "weight": float(total[best])}
    return entry


def generate(model: LongMemModel, prompt: str | torch.Tensor, memory: MemoryBank | None = None,
             config: GenerationConfig | None = None) -> Generation:
    """``stream`` to the end; returns the Generation."""
    pieces = stream(model, prompt, memory, config)
    for _ in pieces:
        pass
    assert pieces.result is not None
    return pieces.result
