"""A saved SideNet directory: ``config.json`` (kind, format version, the weights' sha256, the config) and
``model.safetensors`` (the SideNet's weights only; the backbone is referenced by name and fingerprint).

Format 2 is this version's. A format-1 directory (longmem 0.1) is read when its layout is the one this
version runs (the memory-delta SideNet with joint fusion, true positions, absolute search by every query
head); its config keys and weight names are renamed on the fly. Anything else is refused with the
setting that is no longer supported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from longmem.config import LongMemConfig, from_dict
from longmem.errors import LongMemError
from longmem.files import load_checked_safetensors, load_json, save_json, sha256

KIND = "longmem-sidenet"
WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2
ASSETS = Path(__file__).resolve().parent.parent / "assets" / "sidenets"
SHIPPED = {"smollm2-135m": "smollm2-135m", "smollm2": "smollm2-135m"}  # backbone name -> packaged SideNet

V1_FIXED = {"init": "delta", "fusion": "joint", "position_scheme": ("auto", "true"), "coupled": False,
            "search_positions": "absolute", "retrieval_heads": "query", "style_layers": "memory", "style_width": 0}
V1_RENAMED = {"pointer": "copy_head", "pointer_layer": "copy_layer", "pointer_context": "copy_gate"}


def shipped_sidenet(backbone: str) -> Path | None:
    """The SideNet directory shipped in this package for a built-in backbone, if any."""
    name = SHIPPED.get(backbone)
    path = ASSETS / name if name else None
    return path if path is not None and (path / "config.json").is_file() else None


def read_meta(path: Path, kind: str = KIND) -> dict[str, Any]:
    """The checked ``config.json`` of a saved directory of ``kind`` (format 1 or 2)."""
    if not path.is_dir():
        raise LongMemError(f"no SideNet directory at {path}")
    meta = load_json(path / "config.json")
    if meta.get("kind") != kind:
        raise LongMemError(f"{path} is not a {kind} directory (kind {meta.get('kind')!r})")
    versions = (1, FORMAT_VERSION) if kind == KIND else (FORMAT_VERSION,)
    if meta.get("format_version") not in versions:
        raise LongMemError(f"{path}: SideNet format version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return meta


def read_config(path: Path, cls: type = LongMemConfig, kind: str = KIND):
    """The config (a ``cls``) of a saved directory of ``kind``, with clear errors."""
    meta = read_meta(path, kind)
    data = dict(meta.get("config", {}))
    if meta["format_version"] == 1:
        data = upgrade_v1(data, path)
    return from_dict(cls, data)


def read_weights(path: Path, kind: str = KIND) -> dict[str, torch.Tensor]:
    """The weights of a saved directory (checked against the recorded sha256; format-1 names renamed)."""
    meta = read_meta(path, kind)
    state = load_checked_safetensors(path / WEIGHTS, meta.get("weights_sha256"), "SideNet weights")
    if meta["format_version"] == 1:
        state = {("copy_head." + k[len("pointer."):] if k.startswith("pointer.") else k): v for k, v in state.items()}
    return state


def upgrade_v1(data: dict[str, Any], path: Path) -> dict[str, Any]:
    """A format-1 config -> format 2, or a clear error naming a setting this version no longer runs."""
    data = dict(data)
    for key, allowed in V1_FIXED.items():
        value = data.pop(key, allowed if not isinstance(allowed, tuple) else allowed[0])
        if value not in (allowed if isinstance(allowed, tuple) else (allowed,)):
            raise LongMemError(f"SideNet {path} (format 1) was built with {key}={value!r}, which this version no "
                               "longer runs (docs/research-log.md); retrain it with configs/")
    data.pop("fixed_distance", None)
    head, ngram, local = data.get("pointer", False), data.pop("pointer_ngram", 0), data.pop("pointer_local", False)
    if head and (ngram != 3 or not local):
        raise LongMemError(f"SideNet {path} (format 1) has a copy head without exact matches in memory and context "
                           f"(pointer_ngram={ngram}, pointer_local={local}), which this version no longer runs")
    for old, new in V1_RENAMED.items():
        data[new] = data.pop(old, LongMemConfig.__dataclass_fields__[new].default)
    data.setdefault("style_rank", 0)
    return data


def write(path: Path, state: dict[str, torch.Tensor], config: dict[str, Any], kind: str = KIND) -> Path:
    """Write ``model.safetensors`` (atomically) and then ``config.json`` naming its checksum."""
    if path.exists() and not path.is_dir():
        raise LongMemError(f"{path} exists and is not a directory")
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / (WEIGHTS + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt"})
    tmp.replace(path / WEIGHTS)
    meta = {"kind": kind, "format_version": FORMAT_VERSION, "weights_sha256": sha256(path / WEIGHTS)}
    save_json(path / "config.json", meta | {"config": config})
    return path
