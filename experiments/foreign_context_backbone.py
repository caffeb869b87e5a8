"""The same control for the frozen backbone: does another book's text in its own window help it?

LongMem's foreign-bank control (experiments/foreign_bank_control.py) puts another book's memory
beside the document's own previous segment. Here the frozen backbone reads each 1024-token
segment of a held-out novel after its own previous segment (as the short-term tier gives it),
with and without ``--foreign-tokens`` tokens of another book in front, all inside its native
8k window: if the backbone gains from the other book too, a memory that gains from it holds
nothing the backbone would not use itself (same-author idiom), rather than a leak.
    python experiments/foreign_context_backbone.py [--foreign FILE] [--foreign-tokens 6144] [--max-tokens 24576]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from longmem import LongMemModel
from longmem.evals.results import git_commit
from longmem.files import read_text
from longmem.inference.reader import tokenize

BOOKS = ["data/books/test/austen-persuasion.txt", "data/books/test/austen-emma.txt"]


@torch.no_grad()
def segment_nll(model: LongMemModel, context: torch.Tensor, seg: torch.Tensor) -> float:
    """Summed NLL of seg[1:] given context + seg[:-1] and of seg[0] given context (ids [N]) -> float."""
    ids = torch.cat([context, seg])[None, :]  # [1,N]
    hidden = model.backbone(ids[:, :-1]).hidden[-1][:, -seg.shape[0]:]  # [1,T,D] the states predicting seg
    logits = model.backbone.logits(hidden).float()[0]  # [T,V]
    return float(F.cross_entropy(logits, seg, reduction="sum"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--foreign", default="data/books/train/austen-mansfieldpark.txt")
    parser.add_argument("--foreign-tokens", type=int, default=6144)
    parser.add_argument("--max-tokens", type=int, default=24576)
    parser.add_argument("--segment", type=int, default=1024)
    parser.add_argument("--out", type=Path, default=Path("results/longmem-facts/foreign-context-backbone.json"))
    args = parser.parse_args()
    model = LongMemModel.from_pretrained("default")
    t = args.segment
    if args.foreign_tokens + 2 * t > model.backbone.native_context:
        raise SystemExit(f"--foreign-tokens {args.foreign_tokens} + two segments exceed the native context")
    foreign = tokenize(model, read_text(args.foreign))[: model.config.memory_size][-args.foreign_tokens:]
    rows = []
    for book in BOOKS:
        ids = tokenize(model, read_text(book))[: args.max_tokens]
        start = time.perf_counter()
        own = with_foreign = 0.0
        scored = 0
        for a in range(t, ids.shape[0] - t + 1, t):  # every segment after the first: its previous one in front
            seg, prev = ids[a : a + t], ids[a - t : a]
            own += segment_nll(model, prev, seg)
            with_foreign += segment_nll(model, torch.cat([foreign, prev]), seg)
            scored += seg.shape[0]
        rows.append({"file": book, "own_previous_segment": math.exp(own / scored),
                     "foreign_then_own_previous": math.exp(with_foreign / scored),
                     "change": math.exp((with_foreign - own) / scored) - 1, "tokens": scored,
                     "seconds": time.perf_counter() - start})
        print(json.dumps(rows[-1]), flush=True)
    report = {"command": "python experiments/foreign_context_backbone.py", "commit": git_commit(),
              "foreign": args.foreign, "foreign_tokens": args.foreign_tokens, "segment": t, "results": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
