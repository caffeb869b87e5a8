"""A named memory on disk: append-only part files + one atomically switched manifest.

A memory directory holds ``manifest.json`` and ``part-<id>.safetensors`` files. Each part
is one append: the kept tokens' keys, values and search keys [H_kv,n,Dh] and absolute
positions [n], exactly what ``MemoryBank.write_row`` receives, in reading order. Loading
replays the parts into a fresh bank. An append writes its part under a new name, fsyncs
it, then replaces the manifest (which lists every part with its sha256) with
``os.replace``; only after that are parts no longer listed deleted. A crash or ``kill -9``
at any point leaves either the old or the new manifest, whose parts are all intact.

Parts are trimmed so the directory holds little more than the bank's capacity: the kept
tokens form one stream, the bank keeps its last ``capacity`` tokens in whole chunks, so
parts may start at any chunk-aligned stream offset at or before the oldest kept chunk and
replay to the same bank. Writers hold an exclusive ``flock``, readers a shared one.
"""

from __future__ import annotations

import fcntl
import os
import re
import shutil
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import save_file

from longmem.errors import LongMemError
from longmem.files import fsync, load_checked_safetensors, load_versioned, save_json, sha256
from longmem.memory.bank import MemoryBank

KIND = "longmem-named-memory"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
MAX_SOURCES = 1000  # the manifest keeps the newest entries of its log of what was read
TENSORS = ("keys", "values", "search", "positions")
OPTIONAL = ("ids", "match")  # a copy head's token ids and match keys


def check_name(name: str) -> str:
    """A memory name: 1-64 letters, digits, '.', '_' or '-', not starting with a symbol."""
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise LongMemError(f"bad memory name {name!r}: use 1-64 letters, digits, '.', '_' or '-' "
                           "(no path separators), starting with a letter or digit")
    return name


@dataclass
class Tokens:
    """Kept tokens of one memory row, in reading order."""

    keys: torch.Tensor  # [H_kv,n,Dh]
    values: torch.Tensor  # [H_kv,n,Dh]
    search: torch.Tensor  # [H_kv,n,Dh] what chunk keys average (e.g. keys rotated to their positions)
    positions: torch.Tensor  # [n] absolute positions
    ids: torch.Tensor | None = None  # [n] int32 token ids (-1 unknown), kept for a copy head
    match: torch.Tensor | None = None  # [H_kv,n,Dh] the copy head's unit match keys (bf16)

    @property
    def count(self) -> int:
        return int(self.positions.shape[0])

    def select(self, keep: torch.Tensor) -> "Tokens":
        """The tokens where keep [n] (bool) is True, in order."""
        ids = None if self.ids is None else self.ids[keep]
        match = None if self.match is None else self.match[:, keep]
        return Tokens(self.keys[:, keep], self.values[:, keep], self.search[:, keep], self.positions[keep], ids,
                      match)

    def slice(self, a: int) -> "Tokens":
        """The tokens from index a on."""
        ids = None if self.ids is None else self.ids[a:]
        match = None if self.match is None else self.match[:, a:]
        return Tokens(self.keys[:, a:], self.values[:, a:], self.search[:, a:], self.positions[a:], ids, match)

    @staticmethod
    def cat(parts: list["Tokens"]) -> "Tokens":
        tensors = [torch.cat([getattr(p, name) for p in parts], dim=0 if name == "positions" else 1)
                   for name in TENSORS]
        ids = None
        if any(p.ids is not None for p in parts):
            ids = torch.cat([p.ids if p.ids is not None else torch.full((p.count,), -1, dtype=torch.int32)
                             for p in parts])
        match = None
        shaped = next((p.match for p in parts if p.match is not None), None)
        if shaped is not None:  # parts without keys never match (zero keys)
            match = torch.cat([p.match if p.match is not None else shaped.new_zeros(shaped.shape[0], p.count,
                                                                                      shaped.shape[2])
                               for p in parts], dim=1)
        return Tokens(*tensors, ids, match)


