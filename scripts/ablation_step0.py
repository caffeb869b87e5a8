"""Step-0 references for scripts/ablations.sh: the untrained SideNet of each initialisation.

Runs the trainer's own validation (the same 8,192 tokens, with memory, with it empty, and
the backbone) on a fresh model of configs/ablation-base.yaml for each init + fusion, with no
training step, and writes results/ablations/step0.json.
    python scripts/ablation_step0.py
"""

from __future__ import annotations

import json
import tempfile
import time

from longmem.evals.results import git_commit
from longmem.train.trainer import Trainer
from longmem.train.config import load_train_config

VARIANTS = {"delta-joint": [], "identity-joint": ["model.init=identity"],
            "paper-gated": ["model.init=paper", "model.fusion=gated"]}


def main() -> None:
    rows = {}
    for name, sets in VARIANTS.items():
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as out:
            cfg = load_train_config("configs/ablation-base.yaml", sets + [f"output_dir={out}"])
            row = Trainer(cfg, progress=False).setup().evaluate()
        rows[name] = {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()} | {
            "set": " ".join(sets), "seconds": round(time.perf_counter() - start, 1)}
        print(name, rows[name], flush=True)
    report = {"command": "python scripts/ablation_step0.py", "commit": git_commit(), "variants": rows}
    with open("results/ablations/step0.json", "w", encoding="utf-8") as fh:
        fh.write(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
