"""Keyed matches switched on by hand, untrained: what the two-step pointer finds before any training.

The copy head's keyed matches (memory/keyed.py) start nearly untrusted (a fresh head's bias, -8). This sets
the trust bias by hand on a SideNet and runs the recall suite in the memory mode: how much of keyed recall is
the pointer's finding of the statement, and how much the trained trust of stage 6.
    python experiments/keyed_untrained.py --tasks single,multikey --lengths 4096 --trials 10 \
        --out results/recall/keyed-untrained-4k.json
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import sys
import time
from pathlib import Path

import torch

from longmem import LongMemModel
from longmem.evals.plots import recall_bars
from longmem.evals.recall import RecallConfig, recall
from longmem.evals.results import EvalRecord, write_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sidenet", default="default", help="SideNet directory (default: the packaged one)")
    parser.add_argument("--tasks", default="single,multikey")
    parser.add_argument("--lengths", default="4096")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--bias", type=float, default=2.0, help="keyed_bias set by hand")
    parser.add_argument("--out", type=Path, default=Path("results/recall/keyed-untrained-4k.json"))
    args = parser.parse_args()
    model = LongMemModel.from_pretrained(args.sidenet)
    head = model.sidenet.copy_head
    with torch.no_grad():
        head.keyed_bias.fill_(args.bias)
    config = RecallConfig(tasks=args.tasks.split(","), lengths=[int(n) for n in args.lengths.split(",")],
                          trials=args.trials, modes=["memory"])
    start = time.perf_counter()
    result = recall(model, config, progress=True)
    record = EvalRecord("recall", dataclasses.asdict(config), model.config.to_dict(), result.to_dict(),
                        command="python " + shlex.join(sys.argv), seconds=time.perf_counter() - start)
    write_record(record, args.out, recall_bars)
    for task, modes in result.summary().items():
        print(task, f"{modes['memory']['accuracy']:.0%}")


if __name__ == "__main__":
    main()
