"""The ``longmem`` command: a thin layer over the library; every verb calls one function."""

from __future__ import annotations

import argparse
import json
import math
import logging
import sys
from pathlib import Path

from .config import DEFAULT_BACKBONE, RETRIEVAL_BACKENDS
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
    mode.add_argument("--compare", action="store_true", help="memory, empty memory, backbone (and the short-term tier alone) side by side")
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
    ppl.add_argument("--plot", type=Path, metavar="PNG", help="also draw each mode's loss by distance from the start")
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
    _session_parsers(sub)

    from .evals.cli import add_eval_parser

    add_eval_parser(sub, _model_args)
    return parser


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--sidenet", default="default",
                   help="trained SideNet directory; 'default' (the SideNet shipped for the built-in backbone) "
                        "or 'fresh' (a new identity SideNet)")
    p.add_argument("--backbone", help=f"backbone name, HF id, directory or .gguf (default {DEFAULT_BACKBONE})")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"], help="compute dtype")
    p.add_argument("--retrieval", choices=list(RETRIEVAL_BACKENDS),
                   help="chunk search: torch/faiss exact; torch-ivf, ivf, hnsw approximate")
    p.add_argument("--nprobe", type=int,
                   help="torch-ivf/ivf: lists probed per query (default 32; 48 for recall >= 0.95 at 1M tokens)")
    p.add_argument("--memory-dtype", choices=["bfloat16", "float16", "float32", "int8"],
                   help="storage of cached keys/values (default bfloat16; int8: per-token scales)")


def load_model(args: argparse.Namespace, **overrides):
    """The LongMemModel the CLI flags describe."""
    from .model import LongMemModel

    overrides = {k: v for k, v in overrides.items() if v is not None}
    if args.retrieval:
        overrides["retrieval"] = args.retrieval
    if getattr(args, "nprobe", None) is not None:
        overrides["retrieval_nprobe"] = args.nprobe
    if getattr(args, "memory_dtype", None):
        overrides["memory_dtype"] = args.memory_dtype
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
        from .plots import position_loss

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


# ---------------------------------------------------------------- remember, generate, serve
def _session_parsers(sub) -> None:
    remember = sub.add_parser("remember", help="read texts into a named memory kept on disk (append-only)")
    remember.add_argument("name", metavar="NAME", help="memory name (letters, digits, '.', '_', '-')")
    remember.add_argument("files", nargs="+", type=Path, metavar="FILE", help="UTF-8 text files")
    remember.add_argument("--memory-size", type=int, help="capacity of a new memory in tokens (default 65536)")
    remember.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    _memory_dir_arg(remember)
    _model_args(remember)
    remember.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    remember.set_defaults(func=cmd_remember)

    memories = sub.add_parser("memories", help="list named memories: sizes, token counts, backbone")
    _memory_dir_arg(memories)
    memories.add_argument("--json", action="store_true", help="print a JSON list on stdout")
    memories.set_defaults(func=cmd_memories)

    forget = sub.add_parser("forget", help="delete a named memory")
    forget.add_argument("name", metavar="NAME")
    _memory_dir_arg(forget)
    forget.set_defaults(func=cmd_forget)

    gen = sub.add_parser("generate", help="stream text generated after a prompt, with a named memory")
    gen.add_argument("prompt", help="the prompt text")
    gen.add_argument("--memory", metavar="NAME", help="named memory to read (default: none, empty memory)")
    _memory_dir_arg(gen)
    gen.add_argument("--max-tokens", type=int, default=128, help="most tokens to generate (default 128)")
    gen.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (default 0 = greedy)")
    gen.add_argument("--greedy", action="store_true", help="always the most likely token (temperature 0)")
    gen.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    gen.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string (repeatable)")
    gen.add_argument("--seed", type=int, help="sampler seed")
    gen.add_argument("--window", type=int, help="local window in tokens (default: the segment length)")
    gen.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    _model_args(gen)
    gen.add_argument("--json", action="store_true", help="print one JSON object at the end instead of streaming")
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="HTTP service: sessions with their own memories, streamed generation")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port)")
    serve.add_argument("--token", help="bearer token clients must send (default: $LONGMEM_TOKEN); "
                                       "required to bind anything but loopback")
    serve.add_argument("--max-request-bytes", type=int, default=8 << 20, help="largest request body (default 8 MiB)")
    serve.add_argument("--memory-size", type=int, help="capacity of new sessions' memories in tokens (default 65536)")
    serve.add_argument("--segment", type=int, help="segment length T in tokens (default 1024)")
    _memory_dir_arg(serve)
    _model_args(serve)
    serve.set_defaults(func=cmd_serve)


