"""Small file helpers: atomic JSON, checksums, fsync, text input validation."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

from longmem.errors import LongMemError


def atomic_write(path: Path, data: bytes) -> None:
    """Write bytes to ``path`` via a temporary file, fsync and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_json(path: Path, data: Any) -> None:
    """Write ``data`` as JSON atomically."""
    atomic_write(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode("utf-8"))


def load_json(path: Path, kind: type = dict) -> Any:
    """Read a JSON object (or ``kind``, e.g. list), with a clear error for a missing or corrupt file."""
    if not path.is_file():
        raise LongMemError(f"missing file: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise LongMemError(f"corrupt JSON in {path}: {exc}") from None
    if not isinstance(data, kind):
        raise LongMemError(f"{path} must hold a JSON {'object' if kind is dict else kind.__name__}")
    return data


def sha256(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync(path: Path) -> None:
    """Flush a written file (or a directory's entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_text(path: str | Path) -> str:
    """A UTF-8 text file's contents, or a clear error (missing, directory, binary, empty)."""
    path = Path(path)
    if path.is_dir():
        raise LongMemError(f"{path} is a directory, not a text file")
    if not path.is_file():
        raise LongMemError(f"no such file: {path}")
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise LongMemError(f"{path} is a binary file, not UTF-8 text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise LongMemError(f"{path} is not UTF-8 text (bad byte at offset {exc.start})") from None
    if not text.strip():
        raise LongMemError(f"{path} is empty (no text to read)")
    return text


def load_versioned(folder: Path, filename: str, kind: str, what: str, version: int) -> dict[str, Any]:
    """The JSON header of a longmem directory, checked for its kind and format version."""
    if not folder.is_dir():
        raise LongMemError(f"no {what} directory at {folder}")
    meta = load_json(folder / filename)
    if meta.get("kind") != kind:
        raise LongMemError(f"{folder} is not a longmem {what} directory (kind {meta.get('kind')!r})")
    if meta.get("format_version") != version:
        raise LongMemError(f"{folder}: {what} format version {meta.get('format_version')} is not {version}")
    return meta


def load_checked_safetensors(path: Path, expected_sha256: str | None, what: str) -> dict:
    """Tensors of a safetensors file whose checksum must match (no unpickling, ever)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not path.is_file() or sha256(path) != expected_sha256:
        raise LongMemError(f"{what} {path} is missing, truncated or modified (checksum mismatch)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise LongMemError(f"cannot read {what} {path}: {exc}") from None
