"""Control: another book's long-term bank under the document's own short-term tier.

`longmem ppl --foreign-memory` freezes the whole foreign memory (bank *and* tier: the model then
reads every segment after 1,024 tokens of the other book). This keeps the foreign bank frozen but
lets the short-term tier hold the document's own previous segment, as in normal reading, so the
comparison with 'short-term-only' (own tier, empty bank) isolates what a foreign bank adds.
    python experiments/foreign_bank_control.py [--foreign FILE] [--max-tokens 24576]
    python experiments/foreign_bank_control.py --drop-foreign-log --own-bank
        --out results/longmem-facts/foreign-bank-no-log.json   (one command)
(``--drop-foreign-log``: the copy head's token log of the other book is emptied, so only the
memory block reads the foreign bank — which of the two carries a foreign bank's effect.
``--own-bank``: also the document's own bank as in normal reading, without its token log when
the foreign one is dropped: what the memory block takes from the book itself.)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from longmem import LongMemModel
from longmem.evals.results import git_commit
from longmem.files import read_text
from longmem.inference.reader import perplexity, read, tokenize

BOOKS = ["data/books/test/austen-persuasion.txt", "data/books/test/austen-emma.txt"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--foreign", default="data/books/train/austen-mansfieldpark.txt")
    parser.add_argument("--max-tokens", type=int, default=24576)
    parser.add_argument("--drop-foreign-log", action="store_true", help="empty the copy head's log of the other book")
    parser.add_argument("--own-bank", action="store_true", help="also the document's own bank (normal reading)")
    parser.add_argument("--sidenet", default="default", help="SideNet directory (default: the packaged one)")
    parser.add_argument("--out", type=Path, default=Path("results/longmem-facts/foreign-bank.json"))
    args = parser.parse_args()
    model = LongMemModel.from_pretrained(args.sidenet)
    foreign = tokenize(model, read_text(args.foreign))[: model.config.memory_size]
    rows = []
    for book in BOOKS:
        ids = tokenize(model, read_text(book))[: args.max_tokens]
        start = time.perf_counter()
        memory = read(model, foreign, model.new_memory(1))  # bank + tier of the other book
        if args.drop_foreign_log and memory.token_log is not None:
            memory.token_log.reset()  # the copy head sees no foreign tokens (as with the tier alone)
        # the tier then takes the document's own segments; the foreign bank is never written to
        own_tier = perplexity(model, ids, mode="short-term-only", memory=memory)
        tier_only = perplexity(model, ids, mode="short-term-only")
        rows.append({"file": book, "foreign_bank_own_tier": own_tier.perplexity, "tier_only": tier_only.perplexity,
                     "change": own_tier.perplexity / tier_only.perplexity - 1, "tokens": own_tier.tokens})
        if args.own_bank:
            mine = model.new_memory(1)
            if args.drop_foreign_log:
                mine.token_log = None  # the copy head reads no log, as under the foreign bank above
            own = perplexity(model, ids, mode="memory", memory=mine)
            rows[-1] |= {"own_bank": own.perplexity, "own_change": own.perplexity / tier_only.perplexity - 1}
        rows[-1]["seconds"] = time.perf_counter() - start
        print(json.dumps(rows[-1]), flush=True)
    flags = [f for f, on in (("--drop-foreign-log", args.drop_foreign_log), ("--own-bank", args.own_bank)) if on]
    flags += ["--sidenet", args.sidenet] if args.sidenet != "default" else []
    command = " ".join(["python experiments/foreign_bank_control.py", *flags] + (["--out", str(args.out)] if flags else []))
    report = {"command": command, "commit": git_commit(), "sidenet": args.sidenet, "foreign": args.foreign,
              "drop_foreign_log": args.drop_foreign_log, "own_bank": args.own_bank,
              "memory_size": model.config.memory_size, "results": rows}
    args.out.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
