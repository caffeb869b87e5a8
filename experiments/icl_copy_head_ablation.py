"""ICL with the copy head's mixing switched off: is it what makes the memory answer one label?

With memory, the packaged SideNet answers (nearly) one label for every SST-5 and MR sentence. This runs
``longmem eval icl``'s protocol in the ``memory`` mode twice on the same draws — as shipped, and with the copy
head's mixing turned off (its match keys are still computed and written, so memory holds the same) — and
writes both accuracies per task.
    python experiments/icl_copy_head_ablation.py [--tasks sst-5,mr,subj] [--demos 20] [--seeds 1] [--max-test 100]
        [--sidenet default] [--out results/icl/copy-head-ablation.json]
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from longmem import LongMemModel
from longmem.errors import LongMemError
from longmem.evals.icl import IclConfig, icl
from longmem.evals.icl_data import load_task
from longmem.evals.results import git_commit
from longmem.files import save_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="sst-5,mr,subj")
    p.add_argument("--demos", type=int, default=20)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--max-test", type=int, default=100)
    p.add_argument("--sidenet", default="default")
    p.add_argument("--out", default="results/icl/copy-head-ablation.json")
    args = p.parse_args(argv)
    start = time.perf_counter()
    config = IclConfig(tasks=args.tasks.split(","), demos=[args.demos], seeds=args.seeds, max_test=args.max_test,
                       modes=["memory"])
    for name in config.tasks:  # every task file must load before the model does
        load_task(Path(config.data), name)
    model = LongMemModel.from_pretrained(args.sidenet, dtype="bfloat16")
    results = {}
    for name in ("copy-head", "no-copy-head"):
        # no-copy-head: the head's mixture left out; everything else (memory, token log) as shipped
        model.copy_head_enabled = name == "copy-head"
        scores = icl(model, config).scores
        results[name] = {s.task: {"seed": s.seed, "accuracy": s.accuracy, "accuracy_argmax": s.accuracy_argmax}
                         for s in scores if s.seed == 0} if args.seeds == 1 else [vars(s) for s in scores]
        print(name, results[name], flush=True)
    save_json(Path(args.out), {"command": "python " + shlex.join(sys.argv), "commit": git_commit(),
                               "config": vars(args), "seconds": round(time.perf_counter() - start, 1),
                               "results": results})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    try:
        raise SystemExit(main())
    except LongMemError as e:
        sys.exit(f"icl_copy_head_ablation.py: error: {e}")
