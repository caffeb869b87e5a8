"""Where a model computes: one resolver for every ``device=`` argument and ``--device`` flag.

``"auto"`` is CUDA when torch sees a GPU, else the CPU; ``"cpu"``, ``"cuda"``, ``"cuda:N"`` and ``"mps"``
name one. The model, its memory bank, short-term tier, token log, search index and decode caches all live
on the model's device (``LongMemModel.device``); token ids given by users may be anywhere and are moved.
What stays on the host by design: faiss searches (host copies of the queries), sampling (a host
generator, so a seed draws the same tokens on every device), memories on disk and memory-mapped ones.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from longmem.errors import LongMemError

DEVICE_HELP = "where to compute: auto (CUDA when present, else CPU), cpu, cuda, cuda:N or mps"


def resolve_device(spec: str | torch.device | None = "auto") -> torch.device:
    """``spec`` -> a torch.device that exists here, or a LongMemError naming what is missing."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise LongMemError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps") from None
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise LongMemError(f"device {spec!r}: CUDA is not available here (torch {torch.__version__}, "
                               f"{'no GPU found' if torch.version.cuda else 'a CPU-only build'}); use --device cpu")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise LongMemError(f"device {spec!r}: there are {count} CUDA device(s) (cuda:0..cuda:{count - 1})")
        return device
    if device.type == "mps":
        if not torch.backends.mps.is_available():
            raise LongMemError(f"device {spec!r}: Apple MPS is not available here; use --device cpu")
        return device
    raise LongMemError(f"device {spec!r} is not one of auto, cpu, cuda, cuda:N, mps")


def canonical(device: torch.device | str) -> torch.device:
    """``device`` with its index ("cuda" -> "cuda:N", the current GPU), so that equal devices compare equal."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def autocast(device: torch.device, dtype: torch.dtype | None):
    """Mixed precision on ``device`` in ``dtype`` (bf16), or nothing for fp32 / devices without it."""
    if dtype is None or dtype == torch.float32 or device.type not in ("cpu", "cuda"):
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)
