"""``longmem ppl`` and ``longmem probe``: reading long texts."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from longmem.cli.common import load_model, model_args
from longmem.errors import LongMemError


def add_parsers(sub) -> None:
    ppl = sub.add_parser("ppl", help="perplexity of long texts read segment by segment")
    ppl.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files")
    mode = ppl.add_mutually_exclusive_group()
    mode.add_argument("--no-memory", action="store_true", help="same model, memory kept empty")
    mode.add_argument("--backbone-only", action="store_true", help="the frozen backbone alone, same segments")
    mode.add_argument("--compare", action="store_true", help="memory, empty memory, backbone (and the short-term tier alone) side by side")
    ppl.add_argument("--foreign-memory", type=Path, metavar="OTHER",
                     help="control: also score with a memory holding OTHER text only (never written)")
    ppl.add_argument("--window", type=int, action="append", default=[], metavar="W",
                     help="also the backbone alone with a W-token sliding window, stride W/2 (repeatable)")
    ppl.add_argument("--memory-size", type=int, help="memory capacity in tokens (default 65536)")
    ppl.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    ppl.add_argument("--max-tokens", type=int, help="read at most this many tokens of each file")
    model_args(ppl)
    ppl.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ppl.add_argument("--quiet", action="store_true", help="no progress bar")
    ppl.add_argument("--plot", type=Path, metavar="PNG", help="also draw each mode's loss by distance from the start")
    ppl.set_defaults(func=cmd_ppl)

    probe = sub.add_parser("probe", help="retrieval quality: share of the backbone's attention that retrieval finds")
    probe.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files")
    probe.add_argument("--window", type=int, default=4096, help="tokens read per window (<= native context)")
    probe.add_argument("--windows", type=int, default=4, help="windows per file, evenly spaced")
    probe.add_argument("--chunk-size", type=int, help="memory chunk size")
    probe.add_argument("--sink-tokens", type=int, help="first tokens of each segment kept out of memory")
    probe.add_argument("--segment", type=int, help="segment length T")
    model_args(probe)
    probe.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    probe.set_defaults(func=cmd_probe)


def cmd_ppl(args: argparse.Namespace) -> int:
    from longmem.files import read_text
    from longmem.inference.reader import perplexity, read, sliding_window_perplexity, tokenize

    texts = {path: read_text(path) for path in args.files}  # validate every file before loading a model
    foreign_text = read_text(args.foreign_memory) if args.foreign_memory else None
    for name, value in (("--memory-size", args.memory_size), ("--segment", args.segment),
                        ("--max-tokens", args.max_tokens)):
        if value is not None and value <= 0:
            raise LongMemError(f"{name} must be a positive integer, not {value}")
    model = load_model(args, memory_size=args.memory_size, segment_length=args.segment)
    modes = ["memory", "no-memory", "backbone"] + (["short-term-only"] if model.recent_tokens else []) \
        if args.compare else [
        "no-memory" if args.no_memory else "backbone" if args.backbone_only else "memory"]
    if foreign_text is not None:
        modes.append("foreign-memory")
    results = []
    for path, text in texts.items():
        ids = tokenize(model, text)[: args.max_tokens]
        runs = []
        for mode in modes:
            memory = None
            if mode == "foreign-memory":
                foreign = tokenize(model, foreign_text)[: model.config.memory_size]  # more would be evicted
                memory = read(model, foreign, model.new_memory(1), progress=not args.quiet)
            runs.append(perplexity(model, ids, mode=mode, memory=memory, progress=not args.quiet))
        runs += [sliding_window_perplexity(model, ids, w, progress=not args.quiet) for w in args.window]
        for res in runs:
            results.append({"file": str(path)} | res.to_dict())
            if not args.json:
                print(f"{path}  {res.mode:>14}  ppl {res.perplexity:8.3f}  tokens {res.tokens:>8}  "
                      f"{res.tokens_per_s:7.1f} tok/s")
    if args.plot:
        from longmem.evals.plots import position_loss

        position_loss(results, args.plot)
    if args.json:
        main_rows = [r for r in results if r["mode"] == modes[0]]
        tokens = sum(r["tokens"] for r in main_rows)
        nll = sum(r["nll"] * r["tokens"] for r in main_rows) / tokens
        seconds = sum(r["seconds"] for r in main_rows)
        print(json.dumps({
            "command": "longmem " + " ".join(sys.argv[1:]),
            "mode": modes[0],
            "perplexity": math.exp(nll),
            "tokens": tokens,
            "tokens_per_s": sum(r["tokens"] for r in main_rows) / seconds,
            "results": results,
            "config": model.config.to_dict(),
        }))
    return 0



def cmd_probe(args: argparse.Namespace) -> int:
    from longmem.files import read_text
    from longmem.evals.probe import retrieval_quality
    from longmem.inference.reader import tokenize

    texts = {path: read_text(path) for path in args.files}
    model = load_model(args, chunk_size=args.chunk_size, sink_tokens=args.sink_tokens, segment_length=args.segment)
    rows = []
    for path, text in texts.items():
        ids = tokenize(model, text)
        if ids.shape[0] < args.window:
            raise LongMemError(f"{path} has {ids.shape[0]} tokens, fewer than --window {args.window}")
        starts = spaced(0, ids.shape[0] - args.window, args.windows)
        for start in starts:
            res = retrieval_quality(model, ids[start:], window=args.window)
            rows.append({"file": str(path), "start": start} | res.to_dict())
    keys = ("sink_share", "earlier_share", "captured", "random_captured")
    summary = {key: sum(r[key] for r in rows) / len(rows) for key in keys}
    if args.json:
        print(json.dumps(summary | {"command": "longmem " + " ".join(sys.argv[1:]), "windows": rows,
                                    "config": model.config.to_dict()}))
    else:
        print(f"captured {summary['captured']:.3f} of the earlier attention mass "
              f"(random K entries: {summary['random_captured']:.3f}; earlier share {summary['earlier_share']:.3f})")
    return 0


def spaced(low: int, high: int, n: int) -> list[int]:
    """n evenly spaced ints from low to high inclusive."""
    return [low + (high - low) * i // max(1, n - 1) for i in range(n)]

