"""Add the PMI score to a ChapterBreak results file made before it existed (or with --no-pmi).

Each candidate is scored again after a blank line alone, in each item's mode, by the model that made
the file (`--sidenet`: the same SideNet); the examples, prefixes and raw scores are the file's own.
    python experiments/chapterbreak_pmi.py results/chapterbreak/longmem.json --out results/chapterbreak/longmem-pmi.json
    python experiments/chapterbreak_pmi.py results/chapterbreak/memtrm.json --sidenet runs/memtrm/sidenet \
        --out results/chapterbreak/memtrm-pmi.json
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path

from longmem import LongMemModel
from longmem.evals.chapterbreak import ChapterBreakConfig, ChapterBreakItem, ChapterBreakResult, add_pmi
from longmem.evals.plots import chapterbreak_accuracy
from longmem.evals.results import EvalRecord, write_record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", type=Path, help="a results JSON of `longmem eval chapterbreak`")
    parser.add_argument("--sidenet", default="default", help="the SideNet that made it (default: the packaged one)")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    try:
        record = json.loads(args.results.read_text())
    except (OSError, ValueError) as e:
        sys.exit(f"cannot read {args.results}: {e}")
    if not isinstance(record, dict) or record.get("eval") != "chapterbreak":
        sys.exit(f"{args.results} is not a chapterbreak results file")
    fields = set(ChapterBreakConfig.__dataclass_fields__)
    config = ChapterBreakConfig(**{k: v for k, v in record["config"].items() if k in fields})
    items = [ChapterBreakItem(**i) for i in record["results"]["items"]]
    model = LongMemModel.from_pretrained(args.sidenet)
    start = time.perf_counter()
    items = add_pmi(model, config, items)
    result = ChapterBreakResult(config, items).to_dict()
    out = EvalRecord("chapterbreak", record["config"], record["model"], result,
                     command="python " + shlex.join(sys.argv), seconds=record["seconds"] + time.perf_counter() - start)
    write_record(out, args.out, chapterbreak_accuracy)
    for mode, s in result["summary"]["modes"].items():
        print(f"{mode:>14}  raw {s['all']['accuracy']:6.1%}  pmi {s['pmi']['all']['accuracy']:6.1%}")


if __name__ == "__main__":
    main()
