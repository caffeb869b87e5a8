"""Persistent named memories and sessions: remember texts, list, forget, generate.

A named memory lives in ``<root>/<NAME>/`` (root: ``$LONGMEM_HOME/memories`` by default;
see ``memory/named.py`` for the crash-safe, append-only format). Reading text into it
needs only the frozen backbone up to its memory layer (``read_into``, the fast twin of
``reader.read``: same memory, no SideNet). A memory records the fingerprints of the
backbone *and* the SideNet it was built with and refuses to load into any other model.
A ``Session`` binds a model to one named memory held in RAM for generation.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from longmem.data.tokens import document_spans
from longmem.model.backbone import weights_digest
from longmem.model.hub import cache_home
from longmem.errors import LongMemError
from longmem.inference.generate import GenerationConfig, TextStream, copy_memory, stream
from longmem.memory.bank import MemoryBank
from longmem.memory.bank import float_dtype
from longmem.memory.io.named import NamedMemory, Tokens, alive_start, check_name
from longmem.memory.token_log import TokenLog
from longmem.model.longmem import LongMemModel, LongMemOutput

CHECKED = ("backbone_fingerprint", "sidenet_fingerprint", "memory_layer", "chunk_size", "num_kv_heads",
           "head_dim", "dtype", "search_positions", "recent_tokens", "pointer_layer")


def memory_root(root: str | Path | None = None) -> Path:
    """Where named memories live: ``root`` or $LONGMEM_HOME/memories (~/.cache/longmem/memories)."""
    return Path(root).expanduser() if root is not None else cache_home() / "memories"


def sidenet_fingerprint(model: LongMemModel) -> str:
    """A hash of the SideNet's architecture and (sampled) weights, dtype-independent."""
    digest = hashlib.sha256()
    # the layout tag (memory-delta SideNet, joint fusion) as memories written before the product cut recorded it
    digest.update(f"delta|joint|{model.config.reduction}|{model.backbone.memory_layer}".encode())
    return weights_digest(digest, model.sidenet.state_dict())


def memory_header(model: LongMemModel, capacity_tokens: int | None = None) -> dict:
    """What a named memory records about the model that reads it (CHECKED keys must match)."""
    shape = model.backbone.attn_shape
    return {
        "backbone": model.config.backbone,
        "backbone_fingerprint": model.backbone.fingerprint,
        "sidenet_fingerprint": sidenet_fingerprint(model),
        "memory_layer": model.backbone.memory_layer,
        "chunk_size": model.config.chunk_size,
        "num_kv_heads": shape.num_kv_heads,
        "head_dim": shape.head_dim,
        "dtype": model.config.memory_dtype,
        "search_positions": "absolute" if model.backbone.family.rotary else "none",  # how search keys are kept
        "recent_tokens": model.recent_tokens,  # the short-term tier's size (0: none)
        "pointer_layer": model.config.copy_layer,  # a copy head's match keys (None without one)
        "capacity_tokens": capacity_tokens or model.config.memory_size,
    }


def check_compatible(manifest: dict, header: dict) -> None:
    """A clear error when a memory was built by another backbone or SideNet."""
    name = manifest.get("name")
    for key in CHECKED:
        if manifest.get(key) != header[key]:
            what = {"backbone_fingerprint": "another backbone", "sidenet_fingerprint": "another SideNet"}.get(
                key, "another memory layout")
            raise LongMemError(f"memory {name!r} was built with {key}={manifest.get(key)!r}, this model has "
                               f"{header[key]!r} ({what}; built by backbone {manifest.get('backbone')!r})")


@dataclass
class MemoryInfo:
    """What ``longmem memories`` shows about one named memory."""

    name: str
    tokens: int  # tokens the memory holds now (retrievable, in whole chunks)
    tokens_read: int  # every token ever read into it
    capacity_tokens: int
    bytes: int  # on disk
    backbone: str
    backbone_fingerprint: str
    sidenet_fingerprint: str
    end_position: int
    revision: int
    created: str
    updated: str

    def to_dict(self) -> dict:
        return asdict(self)


