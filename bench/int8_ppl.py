"""int8 memory storage against bf16: perplexity on the held-out books, and bytes per cached token.

The same model (shipped SideNet, SmolLM2, bf16 compute) reads each text segment by
segment with its memory filling as it reads, once with the chunk bank's keys/values
stored in bf16 and once in int8 (one bf16 scale per token and head, dequantised on
retrieval; chunk search keys and the short-term tier stay bf16). Target: < 0.5% change.

Run:  python bench/int8_ppl.py [--tokens 24576] [--texts data/books/test/austen-persuasion.txt ...]
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
from pathlib import Path

import torch

from core import write_report
from longmem.files import read_text
from longmem.memory import MemoryBank
from longmem.model.longmem import LongMemModel
from longmem.inference.reader import perplexity, tokenize

TEXTS = [Path("data/books/test/austen-persuasion.txt"), Path("data/books/test/austen-emma.txt")]


def new_memory(model: LongMemModel, storage: str) -> MemoryBank:
    """The model's usual empty memory, its chunk bank stored as ``storage``."""
    bank = model.new_memory(1)
    if storage == bank.dtype_name:
        return bank
    return MemoryBank(1, bank.num_kv_heads, bank.head_dim, bank.capacity * bank.chunk_size, bank.chunk_size,
                      dtype=storage, index=bank.index_config, meta=bank.meta, recent=bank.recent)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--texts", type=Path, nargs="+", default=TEXTS)
    parser.add_argument("--tokens", type=int, default=24576, help="first N tokens of each text")
    parser.add_argument("--storage", default="bfloat16,int8", help="storage dtypes; the first is the reference")
    parser.add_argument("--sidenet", default="default")
    parser.add_argument("--backbone", help="with --sidenet fresh: another backbone (e.g. a small test model)")
    parser.add_argument("--segment", type=int, help="segment length T (default: the model's, 1024)")
    parser.add_argument("--out", type=Path, default=Path("bench/results/int8_ppl.json"))
    args = parser.parse_args()
    texts = {path: read_text(path) for path in args.texts}  # every file checked before the model loads
    overrides = {"segment_length": args.segment} if args.segment else {}
    model = LongMemModel.from_pretrained(args.sidenet, backbone=args.backbone, dtype="bfloat16", **overrides)
    storages = args.storage.split(",")
    results, raw = {}, 2 * model.backbone.attn_shape.num_kv_heads * model.backbone.attn_shape.head_dim * 2
    for path, text in texts.items():
        ids = tokenize(model, text)[: args.tokens]
        row = results[path.stem] = {"tokens": int(ids.shape[0])}
        for storage in storages:
            torch.manual_seed(0)
            memory = new_memory(model, storage)
            res = perplexity(model, ids, mode="memory", memory=memory)
            bank_bytes = memory.nbytes() - memory.recent_nbytes()
            row[storage] = {"perplexity": res.perplexity, "tokens_per_s": res.tokens_per_s,
                            "bytes_per_token": bank_bytes / (memory.capacity * memory.chunk_size),
                            "bytes_over_raw_fp16": bank_bytes / (memory.capacity * memory.chunk_size) / raw}
            print(path.stem, storage, row[storage], flush=True)
        ref = row[storages[0]]["perplexity"]
        row["relative_change"] = {s: row[s]["perplexity"] / ref - 1 for s in storages[1:]}
    write_report(args, "int8_ppl", {
        "command": "python bench/int8_ppl.py " + shlex.join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "targets": {"relative_change": 0.005},
        "config": model.config.to_dict(),
        "results": results,
    })


if __name__ == "__main__":
    main()
