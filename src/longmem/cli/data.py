"""``longmem data``: prepare corpora."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from longmem.config import DEFAULT_BACKBONE
from longmem.errors import LongMemError


def add_parsers(sub) -> None:
    data = sub.add_parser("data", help="prepare corpora")
    data.add_argument("what", choices=["books", "heldout", "folder", "hf", "icl"],
                      help="books: Austen, KJV Bible, Shakespeare; heldout: 4 long texts of other authors and "
                           "kinds, never trained on (Melville, Taft, the Jargon File, Milton); "
                           "folder: your own .txt files (--src); "
                           "hf: a Hugging Face dataset (--dataset, needs internet and `datasets`); "
                           "icl: two classification tasks no training touches (npm: IMDB reviews, SpamAssassin)")
    data.add_argument("--src", type=Path, help="folder of UTF-8 .txt files (with 'folder')")
    data.add_argument("--dataset", help="Hugging Face dataset name (with 'hf')")
    data.add_argument("--hf-split", default="train", help="dataset split (with 'hf')")
    data.add_argument("--text-field", default="text", help="record field holding the text (with 'hf')")
    data.add_argument("--limit", type=int, help="at most this many records (with 'hf')")
    data.add_argument("--out", type=Path,
                      help="output directory (default data/books; heldout: data/heldout; icl: data/icl-untouched)")
    data.add_argument("--sources", help="comma-separated sources (books: austen,kjv,shakespeare by default, and "
                                        "doyle,twain,newton,lcet10,henry on request; heldout: "
                                        "moby-dick,taft,jargon,paradise-lost, all by default)")
    data.add_argument("--backbone", default=DEFAULT_BACKBONE, help="tokenizer used for the token counts")
    data.set_defaults(func=cmd_data)


def cmd_data(args: argparse.Namespace) -> int:
    sources = [s.strip() for s in args.sources.split(",") if s.strip()] if args.sources else None
    if args.what == "icl":
        from longmem.data.icl_sets import prepare_icl

        print(json.dumps(prepare_icl(args.out or Path("data/icl-untouched")), indent=1))
        return 0
    from longmem.model.hub import load_tokenizer
    from longmem.data.books import load_text_folder, prepare_books, write_corpus
    from longmem.data.tokens import document_ids

    tokenizer = load_tokenizer(args.backbone)

    def count(text: str) -> list[int]:
        return document_ids(tokenizer, text)

    if args.what == "heldout":
        import tempfile

        from longmem.data.heldout import prepare_heldout

        with tempfile.TemporaryDirectory(prefix="longmem-heldout-") as work:
            print(prepare_heldout(args.out or Path("data/heldout"), Path(work), sources, tokenizer=count))
        return 0
    args.out = args.out or Path("data/books")
    if args.what == "folder":
        if args.src is None:
            raise LongMemError("'longmem data folder' needs --src DIR")
        manifest = write_corpus(load_text_folder(args.src), args.out, tokenizer=count)
    elif args.what == "hf":
        from longmem.data.hub import load_hf_dataset

        if not args.dataset:
            raise LongMemError("'longmem data hf' needs --dataset NAME")
        docs = load_hf_dataset(args.dataset, args.hf_split, args.text_field, args.limit)
        manifest = write_corpus(docs, args.out, tokenizer=count)
    else:
        from longmem.data.more_books import SOURCES as MORE

        manifest = prepare_books(args.out, sources=tuple(sources or ("austen", "kjv", "shakespeare")),
                                 tokenizer=count, extra=MORE)
    print(manifest)
    return 0