def info_of(manifest: dict, path: Path) -> MemoryInfo:
    stream, csz, cap = int(manifest["stream_tokens"]), int(manifest["chunk_size"]), int(manifest["capacity_tokens"])
    held = (stream // csz) * csz - alive_start(stream, csz, cap)
    size = sum(p.stat().st_size for p in path.iterdir() if p.is_file())
    fields = ("backbone", "backbone_fingerprint", "sidenet_fingerprint", "end_position", "revision", "created",
              "updated")
    return MemoryInfo(name=path.name, tokens=held, tokens_read=int(manifest["tokens_read"]), capacity_tokens=cap,
                      bytes=size, **{k: manifest[k] for k in fields})


class Recorder:
    """Stands in for a MemoryBank in ``model.write_memory``: keeps the written tokens.

    Forwards every write to ``bank`` too (if given). Stream offsets continue at
    ``stream_tokens``; tokens the bank can no longer keep are dropped from the front.
    ``recent`` is the memory's short-term tier, if it has one (``write_memory`` fills it).
    ``token_log``: a copy head's token log, kept here if ``bank`` has none (``model.new_token_log``).
    """

    def __init__(self, bank: MemoryBank | None, stream_tokens: int, chunk_size: int, capacity_tokens: int,
                 dtype: torch.dtype, end_position: int, recent=None, token_log: TokenLog | None = None):
        self.bank, self.csz, self.capacity, self.dtype, self.recent = bank, chunk_size, capacity_tokens, dtype, recent
        # token ids by position (a copy head's): the bank's own log, or one kept here to store them
        log = bank.token_log if bank is not None else None
        self.token_log = log if log is not None else token_log
        self.first = self.stream = stream_tokens  # stream offsets of the first kept / next token
        self.pieces: list[Tokens] = []
        self.end_position = end_position

    @property
    def end_position(self) -> torch.Tensor:
        """[1] the position after the last token read (as MemoryBank.end_position)."""
        return self._end

    @end_position.setter
    def end_position(self, value) -> None:
        self._end = torch.tensor([int(value)], dtype=torch.long, device="cpu")
        if self.bank is not None:
            self.bank.end_position = self._end.to(self.bank.device)

    def write(self, keys, values, positions, keep=None, search_keys=None) -> None:
        """As MemoryBank.write, for one row: keys/values [1,H_kv,T,Dh], positions [1,T], keep [1,T]."""
        if self.bank is not None:
            self.bank.write(keys, values, positions, keep, search_keys)
        search = keys if search_keys is None else search_keys
        sel = slice(None) if keep is None else keep[0].nonzero().squeeze(1)
        d, host = self.dtype, "cpu"  # the pieces are kept for the disk, in host memory
        ids = match = None
        if self.token_log is not None:  # a copy head's token ids and match keys, as the log noted them
            ids = self.token_log.lookup(positions[:1])[0][sel].to(host, torch.int32)
            match = self.token_log.keys_at(positions[:1])
            match = None if match is None else match[0][:, sel].to(host)
        piece = Tokens(keys[0][:, sel].to(host, d), values[0][:, sel].to(host, d), search[0][:, sel].to(host, d),
                       positions[0][sel].to(host), ids, match)
        self.pieces.append(piece)
        self.stream += piece.count
        if positions.shape[1]:
            self.end_position = positions[0, -1] + 1
        self._trim()

    def _trim(self) -> None:
        """Drop whole pieces the bank no longer keeps, once they are more than its capacity."""
        if sum(p.count for p in self.pieces) <= 2 * self.capacity:
            return
        start = alive_start(self.stream, self.csz, self.capacity)
        tokens = Tokens.cat(self.pieces)
        cut = start - self.first
        self.pieces, self.first = [tokens.slice(cut)], start

    def tokens(self) -> Tokens:
        """Every kept token from stream offset ``first`` on."""
        if not self.pieces:
            empty = torch.zeros(0, 0, 0, dtype=self.dtype, device="cpu")
            return Tokens(empty, empty, empty, torch.zeros(0, dtype=torch.long, device="cpu"))
        return Tokens.cat(self.pieces)


@torch.no_grad()
def read_into(model: LongMemModel, ids: torch.Tensor, memory, start: int, segment_length: int | None = None,
              lock=None) -> None:
    """Read ids [N] into ``memory`` (a MemoryBank or Recorder) in segments, positions from ``start``.

    The fast twin of ``reader.read``: the memory gets the same keys/values from the frozen
    backbone alone (the SideNet never changes the memory) — only its layers up to the
    memory layer, unless the memory's short-term tier needs every layer's keys/values.
    ``lock`` is held around each segment's computation.
    """
    if not model.frozen_memory:
        raise LongMemError(f"{type(model).__name__} writes its memory from its own trainable layers (e.g. the "
                           "MemTRM baseline): read text through the model (longmem ppl / eval), not remember")
    t = segment_length or model.config.segment_length
    recent, ids = memory.recent, ids.to(model.device)
    for a in range(0, ids.shape[0], t):
        seg = ids[a : a + t][None, :]  # [1,T]
        positions = start + a + torch.arange(seg.shape[1], device=seg.device)[None, :]  # [1,T]
        with lock or contextlib.nullcontext():
            if recent is None:
                keys, values, match = model.backbone.memory_kv(seg, model.config.copy_layer)
                out = LongMemOutput(None, None, keys, values, positions, input_ids=seg, match_keys=match)
            else:
                frozen = model.backbone(seg, past=recent)  # every layer's K/V [L,1,H_kv,T,Dh] too
                out = LongMemOutput(None, None, frozen.mem_keys, frozen.mem_values, positions,
                                    layer_keys=frozen.layer_keys, layer_values=frozen.layer_values, input_ids=seg,
                                    match_keys=model.match_keys(frozen.hidden))
            model.write_memory(memory, out)


def tokenize(model: LongMemModel, text: str) -> torch.Tensor:
    """text -> ids [N] (``document_ids``: no special tokens but a <bos> the model needs), with a clear error for
    empty text."""
    return tokenize_spans(model, text)[0]


def tokenize_spans(model: LongMemModel, text: str) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``tokenize`` and each token's character span [N,2] in ``text`` (None where the tokenizer cannot tell)."""
    if model.tokenizer is None:
        raise LongMemError("this model has no tokenizer")
    ids, spans = document_spans(model.tokenizer, text)
    if not ids:
        raise LongMemError("no text to remember (0 tokens)")
    spans_t = None if spans is None else torch.tensor(spans, dtype=torch.long, device="cpu").view(-1, 2)
    return torch.tensor(ids, dtype=torch.long, device="cpu"), spans_t


@dataclass
class RememberResult:
    """One text read into a named memory."""

    name: str
    source: str
    tokens: int  # tokens read
    seconds: float
    tokens_per_s: float
    memory: MemoryInfo

    def to_dict(self) -> dict:
        return asdict(self)


def _remember(model: LongMemModel, store: NamedMemory, ids: torch.Tensor, source: str, bank: MemoryBank | None,
              capacity_tokens: int | None = None, lock=None, spans: torch.Tensor | None = None) -> tuple[dict, float]:
    """Read ids into ``store`` (and ``bank``) under the store's lock; -> (manifest, seconds)."""
    header = memory_header(model, capacity_tokens)
    with store.lock():
        manifest = store.create(header)
        check_compatible(manifest, header)
        start_time = time.perf_counter()
        end = int(manifest["end_position"])
        capacity = int(manifest["capacity_tokens"])
        saved = store.read_state(manifest) if bank is None else None
        recent = None
        if manifest.get("recent_tokens"):  # the short-term tier: the RAM bank's, or the one on disk
            recent = bank.recent if bank is not None else _tier(model, _tier_state(saved))
        log = bank.token_log if bank is not None else _token_log(model, capacity, saved)
        rec = Recorder(bank, int(manifest["stream_tokens"]), int(manifest["chunk_size"]), capacity,
                       float_dtype(manifest["dtype"]), end, recent, token_log=log)
        read_into(model, ids, rec, end, lock=lock)
        manifest = store.append(rec.tokens(), rec.first, int(ids.shape[0]), int(rec.end_position[0]), source,
                                state=_state(recent, rec.token_log), spans=spans)
    return manifest, time.perf_counter() - start_time


def _tier(model: LongMemModel, state: dict | None):
    """A short-term tier for ``model`` holding ``state`` (empty when None)."""
    tier = model.new_memory(1, capacity=model.config.chunk_size).recent
    if state:
        tier.load_state(state)
    return tier


LOG = "token_log."  # a copy head's token log in a named memory's state, beside the short-term tier's tensors


def _state(recent, log: TokenLog | None) -> dict | None:
    """What a named memory keeps besides its parts: the short-term tier and the copy head's whole token log (ids
    and match keys of every token it can still match, the sinks and the tier's tokens included), or None."""
    state = dict(recent.state()) if recent is not None else {}
    if log is not None:
        state |= {LOG + name: value for name, value in log.state().items()}
    return state or None


def _tier_state(state: dict | None) -> dict | None:
    return None if state is None else {k: v for k, v in state.items() if not k.startswith(LOG)}


def _log_state(state: dict | None) -> dict:
    return {} if state is None else {k[len(LOG):]: v for k, v in state.items() if k.startswith(LOG)}


def _token_log(model: LongMemModel, capacity: int, state: dict | None) -> TokenLog | None:
    """The copy head's token log of a memory of ``capacity`` tokens, as saved in ``state`` (empty without one)."""
    log = model.new_token_log(1, capacity)
    if log is not None and _log_state(state):
        log.load_state(_log_state(state))
    return log


def remember(model: LongMemModel, name: str, text: str, source: str = "", root: str | Path | None = None,
             capacity_tokens: int | None = None) -> RememberResult:
    """Read ``text`` into the named memory (created if needed), continuing where it left off."""
    store = NamedMemory(memory_root(root) / check_name(name))
    ids, spans = tokenize_spans(model, text)
    manifest, seconds = _remember(model, store, ids, source, None, capacity_tokens, spans=spans)
    return RememberResult(name, source, int(ids.shape[0]), seconds, ids.shape[0] / max(seconds, 1e-9),
                          info_of(manifest, store.path))


def forget_source(model: LongMemModel, name: str, source: str, root: str | Path | None = None) -> MemoryInfo:
    """Remove one remembered text (every text read from ``source``) from the named memory: its tokens from the
    bank's parts, the short-term tier and the copy head's token log; crash-safe like every write. What the
    texts read after it computed while it was in their context stays in their keys and values."""
    store = NamedMemory(memory_root(root) / check_name(name))
    with store.lock():
        manifest = store.manifest()
        check_compatible(manifest, memory_header(model))
        capacity = int(manifest["capacity_tokens"])

        def edit(state: dict, gone) -> dict:
            recent = _tier(model, _tier_state(state)) if manifest.get("recent_tokens") else None
            if recent is not None:
                recent.forget(gone)
            log = _token_log(model, capacity, state)
            if log is not None:
                log.forget(gone)
            return _state(recent, log) or state

        manifest = store.forget(source, edit)
    return info_of(manifest, store.path)


def with_sources(provenance: list[dict], store: NamedMemory) -> list[dict]:
    """Provenance entries (``explain_token``) with the source name and character span of every position they
    name, where the named memory ``store`` remembered it ({"source", "start", "end"}; None: not known)."""
    wanted = [e[kind]["position"] for e in provenance for kind in ("copied", "attended") if e.get(kind)]
    found = dict(zip(wanted, store.locate(wanted))) if wanted else {}
    for entry in provenance:
        for kind in ("copied", "attended"):
            if entry.get(kind):
                entry[kind]["from"] = found.get(entry[kind]["position"])
    return provenance


def list_memories(root: str | Path | None = None) -> list[MemoryInfo]:
    """Every named memory under ``root``, by name (directories without a manifest are skipped)."""
    base = memory_root(root)
    if not base.is_dir():
        return []
    out = []
    for path in sorted(base.iterdir()):
        if path.is_dir() and not path.name.startswith(".") and NamedMemory(path).exists():
            out.append(info_of(NamedMemory(path).manifest(), path))
    return out


def forget(name: str, root: str | Path | None = None) -> None:
    """Delete a named memory."""
    NamedMemory(memory_root(root) / check_name(name)).delete()


def load_named(model: LongMemModel, name: str, root: str | Path | None = None) -> tuple[MemoryBank, dict]:
    """A named memory as a bank for ``model`` (refused if another backbone/SideNet built it)."""
    store = NamedMemory(memory_root(root) / check_name(name))
    manifest = store.manifest()
    check_compatible(manifest, memory_header(model))
    bank = model.new_memory(1, capacity=int(manifest["capacity_tokens"]))
    manifest, state = store.load_into(bank)  # the parts' ids refill the log; a saved whole log replaces it
    if _tier_state(state):
        bank.recent.load_state(_tier_state(state))
    if bank.token_log is not None and _log_state(state):
        bank.token_log.load_state(_log_state(state))
    return bank, manifest


class Session:
    """A model bound to one named memory, kept in RAM: remember texts, generate, stats.

    ``remember`` fills a copy of the bank and swaps it in when the text is on disk, so
    generations already running keep reading the memory they started with. ``lock`` (shared
    by every user of the model) is held around each model computation.
    """

    def __init__(self, model: LongMemModel, name: str, root: str | Path | None = None, create: bool = True,
                 lock=None):
        self.model, self.lock = model, lock
        self._writing = threading.Lock()  # one remember at a time
        self.store = NamedMemory(memory_root(root) / check_name(name))
        self.name = name
        if not self.store.exists():
            if not create:
                raise LongMemError(f"no memory named {name!r} in {self.store.path.parent}")
            with self.store.lock():
                self.store.create(memory_header(model))
        self.reload()

    def reload(self) -> None:
        """(Re)load the memory from disk."""
        self.memory, manifest = load_named(self.model, self.name, self.store.path.parent)
        self.revision = int(manifest["revision"])

    def remember(self, text: str, source: str = "") -> RememberResult:
        """Read ``text`` into the memory, on disk and in RAM."""
        ids, spans = tokenize_spans(self.model, text)
        with self._writing:
            if int(self.store.manifest()["revision"]) != self.revision:
                self.reload()  # another process appended meanwhile
            bank = copy_memory(self.memory)
            manifest, seconds = _remember(self.model, self.store, ids, source, bank, lock=self.lock, spans=spans)
            self.memory = bank
            if int(manifest["revision"]) != self.revision + 1:  # another writer slipped in before our lock
                self.reload()
            self.revision = int(manifest["revision"])
        return RememberResult(self.name, source, int(ids.shape[0]), seconds, ids.shape[0] / max(seconds, 1e-9),
                              info_of(manifest, self.store.path))

    def forget_source(self, source: str) -> MemoryInfo:
        """Remove every text read from ``source`` (``forget_source``), on disk and in RAM."""
        with self._writing:
            info = forget_source(self.model, self.name, source, self.store.path.parent)
            self.reload()
        return info

    def stream(self, prompt: str | torch.Tensor, config: GenerationConfig | None = None) -> TextStream:
        """Generate after ``prompt`` with this memory (which generation never changes)."""
        return stream(self.model, prompt, self.memory, config, copy_on_write=True, lock=self.lock)

    def info(self) -> MemoryInfo:
        return info_of(self.store.manifest(), self.store.path)
