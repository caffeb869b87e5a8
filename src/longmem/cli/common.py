"""What every verb that loads a model shares: the model flags and the loader, and small argument checks."""

from __future__ import annotations

import argparse
from pathlib import Path

from longmem.config import DEFAULT_BACKBONE, RETRIEVAL_BACKENDS
from longmem.devices import DEVICE_HELP
from longmem.errors import LongMemError


def model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sidenet", default="default",
                   help="trained SideNet (or baseline) directory; 'default' (the SideNet shipped for the built-in "
                        "backbone) or 'fresh' (a new, untrained SideNet)")
    p.add_argument("--backbone", help=f"backbone name, HF id, directory or .gguf (default {DEFAULT_BACKBONE})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--retrieval", choices=list(RETRIEVAL_BACKENDS),
                   help="chunk search: torch/faiss exact; torch-ivf, ivf, hnsw approximate")
    p.add_argument("--nprobe", type=int,
                   help="torch-ivf/ivf: lists probed per query (default 32; 48 for recall >= 0.95 at 1M tokens)")
    p.add_argument("--memory-dtype", choices=["bfloat16", "float16", "float32", "int8"],
                   help="storage of cached keys/values (default bfloat16; int8: per-token scales)")


def load_model(args: argparse.Namespace, **overrides):
    """The model the CLI flags describe: a LongMemModel, or a baseline (``--model-kind``, else the kind the
    ``--sidenet`` directory names)."""
    from longmem.kinds import MODEL_KINDS, kind_of

    kind = MODEL_KINDS[getattr(args, "model_kind", None) or kind_of(args.sidenet)]
    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.retrieval:
        overrides["retrieval"] = args.retrieval
    if getattr(args, "nprobe", None) is not None:
        overrides["retrieval_nprobe"] = args.nprobe
    if getattr(args, "memory_dtype", None):
        overrides["memory_dtype"] = args.memory_dtype
    return kind.from_pretrained(args.sidenet, backbone=args.backbone, dtype=args.dtype,
                                device=getattr(args, "device", "auto"), **overrides)


def positive_args(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise LongMemError(f"--{name.replace('_', '-')} must be a positive integer, not {value}")


def memory_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-dir", type=Path, help="where named memories live (default $LONGMEM_HOME/memories)")

