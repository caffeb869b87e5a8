"""The model kinds a training run or an evaluation can name: LongMem and its baselines."""

from __future__ import annotations

from pathlib import Path

from longmem.baselines.memtrm import MemTRM
from longmem.files import load_json
from longmem.model.longmem import LongMemModel

MODEL_KINDS: dict[str, type[LongMemModel]] = {"longmem": LongMemModel, "memtrm": MemTRM}


def kind_of(path: str | Path | None) -> str:
    """The kind of a saved directory ('longmem' for None, 'default', 'fresh' or a directory of unknown kind)."""
    if path is None or str(path) in ("default", "fresh") or not (Path(path) / "config.json").is_file():
        return "longmem"
    kind = load_json(Path(path) / "config.json").get("kind")
    return next((name for name, cls in MODEL_KINDS.items() if cls.kind == kind), "longmem")
