"""Saving and loading a MemoryBank: safetensors data + a JSON manifest, crash-safe.

A memory directory holds ``manifest.json`` and one data file ``memory-<id>.safetensors``.
A save writes a new data file first, then atomically replaces the manifest (which names
the data file and its sha256), then deletes the old data file: a crash at any point
leaves either the old or the new memory, never a mix.
"""

from __future__ import annotations

import uuid
from pathlib import Path

from safetensors.torch import save_file

from ..config import FORMAT_VERSION
from ..files import fsync, load_checked_safetensors, load_json, load_versioned, save_json, sha256
from ..errors import LongMemError
from .bank import DTYPES, MemoryBank
from .recent import RecentCache

KIND = "longmem-memory"
META_KEYS = ("backbone_fingerprint", "memory_layer")
CHECKED = (*META_KEYS, "chunk_size", "num_kv_heads", "head_dim", "recent_tokens")


def save_memory(bank: MemoryBank, path: str | Path) -> Path:
    """Write ``bank`` to directory ``path``; returns the manifest path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LongMemError(f"{path} exists and is not a memory directory")
    path.mkdir(parents=True, exist_ok=True)
    old = _manifest_or_none(path)
    tensors = {"end_position": bank.end_position.clone()}
    for row in range(bank.batch_size):
        keys, values, positions = bank.row_chunks(row)
        p = int(bank.pending_count[row])
        tensors |= {
            f"row{row}.keys": keys,
            f"row{row}.values": values,
            f"row{row}.positions": positions,
            f"row{row}.chunk_keys": bank.row_chunk_keys(row),
            f"row{row}.pending_keys": bank.pending_keys[row, :, :p],
            f"row{row}.pending_values": bank.pending_values[row, :, :p],
            f"row{row}.pending_search": bank.pending_search[row, :, :p],
            f"row{row}.pending_positions": bank.pending_positions[row, :p],
        }
    recent = bank.recent
    if recent is not None:
        tensors |= {f"recent.{name}": value for name, value in recent.state().items()}
    data_name = f"memory-{uuid.uuid4().hex[:12]}.safetensors"
    data = path / data_name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(data))
    fsync(data)
    manifest = {
        "kind": KIND,
        "format_version": FORMAT_VERSION,
        "data_file": data_name,
        "sha256": sha256(data),
        "tokens": bank.num_tokens(),
        "rows": bank.batch_size,
        "capacity_tokens": bank.capacity * bank.chunk_size,
        "chunk_size": bank.chunk_size,
        "num_kv_heads": bank.num_kv_heads,
        "head_dim": bank.head_dim,
        "dtype": bank.dtype_name,
        "index": bank.index_name,
        "bytes": data.stat().st_size,
        "recent_tokens": recent.recent if recent is not None else 0,
        "sink_slots": recent.sinks if recent is not None else 0,
        "layers": recent.num_layers if recent is not None else 0,
    } | bank.meta
    save_json(path / "manifest.json", manifest)
    if old and old.get("data_file") not in (None, data_name):
        (path / old["data_file"]).unlink(missing_ok=True)
    return path / "manifest.json"


def read_manifest(path: str | Path) -> dict:
    """The manifest of a memory directory, with a clear error if it is not one."""
    return load_versioned(Path(path), "manifest.json", KIND, "memory", FORMAT_VERSION)


def load_memory(
    path: str | Path, expect: dict | None = None, index: str | None = None, capacity_tokens: int | None = None
) -> MemoryBank:
    """Load a memory directory; ``expect`` values (e.g. the backbone fingerprint) must match."""
    path = Path(path)
    manifest = read_manifest(path)
    for key, want in (expect or {}).items():
        got = manifest.get(key, 0 if key == "recent_tokens" else None)
        if key in CHECKED and got != want:
            raise LongMemError(
                f"memory {path} was built for {key}={got!r}, not {want!r} "
                "(another backbone, memory layer or short-term tier)"
            )
    tensors = load_checked_safetensors(path / str(manifest.get("data_file")), manifest.get("sha256"), "memory data")
    meta = {k: manifest[k] for k in META_KEYS if k in manifest}
    recent = None
    if int(manifest.get("recent_tokens", 0)):
        dtype = DTYPES[str(manifest["dtype"])]
        recent = RecentCache(int(manifest["rows"]), int(manifest["layers"]), int(manifest["num_kv_heads"]),
                             int(manifest["head_dim"]), int(manifest["recent_tokens"]),
                             int(manifest["sink_slots"]), dtype)
        try:
            recent.load_state({name[len("recent."):]: v for name, v in tensors.items() if name.startswith("recent.")})
        except (ValueError, AttributeError) as exc:
            raise LongMemError(f"memory {path}: short-term tier does not fit its manifest ({exc})") from None
    bank = MemoryBank(
        int(manifest["rows"]),
        int(manifest["num_kv_heads"]),
        int(manifest["head_dim"]),
        int(capacity_tokens or manifest["capacity_tokens"]),
        int(manifest["chunk_size"]),
        dtype=str(manifest["dtype"]),
        index=index or str(manifest["index"]),
        meta=meta | {"recent_tokens": int(manifest.get("recent_tokens", 0))},
        recent=recent,
    )
    for row in range(bank.batch_size):
        t = {name: tensors[f"row{row}.{name}"] for name in (
            "keys", "values", "positions", "chunk_keys", "pending_keys", "pending_values", "pending_search",
            "pending_positions")}
        bank.append_chunks(row, t["keys"], t["values"], t["positions"], t["chunk_keys"])
        p = t["pending_keys"].shape[1]
        bank.pending_keys[row, :, :p] = t["pending_keys"]
        bank.pending_values[row, :, :p] = t["pending_values"]
        bank.pending_search[row, :, :p] = t["pending_search"]
        bank.pending_positions[row, :p] = t["pending_positions"]
        bank.pending_count[row] = p
    bank.end_position.copy_(tensors["end_position"])
    return bank


def _manifest_or_none(path: Path) -> dict | None:
    try:
        return load_json(path / "manifest.json")
    except LongMemError:
        return None
