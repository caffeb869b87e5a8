"""Where a list answer asks again, does the keyed pointer offer the value not given yet? No model, no training.

Builds the recall suite's multivalue and multiquery prompts, appends the ideal answer (": V4, V3, V2, V1.",
the latest statement first), and runs ``memory.keyed.keyed_matches`` over it: at each " " that starts a
value, the top candidate (by key words matched, said ones last, then the most recent) should be the first
digit of a value not given yet (any order). Prints the share of such positions where it is.
    python experiments/keyed_list_geometry.py --trials 10 --out results/recall/keyed-list-geometry.json
    python experiments/keyed_list_geometry.py --window 32 --keys 4 --length 16384   # other geometries
"""

from __future__ import annotations

import argparse
import json
import random
import shlex
import sys
from pathlib import Path

import torch

from longmem.evals.recall import RecallConfig, PromptBuilder, TaskMaker
from longmem.evals.results import git_commit
from longmem.memory import keyed
from longmem.memory.token_log import TokenLog
from longmem.model.hub import load_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--window", type=int, default=keyed.WINDOW)
    parser.add_argument("--keys", type=int, default=keyed.KEYS)
    parser.add_argument("--filler", default="data/books/test/austen-emma.txt")
    parser.add_argument("--tasks", default="multivalue,multiquery,multikey,update")
    parser.add_argument("--templates", default="ruler", help="ruler | heldout")
    parser.add_argument("--out", type=Path, help="also write the counts as JSON here")
    args = parser.parse_args()
    tok = load_tokenizer("smollm2-135m")
    cfg = RecallConfig(filler=args.filler, templates=args.templates)
    builder, maker = PromptBuilder(tok, cfg), TaskMaker(cfg)
    space = tok(" ", add_special_tokens=False)["input_ids"][-1]
    counts = {}
    for task in args.tasks.split(","):
        right = total = 0
        for t in range(args.trials):
            rng = random.Random(f"{cfg.seed}-{task}-{args.length}-{t}")
            prompt = builder.build(maker(task, rng), args.length, rng)
            values = prompt.task.expected[::-1]
            answer = tok(": " + ", ".join(values) + ".", add_special_tokens=False)["input_ids"]
            ids = torch.cat([prompt.ids, torch.tensor(answer)])[None]
            q = len(answer)
            pos, overlap, _, nxt, said = keyed.keyed_matches(TokenLog(1, 2 * args.length), ids,
                                                             torch.arange(ids.shape[1])[None], q,
                                                             window=args.window, keys=args.keys)
            starts = [i for i in range(q - 1) if answer[i] == space]  # where each value starts
            for n, i in enumerate(starts):
                open_ = {tok(v[0], add_special_tokens=False)["input_ids"][0] for v in values[n:]}
                found = pos[0, i] >= 0
                if not bool(found.any()):
                    total += 1
                    continue
                rank = overlap[0, i] - 1e3 * said[0, i] + 1e-9 * pos[0, i]  # key words, not said, latest
                best = int(torch.where(found, rank, -1e9).argmax())
                right += int(nxt[0, i, best]) in open_
                total += 1
        print(f"{task}: the top candidate is the next value at {right} / {total} value starts")
        counts[task] = {"right": right, "value_starts": total}
    if args.out:
        args.out.write_text(json.dumps({"command": "python " + shlex.join(sys.argv), "commit": git_commit(),
                                        "settings": vars(args) | {"out": str(args.out)}, "counts": counts}, indent=1))


if __name__ == "__main__":
    main()
