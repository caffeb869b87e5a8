"""The ``longmem`` command: a thin layer over the library; every verb calls one function."""

from __future__ import annotations

import argparse
import json
import math
import logging
import sys
from pathlib import Path

from .config import DEFAULT_BACKBONE
from .errors import LongMemError

log = logging.getLogger("longmem")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        _quiet_hugging_face()
    if not hasattr(args, "func"):
        parser.print_help(sys.stderr)
        return 2
    try:
        return args.func(args) or 0
    except LongMemError as exc:
        print(f"longmem: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("longmem: interrupted", file=sys.stderr)
        return 130


def _quiet_hugging_face() -> None:
    """Keep stderr to our own progress bar and one-line errors."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="longmem", description="Language models with a long-term memory.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(title="commands")

    ppl = sub.add_parser("ppl", help="perplexity of long texts read segment by segment")
    ppl.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files")
    mode = ppl.add_mutually_exclusive_group()
    mode.add_argument("--no-memory", action="store_true", help="same model, memory kept empty")
    mode.add_argument("--backbone-only", action="store_true", help="the frozen backbone alone, same segments")
    mode.add_argument("--compare", action="store_true", help="memory, empty memory and backbone side by side")
    ppl.add_argument("--memory-size", type=int, help="memory capacity in tokens (default 65536)")
    ppl.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    ppl.add_argument("--max-tokens", type=int, help="read at most this many tokens of each file")
    _model_args(ppl)
    ppl.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ppl.set_defaults(func=cmd_ppl)

    data = sub.add_parser("data", help="prepare corpora")
    data.add_argument("what", choices=["books"], help="books: Austen, KJV Bible, Shakespeare")
    data.add_argument("--out", type=Path, default=Path("data/books"), help="output directory")
    data.add_argument("--sources", default="austen,kjv,shakespeare", help="comma-separated sources")
    data.set_defaults(func=cmd_data)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sidenet", type=Path, help="trained SideNet directory (default: a fresh identity SideNet)")
    p.add_argument("--backbone", help=f"backbone name, HF id, directory or .gguf (default {DEFAULT_BACKBONE})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    p.add_argument("--retrieval", choices=["torch", "faiss"], help="chunk search backend")


def load_model(args: argparse.Namespace, **overrides):
    """The LongMemModel the CLI flags describe."""
    from .model import LongMemModel

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.retrieval:
        overrides["retrieval"] = args.retrieval
    return LongMemModel.from_pretrained(args.sidenet, backbone=args.backbone, dtype=args.dtype, **overrides)


def cmd_ppl(args: argparse.Namespace) -> int:
    from .files import read_text
    from .reader import perplexity, tokenize

    texts = {path: read_text(path) for path in args.files}  # validate every file before loading a model
    for name, value in (("--memory-size", args.memory_size), ("--segment", args.segment),
                        ("--max-tokens", args.max_tokens)):
        if value is not None and value <= 0:
            raise LongMemError(f"{name} must be a positive integer, not {value}")
    model = load_model(args, memory_size=args.memory_size, segment_length=args.segment)
    modes = ["memory", "no-memory", "backbone"] if args.compare else [
        "no-memory" if args.no_memory else "backbone" if args.backbone_only else "memory"]
    results = []
    for path, text in texts.items():
        ids = tokenize(model, text)[: args.max_tokens]
        for mode in modes:
            res = perplexity(model, ids, mode=mode, progress=sys.stderr.isatty() or not args.json)
            results.append({"file": str(path)} | res.to_dict())
            if not args.json:
                print(f"{path}  {mode:>9}  ppl {res.perplexity:8.3f}  tokens {res.tokens:>8}  "
                      f"{res.tokens_per_s:7.1f} tok/s")
    if args.json:
        main_rows = [r for r in results if r["mode"] == modes[0]]
        tokens = sum(r["tokens"] for r in main_rows)
        nll = sum(r["nll"] * r["tokens"] for r in main_rows) / tokens
        seconds = sum(r["seconds"] for r in main_rows)
        print(json.dumps({
            "mode": modes[0],
            "perplexity": math.exp(nll),
            "tokens": tokens,
            "tokens_per_s": sum(r["tokens"] for r in main_rows) / seconds,
            "results": results,
            "config": model.config.to_dict(),
        }))
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    from .data.books import prepare_books

    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    manifest = prepare_books(args.out, sources=sources)
    print(manifest)
    return 0


if __name__ == "__main__":
    sys.exit(main())
