"""Inference-time ablation: how the shipped SideNet places retrieved memory keys (``position_scheme``).

The SideNet was trained with ``true`` (each key at its real rotary distance); this re-reads the first
8,192 tokens of the validation novel with ``fixed`` (every memory key at one distance, 1024) and
``pre_rotary`` (keys as cached, unrotated) instead, plus the short-term tier alone for reference.

    python scripts/position_ablation.py [--out results/position-schemes.json]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from longmem import LongMemModel
from longmem.evals.scoring import variant
from longmem.inference.reader import perplexity, tokenize

TEXT = "data/books/validation/austen-northangerabbey.txt"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("results/position-schemes.json"))
    parser.add_argument("--tokens", type=int, default=8192)
    args = parser.parse_args()
    model = LongMemModel.from_pretrained("default")
    ids = tokenize(model, Path(TEXT).read_text(encoding="utf-8"))[: args.tokens]
    rows = []
    for scheme in ("true", "fixed", "pre_rotary"):
        start = time.perf_counter()
        res = perplexity(variant(model, position_scheme=scheme), ids, mode="memory")  # same weights, one setting
        rows.append({"position_scheme": scheme, "mode": "memory", "perplexity": res.perplexity,
                     "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    res = perplexity(model, ids, mode="short-term-only")
    rows.append({"position_scheme": None, "mode": "short-term-only", "perplexity": res.perplexity})
    record = {"command": "python scripts/position_ablation.py", "text": TEXT, "tokens": int(ids.shape[0]),
              "sidenet": "default", "results": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(args.out)


if __name__ == "__main__":
    main()
