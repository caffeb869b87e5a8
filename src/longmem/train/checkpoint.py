"""Training checkpoints: SideNet + optimiser + RNG + data position + memories, atomic.

Layout under ``output_dir``::

    checkpoints/step-000200/
        trainable.safetensors   SideNet state (LoRA adapters unmerged)
        optimizer.safetensors   AdamW tensors; param groups in state.json
        state.json              step, tokens, config, per-rank data streams
        rank0.safetensors       RNG state of rank 0 (one file per rank)
        memory-rank0/           each rank's memory banks (save_memory format)
    latest.json                 {"step": 200, "dir": "checkpoints/step-000200"}

A checkpoint is written into ``step-N.tmp`` and renamed when complete; ``latest.json``
is replaced atomically afterwards, so an interruption never leaves a half checkpoint
that ``--resume`` would read.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from longmem.errors import LongMemError
from longmem.files import load_json, save_json
from longmem.memory.bank import MemoryBank
from longmem.memory.io.store import load_memory, save_memory


def step_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:06d}"


def tmp_dir(output_dir: Path, step: int) -> Path:
    return output_dir / "checkpoints" / f"step-{step:06d}.tmp"


def write_shared(path: Path, state: dict, trainable: dict, optimizer: torch.optim.Optimizer) -> None:
    """Rank 0's part: weights, optimiser and the run state."""
    save_file({k: v.detach().contiguous().cpu() for k, v in trainable.items()}, str(path / "trainable.safetensors"))
    opt_state = optimizer.state_dict()
    tensors = {}
    for idx, slots in opt_state["state"].items():
        for name, value in slots.items():
            tensors[f"{idx}.{name}"] = torch.as_tensor(value).contiguous().cpu()
    save_file(tensors, str(path / "optimizer.safetensors"))
    state = state | {"param_groups": opt_state["param_groups"]}
    save_json(path / "state.json", state)


def write_rank(path: Path, rank: int, stream_state: dict, memories: list[MemoryBank]) -> None:
    """Every rank's part: RNG, data position and memory banks."""
    save_file({"torch_rng": torch.get_rng_state()}, str(path / f"rank{rank}.safetensors"))
    save_json(path / f"rank{rank}.json", {"stream": stream_state})
    for i, memory in enumerate(memories):
        save_memory(memory, path / f"memory-rank{rank}-{i}")


def publish(output_dir: Path, step: int, keep: int) -> Path:
    """Rename the finished temp checkpoint, point latest.json at it, prune old ones."""
    final = step_dir(output_dir, step)
    if final.exists():
        shutil.rmtree(final)
    tmp_dir(output_dir, step).rename(final)
    save_json(output_dir / "latest.json", {"step": step, "dir": str(final.relative_to(output_dir))})
    done = sorted(p for p in (output_dir / "checkpoints").glob("step-*") if not p.name.endswith(".tmp"))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def latest(output_dir: Path) -> Path:
    """The newest complete checkpoint of a run, or a clear error."""
    pointer = output_dir / "latest.json"
    if not pointer.is_file():
        raise LongMemError(f"nothing to resume: no checkpoint in {output_dir}")
    path = output_dir / load_json(pointer)["dir"]
    if not (path / "state.json").is_file():
        raise LongMemError(f"checkpoint {path} named by latest.json is incomplete")
    return path


def read_shared(path: Path, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(run state, trainable tensors); restores the optimiser in place."""
    state = load_json(path / "state.json")
    trainable = load_file(str(path / "trainable.safetensors"))
    tensors = load_file(str(path / "optimizer.safetensors"))
    slots: dict[int, dict] = {}
    for key, value in tensors.items():
        idx, name = key.split(".", 1)
        slots.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": slots, "param_groups": state["param_groups"]})
    return state, trainable


def read_rank(path: Path, rank: int, expect: dict, index: str, device: torch.device | str = "cpu"
              ) -> tuple[dict, list[MemoryBank]]:
    """(stream state, memories on ``device``) of one rank; restores its RNG."""
    torch.set_rng_state(load_file(str(path / f"rank{rank}.safetensors"))["torch_rng"])
    stream = load_json(path / f"rank{rank}.json")["stream"]
    memories = [load_memory(p, expect=expect, index=index, device=device)
                for p in sorted(path.glob(f"memory-rank{rank}-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))]
    return stream, memories