def alive_start(stream_tokens: int, chunk_size: int, capacity_tokens: int) -> int:
    """Stream offset of the oldest token a bank of this capacity keeps (chunk-aligned)."""
    full = stream_tokens // chunk_size
    return (full - min(full, capacity_tokens // chunk_size)) * chunk_size


class NamedMemory:
    """One memory directory; see the module docstring."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = self.path.name

    # ------------------------------------------------------------------ reading
    def exists(self) -> bool:
        return (self.path / MANIFEST).is_file()

    def manifest(self) -> dict:
        """The current manifest, with a clear error if there is none or it is not one."""
        if not self.exists():
            raise LongMemError(f"no memory named {self.name!r} in {self.path.parent}")
        return load_versioned(self.path, MANIFEST, KIND, "named memory", FORMAT_VERSION)

    def load_into(self, bank: MemoryBank, row: int = 0) -> tuple[dict, dict | None]:
        """Replay every part into ``bank`` (empty) row ``row`` -> (the manifest used, its state tensors)."""
        with self.lock(shared=True):
            manifest = self.manifest()
            for part in manifest["parts"]:
                tokens = self._read_part(part, manifest)
                bank.write_row(row, tokens.keys, tokens.values, tokens.positions, tokens.search)
                if bank.token_log is not None and tokens.ids is not None:  # a copy head's ids and match keys
                    bank.token_log.note_row(row, tokens.ids, tokens.positions, tokens.match)
            bank.end_position[row] = int(manifest["end_position"])
            bank.touch()
            return manifest, self.read_state(manifest)

    def read_state(self, manifest: dict) -> dict | None:
        """The state tensors saved with ``manifest`` (e.g. a short-term tier), or None."""
        entry = manifest.get("state")
        if entry is None:
            return None
        return load_checked_safetensors(self.path / str(entry.get("file")), entry.get("sha256"),
                                        f"memory {self.name!r} state")

    def _read_part(self, part: dict, manifest: dict) -> Tokens:
        path = self.path / str(part.get("file"))
        data = load_checked_safetensors(path, part.get("sha256"), f"memory {self.name!r} part")
        h, d, n = int(manifest["num_kv_heads"]), int(manifest["head_dim"]), int(part.get("tokens", -1))
        shapes = {"keys": (h, n, d), "values": (h, n, d), "search": (h, n, d), "positions": (n,)}
        if "ids" in data:
            shapes["ids"] = (n,)
        if "match" in data:
            shapes["match"] = (h, n, d)
        if set(data) - set(OPTIONAL) != set(TENSORS) or any(tuple(data[k].shape) != s for k, s in shapes.items()):
            raise LongMemError(f"memory {self.name!r} part {path.name} does not match its manifest")
        return Tokens(data["keys"], data["values"], data["search"], data["positions"], data.get("ids"),
                      data.get("match"))

    # ------------------------------------------------------------------ writing
    @contextmanager
    def lock(self, shared: bool = False) -> Iterator[None]:
        """An advisory lock on the directory: exclusive for writers, shared for readers."""
        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / ".lock", "a+b") as handle:
            fcntl.flock(handle, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def create(self, header: dict) -> dict:
        """Write an empty memory with ``header`` (identity and shape fields) unless one exists.

        Call under ``lock()``.
        """
        if self.exists():
            return self.manifest()
        now = _now()
        manifest = {"kind": KIND, "format_version": FORMAT_VERSION, "name": self.name} | header | {
            "parts": [], "stream_offset": 0, "stream_tokens": 0, "tokens_read": 0, "end_position": 0, "revision": 0,
            "sources": [], "created": now, "updated": now,
        }
        self._commit(manifest)
        return manifest

    def append(self, tokens: Tokens, first: int, tokens_read: int, end_position: int, source: str,
               state: dict[str, torch.Tensor] | None = None, spans: torch.Tensor | None = None) -> dict:
        """Add kept ``tokens`` at stream offsets ``first``.. after the current state; call under ``lock()``.

        ``first`` may skip tokens the bank could not keep anyway (then it must be
        chunk-aligned); ``tokens_read`` counts every token read, kept or not. ``state``
        (small tensors, e.g. a short-term tier) replaces the saved state. ``spans`` [tokens_read,2]: each
        token's character span in its text, kept beside the log of sources (for provenance).
        """
        old = self.manifest()
        csz, capacity, seen = int(old["chunk_size"]), int(old["capacity_tokens"]), int(old["stream_tokens"])
        stream = first + tokens.count
        start = alive_start(stream, csz, capacity)
        if first < seen or (first > seen and (first % csz or first > start)):
            raise LongMemError(f"memory {self.name!r}: an append at stream offset {first} cannot follow {seen}")
        parts, offset, head = [], int(old["stream_offset"]), None
        read = [int(old["end_position"]), int(end_position)]  # the absolute positions this append read
        for part in old["parts"]:  # old parts still holding live tokens; the first one trimmed
            end = offset + int(part["tokens"])
            if end > start:
                if offset < start:
                    trimmed = self._write_part(self._read_part(part, old).slice(start - offset))
                    part, offset = trimmed | _tags(part), start
                head = offset if head is None else head
                parts.append(part)
            offset = end
        if tokens.count and stream > start:
            new_first = max(first, start)
            parts.append(self._write_part(tokens.slice(new_first - first)) | {"source": source, "positions": read})
            head = new_first if head is None else head
        if state is not None:
            old = old | {"state": self._write_file("state", state)}
        manifest = old | {
            "parts": parts,
            "stream_offset": stream if head is None else head,
            "stream_tokens": stream,
            "tokens_read": int(old["tokens_read"]) + tokens_read,
            "end_position": end_position,
            "revision": int(old["revision"]) + 1,
            "sources": (old["sources"] + [{"source": source, "tokens": tokens_read, "at": _now(), "positions": read}
                                          | ({"spans": self._write_file("spans", {"spans": spans.to(torch.int64)})}
                                             if spans is not None else {})])[-MAX_SOURCES:],
            "updated": _now(),
        }
        self._commit(manifest)
        return manifest

    def forget(self, source: str, edit_state) -> dict:
        """Remove every text read from ``source``: its kept tokens from the parts, its positions from the saved
        state (``edit_state(state, gone) -> state``, ``gone``: positions -> bool), its entries from the log of
        sources; committed atomically like an append. Call under ``lock()``."""
        old = self.manifest()
        ranges = [tuple(e["positions"]) for e in old["sources"] if e.get("source") == source and "positions" in e]
        ranges += [tuple(p["positions"]) for p in old["parts"] if p.get("source") == source and "positions" in p]
        if not ranges:
            if any(e.get("source") == source for e in old["sources"]):
                raise LongMemError(f"memory {self.name!r}: {source!r} was read by an older version that did not "
                                   "record where each text lies; it cannot be forgotten alone")
            known = sorted({str(e.get("source")) for e in old["sources"]})
            raise LongMemError(f"memory {self.name!r} holds no text from source {source!r} (sources: "
                               f"{', '.join(known) or 'none'})")

        def gone(positions: torch.Tensor) -> torch.Tensor:
            hit = torch.zeros(positions.shape, dtype=torch.bool, device=positions.device)
            for a, b in ranges:
                hit |= (positions >= a) & (positions < b)
            return hit

        parts, removed = [], 0
        for part in old["parts"]:
            tokens = self._read_part(part, old)
            hit = gone(tokens.positions)
            tags = _tags(part) if part.get("source") != source else {}  # what is left of it is other texts'
            if not bool(hit.any()):
                parts.append({k: v for k, v in part.items() if k not in ("source", "positions")} | tags)
                continue
            removed += int(hit.sum())
            if not bool(hit.all()):
                parts.append(self._write_part(tokens.select(~hit)) | tags)
        manifest = old | {
            "parts": parts,
            "stream_tokens": int(old["stream_tokens"]) - removed,
            "tokens_read": int(old["tokens_read"]) - sum(int(e.get("tokens", 0)) for e in old["sources"]
                                                         if e.get("source") == source),
            "revision": int(old["revision"]) + 1,
            "sources": [e for e in old["sources"] if e.get("source") != source],
            "updated": _now(),
        }
        state = self.read_state(old)
        if state is not None:
            manifest["state"] = self._write_file("state", edit_state(state, gone))
        self._commit(manifest)
        return manifest

    def locate(self, positions: list[int], manifest: dict | None = None) -> list[dict | None]:
        """Where each absolute position came from: {"source", "start", "end"} (character offsets in that text; no
        offsets for texts remembered without them), or None (not a remembered text's, or forgotten)."""
        manifest = manifest or self.manifest()
        entries = [e for e in manifest["sources"] if "positions" in e]
        spans: dict[str, torch.Tensor] = {}
        out = []
        for p in positions:
            entry = next((e for e in entries if e["positions"][0] <= p < e["positions"][1]), None)
            if entry is None:
                out.append(None)
                continue
            found = {"source": entry["source"]}
            if "spans" in entry:
                file = entry["spans"]["file"]
                if file not in spans:
                    spans[file] = load_checked_safetensors(self.path / file, entry["spans"].get("sha256"),
                                                           f"memory {self.name!r} spans")["spans"]
                i = p - entry["positions"][0]
                if i < spans[file].shape[0]:
                    found |= {"start": int(spans[file][i, 0]), "end": int(spans[file][i, 1])}
            out.append(found)
        return out

    def _write_part(self, tokens: Tokens) -> dict:
        tensors = {k: getattr(tokens, k) for k in TENSORS + OPTIONAL if getattr(tokens, k) is not None}
        return self._write_file("part", tensors) | {"tokens": tokens.count}

    def _write_file(self, kind: str, tensors: dict[str, torch.Tensor]) -> dict:
        """A new ``<kind>-<id>.safetensors``, flushed to disk -> its manifest entry."""
        name = f"{kind}-{uuid.uuid4().hex[:16]}.safetensors"
        path = self.path / name
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(path))
        fsync(path)
        return {"file": name, "sha256": sha256(path), "bytes": path.stat().st_size}

    def _commit(self, manifest: dict) -> None:
        """Switch to ``manifest`` atomically, then delete files it no longer lists."""
        save_json(self.path / MANIFEST, manifest)
        fsync(self.path)  # the directory entry of the new manifest
        listed = {part["file"] for part in manifest["parts"]} | {manifest.get("state", {}).get("file")}
        listed |= {e["spans"]["file"] for e in manifest["sources"] if "spans" in e}
        for path in self.path.iterdir():
            stale_part = path.name.startswith(("part-", "state-", "spans-")) and path.name not in listed
            if stale_part or (path.name.startswith(f".{MANIFEST}.") and path.name.endswith(".tmp")):
                path.unlink(missing_ok=True)

    def delete(self) -> None:
        """Remove the whole memory: renamed away atomically first, then deleted."""
        if not self.path.is_dir():
            raise LongMemError(f"no memory named {self.name!r} in {self.path.parent}")
        with self.lock():
            trash = self.path.with_name(f".trash-{self.name}-{uuid.uuid4().hex[:8]}")
            os.replace(self.path, trash)
        shutil.rmtree(trash, ignore_errors=True)


def _tags(part: dict) -> dict:
    """What a part entry says of where its tokens came from (kept when the part is rewritten)."""
    return {k: part[k] for k in ("source", "positions") if k in part}


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
