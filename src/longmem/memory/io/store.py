"""Saving and loading a MemoryBank: safetensors data + a JSON manifest, crash-safe.

A memory directory holds ``manifest.json`` and one data file ``memory-<id>.safetensors``.
A save writes a new data file first, then atomically replaces the manifest (which names
the data file and its sha256), then deletes the old data file: a crash at any point
leaves either the old or the new memory, never a mix.

The manifest's ``dtype`` is the storage dtype of the cached keys/values (int8 memories
also hold one scale per token and head). ``load_memory(..., mmap=True)`` leaves the big
keys/values on disk, memory-mapped (copy-on-write); positions, chunk keys (the search
index) and the short-term tier are read into RAM.
"""

from __future__ import annotations

import uuid
from pathlib import Path

import torch
from safetensors.torch import save_file

from longmem.files import fsync, load_checked_safetensors, load_json, load_versioned, save_json, sha256
from longmem.errors import LongMemError
from longmem.memory.bank import DTYPES, STORAGE_DTYPES, STORAGE_NAMES, MemoryBank, float_dtype
from longmem.memory.search.exact import IndexConfig
from longmem.memory.io.mapped import map_checked_safetensors
from longmem.memory.quant import SCALE_DTYPE
from longmem.memory.tier import RecentCache
from longmem.memory.token_log import TokenLog

FORMAT_VERSION = 1  # of a saved memory (manifest.json)

KIND = "longmem-memory"
META_KEYS = ("backbone_fingerprint", "memory_layer")
CHECKED = (*META_KEYS, "chunk_size", "num_kv_heads", "head_dim", "recent_tokens")
ROW_TENSORS = ("positions", "chunk_keys", "pending_keys", "pending_values", "pending_search", "pending_positions")


