"""TrainConfig: every setting of a memory-augmented adaptation run, typed and validated.

A run is described by a JSON or YAML file filling this dataclass; ``base: other.yaml`` (a path
relative to the file) starts from another run file, whose sections the file's own keys override;
``--set key=value`` overrides single fields (``model.memory_size=16384`` reaches into the model
config). Unknown keys are errors; the resolved config is saved beside every checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from longmem.config import LongMemConfig, from_dict
from longmem.errors import LongMemError

TRAINABLE = ("full", "lora", "copy_head", "style", "memory_path")
KINDS = ("longmem", "memtrm")


@dataclass
class TrainConfig:
    """One adaptation run."""

    kind: str = "longmem"
    """What is trained: 'longmem' (a SideNet) or 'memtrm' (the MemTRM baseline, ``longmem.baselines.memtrm``)."""
    model: LongMemConfig = field(default_factory=LongMemConfig)
    """Architecture and memory settings of the model being trained (a ``MemTRMConfig`` for 'memtrm')."""
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
    device: str = "auto"
    """Where to train: 'auto' (CUDA when present, else CPU), 'cpu', 'cuda'. Under torchrun each rank takes
    GPU LOCAL_RANK (nccl); on the CPU the ranks use gloo."""
    grad_accum: int = 1
    """Batches whose gradients are summed per optimizer step (each row's memory reads on through them)."""
    trainable: str = "full"
    """Trainable set: 'full' SideNet, 'lora' adapters, 'copy_head', 'style' (the style adapter) or 'memory_path'
    (the blocks: the memory block and the copied layers, not the copy head nor the style adapter)."""
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
    """Probability that a row's segment gets a synthetic fact, asked about segments later (``train/facts.py``)."""
    keyed_prob: float = 0.0
    """Share of facts asked by key: the question names the subject but ends with words every statement shares."""
    update_prob: float = 0.0
    """Share of new facts that restate a waiting fact's subject with a new value (the latest is asked for)."""
    list_prob: float = 0.0
    """Share of new keyed facts that give a waiting number fact's subject one more value (up to 4): such a
    subject is asked for all its values at once, as a list (the latest first)."""
    pair_prob: float = 0.0
    """Share of questions about a keyed number fact that also ask for another one's value (two subjects)."""
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
        if self.kind not in KINDS:
            raise LongMemError(f"kind={self.kind!r} is not one of {', '.join(KINDS)}")
        if isinstance(self.model, dict):
            from longmem.kinds import MODEL_KINDS

            self.model = from_dict(MODEL_KINDS[self.kind].config_class(), self.model)
        if self.trainable not in TRAINABLE:
            raise LongMemError(f"trainable={self.trainable!r} is not one of {', '.join(TRAINABLE)}")
        if self.dtype not in ("bfloat16", "float32"):
            raise LongMemError(f"dtype={self.dtype!r} is not 'bfloat16' or 'float32'")
        for name in ("steps", "batch_size", "log_every", "lora_rank", "keep_checkpoints", "grad_accum"):
            if getattr(self, name) <= 0:
                raise LongMemError(f"{name}={getattr(self, name)} must be positive")
        for name in ("fact_prob", "keyed_prob", "update_prob", "list_prob", "pair_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise LongMemError(f"{name}={getattr(self, name)} must be in [0, 1]")
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


def _read_mapping(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The settings of a run file, over those of its ``base`` (recursively)."""
    data = _parse(path)
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise LongMemError(f"{path}: base must name another run file, not {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen or base_path == path.resolve():
        raise LongMemError(f"{path}: base {base} leads back to itself")
    return _merge(_read_mapping(base_path, seen + (path.resolve(),)), data)


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``base`` with ``over``'s keys on top; sections (mappings) merge key by key."""
    out = dict(base)
    for key, value in over.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def _parse(path: Path) -> dict[str, Any]:
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
