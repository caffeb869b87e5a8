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
    ppl.add_argument("--foreign-memory", type=Path, metavar="OTHER",
                     help="control: also score with a memory holding OTHER text only (never written)")
    ppl.add_argument("--window", type=int, action="append", default=[], metavar="W",
                     help="also the backbone alone with a W-token sliding window, stride W/2 (repeatable)")
    ppl.add_argument("--memory-size", type=int, help="memory capacity in tokens (default 65536)")
    ppl.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    ppl.add_argument("--max-tokens", type=int, help="read at most this many tokens of each file")
    _model_args(ppl)
    ppl.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ppl.add_argument("--quiet", action="store_true", help="no progress bar")
    ppl.set_defaults(func=cmd_ppl)

    data = sub.add_parser("data", help="prepare corpora")
    data.add_argument("what", choices=["books", "folder", "hf"],
                      help="books: Austen, KJV Bible, Shakespeare; folder: your own .txt files (--src); "
                           "hf: a Hugging Face dataset (--dataset, needs internet and `datasets`)")
    data.add_argument("--src", type=Path, help="folder of UTF-8 .txt files (with 'folder')")
    data.add_argument("--dataset", help="Hugging Face dataset name (with 'hf')")
    data.add_argument("--hf-split", default="train", help="dataset split (with 'hf')")
    data.add_argument("--text-field", default="text", help="record field holding the text (with 'hf')")
    data.add_argument("--limit", type=int, help="at most this many records (with 'hf')")
    data.add_argument("--out", type=Path, default=Path("data/books"), help="output directory")
    data.add_argument("--sources", default="austen,kjv,shakespeare", help="comma-separated sources")
    data.add_argument("--backbone", default=DEFAULT_BACKBONE, help="tokenizer used for the token counts")
    data.set_defaults(func=cmd_data)

    probe = sub.add_parser("probe", help="retrieval quality: share of the backbone's attention that retrieval finds")
    probe.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files")
    probe.add_argument("--window", type=int, default=4096, help="tokens read per window (<= native context)")
    probe.add_argument("--windows", type=int, default=4, help="windows per file, evenly spaced")
    probe.add_argument("--retrieval-heads", choices=["query", "kv"], help="who searches the memory")
    probe.add_argument("--chunk-size", type=int, help="memory chunk size")
    probe.add_argument("--sink-tokens", type=int, help="first tokens of each segment kept out of memory")
    probe.add_argument("--search-positions", choices=["none", "absolute"], help="position-aware chunk search")
    probe.add_argument("--segment", type=int, help="segment length T")
    _model_args(probe)
    probe.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    probe.set_defaults(func=cmd_probe)

    train = sub.add_parser("train", help="memory-augmented adaptation of a SideNet")
    train.add_argument("config", nargs="?", type=Path, help="run file (.json/.yaml); defaults if omitted")
    train.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                       help="override a setting, e.g. --set steps=500 --set model.memory_size=16384")
    train.add_argument("--resume", action="store_true", help="continue from the run's latest checkpoint")
    train.set_defaults(func=cmd_train)

    from .evals.cli import add_eval_parser

    add_eval_parser(sub, _model_args)
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
    from .reader import perplexity, read, sliding_window_perplexity, tokenize

    texts = {path: read_text(path) for path in args.files}  # validate every file before loading a model
    foreign_text = read_text(args.foreign_memory) if args.foreign_memory else None
    for name, value in (("--memory-size", args.memory_size), ("--segment", args.segment),
                        ("--max-tokens", args.max_tokens)):
        if value is not None and value <= 0:
            raise LongMemError(f"{name} must be a positive integer, not {value}")
    model = load_model(args, memory_size=args.memory_size, segment_length=args.segment)
    modes = ["memory", "no-memory", "backbone"] if args.compare else [
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


def cmd_data(args: argparse.Namespace) -> int:
    from .backbone import load_tokenizer
    from .data.books import load_text_folder, prepare_books, write_corpus

    tokenizer = load_tokenizer(args.backbone)

    def count(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    if args.what == "folder":
        if args.src is None:
            raise LongMemError("'longmem data folder' needs --src DIR")
        manifest = write_corpus(load_text_folder(args.src), args.out, tokenizer=count)
    elif args.what == "hf":
        from .data.hub import load_hf_dataset

        if not args.dataset:
            raise LongMemError("'longmem data hf' needs --dataset NAME")
        docs = load_hf_dataset(args.dataset, args.hf_split, args.text_field, args.limit)
        manifest = write_corpus(docs, args.out, tokenizer=count)
    else:
        sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
        manifest = prepare_books(args.out, sources=sources, tokenizer=count)
    print(manifest)
    return 0


def cmd_probe(args: argparse.Namespace) -> int:
    from .files import read_text
    from .probe import retrieval_quality
    from .reader import tokenize

    texts = {path: read_text(path) for path in args.files}
    model = load_model(args, retrieval_heads=args.retrieval_heads, chunk_size=args.chunk_size,
                       sink_tokens=args.sink_tokens, segment_length=args.segment,
                       search_positions=args.search_positions)
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


def cmd_train(args: argparse.Namespace) -> int:
    from .train import run
    from .train_config import load_train_config

    config = load_train_config(args.config, args.set)
    result = run(config, resume=args.resume, progress=True)
    print(json.dumps({"output_dir": config.output_dir, "validation": result}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
