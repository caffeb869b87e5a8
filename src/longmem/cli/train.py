"""``longmem train``: memory-augmented adaptation of a SideNet."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def add_parsers(sub) -> None:
    train = sub.add_parser("train", help="memory-augmented adaptation of a SideNet")
    train.add_argument("config", nargs="?", type=Path, help="run file (.json/.yaml); defaults if omitted")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set steps=500 --set model.memory_size=16384")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.add_argument("--device", help="where to train (the run file's device setting; default auto): "
                                        "auto, cpu, cuda (torchrun: one GPU per rank)")
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from longmem.train.trainer import run
    from longmem.train.config import load_train_config

    sets = args.set + ([f"device={args.device}"] if args.device else [])
    config = load_train_config(args.config, sets)
    result = run(config, resume=args.resume, progress=True)
    print(json.dumps({"output_dir": config.output_dir, "validation": result}))
    return 0

