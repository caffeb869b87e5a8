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
    train.set_defaults(func=cmd_train)


def cmd_train(args: argparse.Namespace) -> int:
    from longmem.train.trainer import run
    from longmem.train.config import load_train_config

    config = load_train_config(args.config, args.set)
    result = run(config, resume=args.resume, progress=True)
    print(json.dumps({"output_dir": config.output_dir, "validation": result}))
    return 0

