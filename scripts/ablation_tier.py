"""The long-term bank's own gain for each variant of scripts/ablations.sh.

The trainer's validation compares "memory" (short-term tier + long-term bank) with an empty
memory; this re-reads the same 8,192 validation tokens with each exported SideNet (bf16) with
its full memory and with the short-term tier alone, so that bank gain = 1 - ppl(memory) /
ppl(tier only). Writes results/ablations/<variant>/tier.json.
    python scripts/ablation_tier.py [NAME...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from longmem import LongMemModel
from longmem.evals.results import git_commit
from longmem.inference.reader import perplexity, tokenize

TEXT = "data/books/validation/austen-northangerabbey.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="variants (default: every finished one)")
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    root = Path("results/ablations")
    names = args.names or sorted(d.name for d in root.iterdir() if (d / "run.json").exists())
    ids = None
    for name in names:
        sidenet = Path("runs/ablate") / name / "sidenet"
        model = LongMemModel.from_pretrained(sidenet)
        if ids is None:
            ids = tokenize(model, Path(TEXT).read_text(encoding="utf-8"))[: args.tokens]
        row: dict = {"command": f"python scripts/ablation_tier.py {name}", "commit": git_commit(), "text": TEXT,
                     "tokens": int(ids.shape[0])}
        start = time.perf_counter()
        for mode in ("memory", "short-term-only", "no-memory"):
            if mode == "short-term-only" and not model.recent_tokens:  # no tier: it is the empty memory
                continue
            row[f"ppl_{mode.replace('-', '_')}"] = round(perplexity(model, ids, mode=mode).perplexity, 4)
        row.setdefault("ppl_short_term_only", row["ppl_no_memory"])
        row["bank_gain"] = round(1 - row["ppl_memory"] / row["ppl_short_term_only"], 4)
        row["seconds"] = round(time.perf_counter() - start, 1)
        (root / name / "tier.json").write_text(json.dumps(row, indent=2) + "\n")
        print(name, row, flush=True)


if __name__ == "__main__":
    main()
