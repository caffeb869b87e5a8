"""``longmem demo``: the first look — a held-out novel read with memory, with it kept empty, by the bare
backbone and by the backbone with a sliding window, in one small table."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from longmem.cli.common import load_model, model_args, positive_args
from longmem.errors import LongMemError

DEFAULT_BOOK = Path("data/books/test/austen-persuasion.txt")
LABELS = {"memory": "LongMem, memory of {memory} tokens", "no-memory": "LongMem, memory kept empty",
          "backbone": "backbone alone, same segments"}


def add_parsers(sub) -> None:
    demo = sub.add_parser("demo", help="the first look: a held-out novel read with and without memory (~3 min)")
    demo.add_argument("file", nargs="?", type=Path, default=DEFAULT_BOOK,
                      help=f"a UTF-8 text (default {DEFAULT_BOOK}, held out from training: `longmem data books`)")
    demo.add_argument("--max-tokens", type=int, default=16384, help="read the first N tokens (default 16384)")
    demo.add_argument("--whole", action="store_true", help="read the whole text (Persuasion: 115,862 tokens, ~20 min)")
    demo.add_argument("--window", type=int, default=2048, help="the backbone's sliding window (default 2048)")
    demo.add_argument("--memory-size", type=int, help="memory capacity in tokens (default 65536)")
    demo.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    model_args(demo)
    demo.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    demo.add_argument("--quiet", action="store_true", help="no progress bar")
    demo.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from longmem.files import read_text
    from longmem.inference.reader import side_by_side, tokenize

    if args.file == DEFAULT_BOOK and not DEFAULT_BOOK.is_file():
        raise LongMemError(f"no such file: {DEFAULT_BOOK} (run `longmem data books` first, or name a text)")
    text = read_text(args.file)
    positive_args(args, "max_tokens", "window", "memory_size", "segment")
    model = load_model(args, memory_size=args.memory_size, segment_length=args.segment)
    if args.window > model.backbone.native_context:
        raise LongMemError(f"--window {args.window} exceeds the backbone's native context {model.backbone.native_context}")
    ids = tokenize(model, text)
    ids = ids if args.whole else ids[: args.max_tokens]
    runs = side_by_side(model, ids, args.window, progress=not args.quiet)
    memory, empty, _, window = runs
    line = (f"The memory takes {1 - memory.perplexity / empty.perplexity:.1%} off the same model with its memory "
            f"empty and {1 - memory.perplexity / window.perplexity:.1%} off the backbone's {args.window:,}-token "
            f"sliding window.")
    if args.json:
        print(json.dumps({"command": "longmem " + shlex.join(sys.argv[1:]), "file": str(args.file),
                          "tokens": int(ids.shape[0]), "results": [r.to_dict() for r in runs], "summary": line,
                          "config": model.config.to_dict()}))
        return 0
    labels = [LABELS[r.mode].format(memory=f"{model.config.memory_size:,}") for r in runs[:3]]
    labels.append(f"backbone, {args.window:,}-token sliding window")
    print(f"{args.file.name}: {ids.shape[0]:,} tokens read in {model.config.segment_length:,}-token segments")
    print(f"{'':<38}{'perplexity':>11}{'tokens/s':>10}")
    for label, r in zip(labels, runs):
        print(f"{label:<38}{r.perplexity:>11.2f}{r.tokens_per_s:>10.0f}")
    print(line)
    return 0