def _memory_dir_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--memory-dir", type=Path, help="where named memories live (default $LONGMEM_HOME/memories)")


def cmd_remember(args: argparse.Namespace) -> int:
    from .files import read_text
    from .memory.named import check_name
    from .session import remember

    check_name(args.name)
    texts = [(path, read_text(path)) for path in args.files]  # validate every file before loading a model
    _positive_args(args, "memory_size", "segment")
    model = load_model(args, segment_length=args.segment)
    results = []
    for path, text in texts:
        res = remember(model, args.name, text, source=path.name, root=args.memory_dir,
                       capacity_tokens=args.memory_size)
        results.append(res.to_dict())
        if not args.json:
            print(f"{args.name}: read {res.tokens} tokens of {path} ({res.tokens_per_s:.0f} tok/s); "
                  f"memory holds {res.memory.tokens} tokens")
    if args.json:
        print(json.dumps({"name": args.name, "results": results}))
    return 0


def cmd_memories(args: argparse.Namespace) -> int:
    from .session import list_memories

    rows = [m.to_dict() for m in list_memories(args.memory_dir)]
    if args.json:
        print(json.dumps(rows))
        return 0
    print(f"{'name':<24} {'tokens':>10} {'read':>10} {'capacity':>10} {'MB':>8}  backbone")
    for m in rows:
        print(f"{m['name']:<24} {m['tokens']:>10} {m['tokens_read']:>10} {m['capacity_tokens']:>10} "
              f"{m['bytes'] / 1e6:>8.1f}  {m['backbone']}")
    return 0


def cmd_forget(args: argparse.Namespace) -> int:
    from .session import forget

    forget(args.name, args.memory_dir)
    print(f"forgot {args.name}")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .generate import GenerationConfig, stream
    from .session import load_named

    config = GenerationConfig(max_new_tokens=args.max_tokens, temperature=0.0 if args.greedy else args.temperature,
                              top_p=args.top_p, stop=args.stop, seed=args.seed, window=args.window)
    if args.memory:
        from .memory.named import check_name

        check_name(args.memory)
    _positive_args(args, "segment")
    model = load_model(args, segment_length=args.segment)
    memory = load_named(model, args.memory, args.memory_dir)[0] if args.memory else None
    pieces = stream(model, args.prompt, memory, config)
    for piece in pieces:
        if not args.json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    result = pieces.result
    if args.json:
        print(json.dumps(result.to_dict() | {"memory": args.memory}))
    else:
        sys.stdout.write("\n")
        print(f"[{result.tokens} tokens, {result.tokens_per_s:.1f} tok/s, stop: {result.finish_reason}]",
              file=sys.stderr)
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from .serve import ServeConfig, serve

    config = ServeConfig(host=args.host, port=args.port, token=args.token, memory_dir=args.memory_dir,
                         max_request_bytes=args.max_request_bytes)
    config.check()  # refuse a bad address or token before loading a model
    _positive_args(args, "memory_size", "segment")
    serve(load_model(args, memory_size=args.memory_size, segment_length=args.segment), config)
    return 0


def _positive_args(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        value = getattr(args, name)
        if value is not None and value <= 0:
            raise LongMemError(f"--{name.replace('_', '-')} must be a positive integer, not {value}")


if __name__ == "__main__":
    sys.exit(main())
