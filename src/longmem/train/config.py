"""TrainConfig: every setting of a memory-augmented adaptation run, typed and validated.

A run is described by a JSON or YAML file filling this dataclass; ``--set key=value``
overrides single fields (``model.memory_size=16384`` reaches into the model config).
Unknown keys are errors; the resolved config is saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longmem.config import LongMemConfig, from_dict
from longmem.errors import LongMemError

TRAINABLE = ("full", "memory_block", "lora", "pointer", "style", "memory_path")


@dataclass
class TrainConfig:
    """One adaptation run."""

    model: LongMemConfig = field(default_factory=LongMemConfig)
    """Architecture and memory settings of the model being trained."""
    init_from: str | None = None
    """Start from this trained SideNet directory instead of a fresh initialisation."""
    corpus: str = "data/books"
    """Prepared corpus directory (``longmem data books``)."""
    train_split: str = "train"
    """Manifest split streamed for training."""
    val_split: str = "validation"
    """Manifest split used for periodic validation."""
    output_dir: str = "runs/default"
    """Where checkpoints, metrics, curves and the final SideNet go."""
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 2
    """B: sequences (documents) streamed side by side per process."""
    lr: float = 2e-4
    """Peak learning rate of the SideNet weights."""
    gate_lr: float = 1e-2
    """Learning rate of the per-head memory gates (a scalar at 2e-4 barely moves)."""
    weight_decay: float = 0.01
    """AdamW weight decay (not applied to gates, norms and biases)."""
    beta1: float = 0.9
    """Adam beta1."""
    beta2: float = 0.98
    """Adam beta2."""
    warmup_steps: int = 50
    """Linear warm-up steps."""
    min_lr_ratio: float = 0.1
    """Cosine decay ends at this fraction of the peak learning rate."""
    grad_clip: float = 1.0
    """Gradient-norm clipping (0 = off)."""
    dtype: str = "bfloat16"
    """Compute dtype: 'bfloat16' (autocast, backbone in bf16) or 'float32'."""
    trainable: str = "full"
    """Trainable set: 'full' SideNet (paper), 'memory_block' only, 'lora' adapters, 'pointer' (the copy head),
    'style' (the style adapter) or 'memory_path' (the blocks: the memory block and the copied layers, not
    the copy head nor the style adapter)."""
    lora_rank: int = 8
    """LoRA rank (trainable='lora')."""
    lora_alpha: float = 16.0
    """LoRA scale numerator (scale = alpha / rank)."""
    recall_prob: float = 0.0
    """Probability that a segment gets a copy of earlier document text (synthetic recall)."""
    recall_min: int = 32
    """Shortest recall span, in tokens."""
    recall_max: int = 256
    """Longest recall span, in tokens."""
    fact_prob: float = 0.0
    """Probability that a row's segment gets a synthetic fact, asked about segments later (``data/facts.py``)."""
    read_memory: bool = True
    """False: segments are read without any memory (no short-term tier, no bank), e.g. to train a style
    adapter on what the text teaches without memory."""
    style_lr: float | None = None
    """Learning rate of the style adapter (None: ``lr``)."""
    eval_every: int = 100
    """Validate every this many steps (0 = only at the end)."""
    eval_tokens: int = 8192
    """Tokens read from the start of each validation document per validation."""
    save_every: int = 100
    """Checkpoint every this many steps (0 = only at the end)."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first)."""
    log_every: int = 10
    """Write a metrics line every this many steps."""
    seed: int = 0
    """Seed of data order and initialisation."""
    export_dtype: str = "bfloat16"
    """dtype of the exported SideNet weights."""

    def __post_init__(self) -> None:
        if isinstance(self.model, dict):
            self.model = from_dict(LongMemConfig, self.model)
        if self.trainable not in TRAINABLE:
            raise LongMemError(f"trainable={self.trainable!r} is not one of {', '.join(TRAINABLE)}")
        if self.dtype not in ("bfloat16", "float32"):
            raise LongMemError(f"dtype={self.dtype!r} is not 'bfloat16' or 'float32'")
        for name in ("steps", "batch_size", "log_every", "lora_rank", "keep_checkpoints"):
            if getattr(self, name) <= 0:
                raise LongMemError(f"{name}={getattr(self, name)} must be positive")
        if not 0.0 <= self.fact_prob <= 1.0:
            raise LongMemError(f"fact_prob={self.fact_prob} must be in [0, 1]")
        if not 0.0 <= self.recall_prob <= 1.0 or not 1 <= self.recall_min <= self.recall_max:
            raise LongMemError(
                f"recall_prob={self.recall_prob} must be in [0, 1] and 1 <= recall_min <= recall_max")
        if self.style_lr is not None and self.style_lr <= 0:
            raise LongMemError(f"style_lr={self.style_lr} must be positive")
        for name in ("lr", "gate_lr"):
            if getattr(self, name) <= 0:
                raise LongMemError(f"{name}={getattr(self, name)} must be positive")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def load_train_config(path: str | Path | None, sets: list[str] | None = None) -> TrainConfig:
    """Read a JSON/YAML run file (or defaults when None) and apply ``key=value`` overrides."""
    data: dict[str, Any] = {}
    if path is not None:
        data = _read_mapping(Path(path))
    for item in sets or []:
        _assign(data, *parse_set(item))
    return from_dict(TrainConfig, data)


def parse_set(item: str) -> tuple[list[str], Any]:
    """One ``--set`` override: 'model.memory_size=4096' -> (['model', 'memory_size'], 4096)."""
    key, sep, raw = item.partition("=")
    if not sep or not key:
        raise LongMemError(f"--set expects key=value, got {item!r}")
    return key.strip().split("."), _parse_value(raw)


def _read_mapping(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise LongMemError(f"no such config file: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as exc:  # noqa: BLE001 - any parse error becomes one clear line
        raise LongMemError(f"cannot parse {path}: {str(exc).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LongMemError(f"{path} must hold a mapping of settings")
    return data


def _parse_value(raw: str) -> Any:
    """'3' -> 3, '1e-4' -> 0.0001, 'true' -> True, 'null' -> None, else the string."""
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        return raw


def _assign(data: dict[str, Any], keys: list[str], value: Any) -> None:
    for key in keys[:-1]:
        data = data.setdefault(key, {})
        if not isinstance(data, dict):
            raise LongMemError(f"--set {'.'.join(keys)}: {key} is not a section")
    data[keys[-1]] = value
