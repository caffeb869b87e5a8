"""The ``longmem`` command: a thin layer over the library; every verb calls one function."""

from __future__ import annotations

import argparse
import logging
import sys

from longmem.cli import data, demo, evals, memory, read, serve, train
from longmem.errors import LongMemError

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

    for group in (demo, read, data, train, memory, serve, evals):
        group.add_parsers(sub)
    return parser