def save_memory(bank: MemoryBank, path: str | Path) -> Path:
    """Write ``bank`` to directory ``path``; returns the manifest path."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise LongMemError(f"{path} exists and is not a memory directory")
    path.mkdir(parents=True, exist_ok=True)
    old = _manifest_or_none(path)
    tensors = {"end_position": bank.end_position.clone()}
    for row in range(bank.batch_size):
        p = int(bank.pending_count[row])
        tensors |= {f"row{row}.{name}": t for name, t in bank.row_storage(row).items()}  # keys, values (+ scales)
        tensors |= {
            f"row{row}.positions": bank.row_positions(row),
            f"row{row}.chunk_keys": bank.row_chunk_keys(row),
            f"row{row}.pending_keys": bank.pending_keys[row, :, :p],
            f"row{row}.pending_values": bank.pending_values[row, :, :p],
            f"row{row}.pending_search": bank.pending_search[row, :, :p],
            f"row{row}.pending_positions": bank.pending_positions[row, :p],
        }
    recent = bank.recent
    if recent is not None:
        tensors |= {f"recent.{name}": value for name, value in recent.state().items()}
    if bank.token_log is not None:
        tensors |= {"token_log.ids": bank.token_log.ids, "token_log.end": bank.token_log.end}
        if bank.token_log.keys is not None:
            tensors["token_log.keys"] = bank.token_log.keys
    data_name = f"memory-{uuid.uuid4().hex[:12]}.safetensors"
    data = path / data_name
    save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(data))
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
        "index_config": bank.index_config.to_dict(),
        "bytes": data.stat().st_size,
        "recent_tokens": recent.recent if recent is not None else 0,
        "sink_slots": recent.sinks if recent is not None else 0,
        "layers": recent.num_layers if recent is not None else 0,
        "token_log": bank.token_log.span if bank.token_log is not None else 0,
    } | bank.meta
    save_json(path / "manifest.json", manifest)
    if old and old.get("data_file") not in (None, data_name):
        (path / old["data_file"]).unlink(missing_ok=True)
    return path / "manifest.json"


def read_manifest(path: str | Path) -> dict:
    """The manifest of a memory directory, with a clear error if it is not one."""
    return load_versioned(Path(path), "manifest.json", KIND, "memory", FORMAT_VERSION)


def load_memory(
    path: str | Path,
    expect: dict | None = None,
    index: str | IndexConfig | None = None,
    capacity_tokens: int | None = None,
    dtype: str | None = None,
    mmap: bool = False,
    device: torch.device | str = "cpu",
) -> MemoryBank:
    """Load a memory directory; ``expect`` values (e.g. the backbone fingerprint) must match.

    ``index``: another chunk search than the saved one (a name or an IndexConfig).
    ``dtype``: the storage dtype the caller requires (refused if the memory has another).
    ``mmap``: keep the keys/values on disk, memory-mapped copy-on-write (the file never
    changes). Such a memory has one row and holds exactly its saved chunks: its capacity
    is what it holds, and later writes replace its oldest chunks in private RAM pages.
    ``device``: where the loaded bank lives (a memory saved on one device loads on any other).
    """
    path = Path(path)
    device = torch.device(device)
    if mmap and device.type != "cpu":
        raise LongMemError(f"a memory-mapped memory stays in host RAM; load {path} with mmap off to put it on {device}")
    manifest = read_manifest(path)
    stored = str(manifest.get("dtype"))
    if stored not in STORAGE_DTYPES:
        raise LongMemError(f"memory {path} has an unknown storage dtype {stored!r}")
    if dtype is not None and dtype != stored:
        raise LongMemError(f"memory {path} stores keys/values as {stored}, not {dtype} (storage dtype mismatch)")
    for key, want in (expect or {}).items():
        got = manifest.get(key, 0 if key == "recent_tokens" else None)
        if key in CHECKED and got != want:
            raise LongMemError(
                f"memory {path} was built for {key}={got!r}, not {want!r} "
                "(another backbone, memory layer or short-term tier)"
            )
    data = path / str(manifest.get("data_file"))
    load = map_checked_safetensors if mmap else load_checked_safetensors
    tensors = load(data, manifest.get("sha256"), "memory data")
    _check_storage(tensors, manifest, path)
    meta = {k: manifest[k] for k in META_KEYS if k in manifest}
    recent = None
    if int(manifest.get("recent_tokens", 0)):
        recent = RecentCache(int(manifest["rows"]), int(manifest["layers"]), int(manifest["num_kv_heads"]),
                             int(manifest["head_dim"]), int(manifest["recent_tokens"]),
                             int(manifest["sink_slots"]), float_dtype(stored), device)
        try:
            recent.load_state({name[len("recent."):]: v for name, v in tensors.items() if name.startswith("recent.")})
        except (ValueError, AttributeError) as exc:
            raise LongMemError(f"memory {path}: short-term tier does not fit its manifest ({exc})") from None
    rows, csz = int(manifest["rows"]), int(manifest["chunk_size"])
    held = tensors["row0.positions"].shape[0]
    mapped = mmap and held > 0  # an empty memory has nothing to map
    if mapped:
        if rows != 1:
            raise LongMemError(f"memory {path} has {rows} rows; mmap loading needs a one-row memory")
        if capacity_tokens is not None and capacity_tokens != held * csz:
            raise LongMemError(f"a memory-mapped memory holds exactly its {held * csz} saved tokens, "
                               f"not a capacity of {capacity_tokens}")
        capacity_tokens = held * csz
    bank = MemoryBank(
        rows,
        int(manifest["num_kv_heads"]),
        int(manifest["head_dim"]),
        int(capacity_tokens or manifest["capacity_tokens"]),
        csz,
        dtype=stored,
        index=index or _saved_index(manifest, path),
        meta=meta | {"recent_tokens": int(manifest.get("recent_tokens", 0))},
        recent=recent,
        storage={name: tensors[f"row0.{name}"][None] for name in STORAGE_NAMES if f"row0.{name}" in tensors}
        if mapped else None,
        device=device,
    )
    for row in range(bank.batch_size):
        t = {name: tensors[f"row{row}.{name}"] for name in ROW_TENSORS}
        if mapped:
            bank.attach(row, t["positions"].clone(), t["chunk_keys"])
        else:
            kv = {name: tensors[f"row{row}.{name}"] for name in STORAGE_NAMES if f"row{row}.{name}" in tensors}
            bank.append_stored(row, kv, t["positions"], t["chunk_keys"])
        p = t["pending_keys"].shape[1]
        bank.pending_keys[row, :, :p] = t["pending_keys"].to(device)
        bank.pending_values[row, :, :p] = t["pending_values"].to(device)
        bank.pending_search[row, :, :p] = t["pending_search"].to(device)
        bank.pending_positions[row, :p] = t["pending_positions"].to(device)
        bank.pending_count[row] = p
    bank.end_position.copy_(tensors["end_position"])
    bank.touch()
    span = int(manifest.get("token_log", 0))
    if span:
        if tuple(tensors.get("token_log.ids", torch.empty(0)).shape) != (rows, span):
            raise LongMemError(f"memory {path}: token ids do not fit its manifest")
        keys = tensors.get("token_log.keys")
        if keys is not None and (keys.dim() != 4 or (keys.shape[0], keys.shape[2]) != (rows, span)):
            raise LongMemError(f"memory {path}: token match keys do not fit its manifest")
        shape = (keys.shape[1], keys.shape[3]) if keys is not None else (0, 0)
        bank.token_log = TokenLog(rows, span, *shape, device=device)
        saved = {"ids": tensors["token_log.ids"], "end": tensors["token_log.end"]}
        bank.token_log.load_state(saved | ({"keys": keys} if keys is not None else {}))
    return bank


def _saved_index(manifest: dict, path: Path) -> IndexConfig:
    """The chunk search a memory was saved with (older manifests name only its kind)."""
    saved = manifest.get("index_config") or {"kind": str(manifest.get("index"))}
    try:
        return IndexConfig(**saved)
    except TypeError as exc:
        raise LongMemError(f"memory {path}: bad index_config in its manifest ({exc})") from None


def _check_storage(tensors: dict, manifest: dict, path: Path) -> None:
    """Every row's stored keys/values must have the manifest's storage dtype and shapes."""
    stored, rows = str(manifest["dtype"]), int(manifest["rows"])
    want = torch.int8 if stored == "int8" else DTYPES[stored]
    h, csz, d = int(manifest["num_kv_heads"]), int(manifest["chunk_size"]), int(manifest["head_dim"])
    names = ["keys", "values"] + (["key_scale", "value_scale"] if stored == "int8" else [])
    for row in range(rows):
        got = {name: tensors.get(f"row{row}.{name}") for name in [*names, *ROW_TENSORS]}
        if any(t is None for t in got.values()):
            missing = [name for name, t in got.items() if t is None]
            raise LongMemError(f"memory {path} row {row} is incomplete (missing {', '.join(missing)})")
        n = got["positions"].shape[0]
        for name in names:
            shape = (h, n, csz, d) if name in ("keys", "values") else (h, n, csz)
            dt = want if name in ("keys", "values") else SCALE_DTYPE
            if got[name].dtype != dt or tuple(got[name].shape) != shape:
                raise LongMemError(f"memory {path}: row{row}.{name} is {got[name].dtype} {tuple(got[name].shape)}, "
                                   f"its manifest says {dt} {shape} (storage dtype {stored})")


def _manifest_or_none(path: Path) -> dict | None:
    try:
        return load_json(path / "manifest.json")
    except LongMemError:
        return None
