"""Core cost benchmark: one LongMem segment against the backbone alone, full memory.

On SmolLM2 (bf16) with a full 65,536-token memory and 1024-token segments, measured in
one run (ratios, so machine noise largely cancels):
  * LongMem segment time (forward + memory write) / backbone-alone forward time
  * the share of the segment spent in chunk search, and in the whole retrieval
    (search + gathering the K retrieved keys/values)
  * bytes of memory per cached token / raw fp16 keys+values of the memory layer

The short-term tier (every layer's K/V of the previous segment) is a fixed cost per
sequence, reported apart from the per-token bytes of the bank.

Run:  python bench/core.py [--text FILE] [--repeats 5] [--sidenet default] [--out bench/results/core.json]
(the default text is a training book from `longmem data books`).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from longmem.errors import LongMemError
from longmem.evals.results import git_commit
from longmem.model.longmem import LongMemModel
from longmem.inference.reader import tokenize
from longmem.train.config import parse_set

git_commit()  # read when a bench starts: its report names the code it ran (memoised)

DEFAULT_TEXT = Path("data/books/train/austen-mansfieldpark.txt")


class Timer:
    """Accumulates wall time of wrapped calls."""

    def __init__(self):
        self.total = 0.0

    def wrap(self, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.total += time.perf_counter() - start
        return timed


@contextmanager
def patched(obj, name, timer):
    original = getattr(obj, name)
    setattr(obj, name, timer.wrap(original))
    try:
        yield
    finally:
        setattr(obj, name, original)


def fill(model: LongMemModel, ids: torch.Tensor, memory_size: int, t: int):
    """Fill a bank to capacity with the backbone's own K/V of real text (and a copy head's token log)."""
    mem = model.new_memory(1)
    pos = 0
    while mem.num_tokens() < memory_size:
        seg = ids[pos % (ids.numel() - t) :][:t][None, :]
        out = model.backbone(seg)
        positions = torch.arange(pos, pos + t)[None, :]
        mem.write(out.mem_keys, out.mem_values, positions)
        if mem.token_log is not None:  # the copy head matches against everything read
            mem.token_log.note(seg, positions, keys=model.match_keys(out.hidden))
        pos += t
    return mem, pos


@torch.no_grad()
def measure(model: LongMemModel, ids: torch.Tensor, repeats: int, t: int) -> dict:
    mem, pos = fill(model, ids, model.config.memory_size, t)
    warm = 2  # two segments read through the model first: a short-term tier is full from then on, as when
    # reading a book (the bank alone is filled above), and the first pass warms up
    segs = [ids[pos + i * t : pos + (i + 1) * t][None, :] for i in range(repeats + warm)]
    search, retrieve = Timer(), Timer()
    longmem_s, backbone_s = [], []
    with patched(mem.index, "search", search), patched(mem, "retrieve", retrieve):
        for i, seg in enumerate(segs):
            search.total = retrieve.total = 0.0
            start = time.perf_counter()
            out = model(seg, memory=mem)
            model.write_memory(mem, out)
            seg_time = time.perf_counter() - start
            start = time.perf_counter()
            model.backbone.model(seg)  # the HF model alone, with its LM head
            base_time = time.perf_counter() - start
            if i >= warm:
                longmem_s.append((seg_time, search.total, retrieve.total))
                backbone_s.append(base_time)
    seg_med = statistics.median(x[0] for x in longmem_s)
    base_med = statistics.median(backbone_s)
    raw = 2 * model.backbone.attn_shape.num_kv_heads * model.backbone.attn_shape.head_dim * 2
    bank_bytes = mem.nbytes() - mem.recent_nbytes()  # the short-term tier is a fixed cost, reported apart
    return {
        "longmem_segment_s": seg_med,
        "backbone_forward_s": base_med,
        "segment_over_backbone": seg_med / base_med,
        "search_s": statistics.median(x[1] for x in longmem_s),
        "retrieve_s": statistics.median(x[2] for x in longmem_s),
        "search_share": statistics.median(x[1] / x[0] for x in longmem_s),
        "retrieve_share": statistics.median(x[2] / x[0] for x in longmem_s),
        "memory_tokens": mem.num_tokens(),
        "bytes_per_token": bank_bytes / (mem.capacity * mem.chunk_size),
        "raw_fp16_kv_bytes_per_token": raw,
        "bytes_over_raw": bank_bytes / (mem.capacity * mem.chunk_size) / raw,
        "short_term_tier_bytes": mem.recent_nbytes(),
        "short_term_tokens": model.recent_tokens,
    }


def add_set_argument(parser: argparse.ArgumentParser) -> None:
    """--set KEY=VALUE (repeatable): an architecture setting of a fresh SideNet."""
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --sidenet fresh: an architecture setting, e.g. --set recent_tokens=0 "
                             "--set copy_head=false --set copy_gate=false (no short-term tier, no copy head)")


def architecture_overrides(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict:
    """The --set settings as from_pretrained overrides (a usage error, exit 2, if malformed or not fresh)."""
    try:  # the trainer's --set syntax (values read as JSON, else strings)
        overrides = {".".join(keys): value for keys, value in map(parse_set, args.set)}
    except LongMemError as exc:
        parser.error(str(exc))
    if overrides and args.sidenet != "fresh":
        parser.error("--set changes the architecture: it needs --sidenet fresh")
    return overrides


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--memory-size", type=int, default=65536)
    parser.add_argument("--segment", type=int, default=1024)
    parser.add_argument("--variants", default="torch,faiss", help="chunk-search backends, comma-separated")
    parser.add_argument("--sidenet", default="default", help="SideNet directory, 'default' (shipped) or 'fresh'")
    add_set_argument(parser)
    parser.add_argument("--out", type=Path, default=Path("bench/results/core.json"))
    args = parser.parse_args()
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    overrides = architecture_overrides(parser, args)
    model = LongMemModel.from_pretrained(args.sidenet, dtype="bfloat16", memory_size=args.memory_size,
                                         segment_length=args.segment, **overrides)
    ids = tokenize(model, args.text.read_text(encoding="utf-8"))
    results = {}
    for variant in args.variants.split(","):
        model.config.retrieval = variant
        results[variant] = measure(model, ids, args.repeats, args.segment)
        print(variant, json.dumps(results[variant], indent=1), flush=True)
    write_report(args, "core", {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                    "threads_at_end": torch.get_num_threads()},
        "backbone": model.config.backbone,
        "dtype": "bfloat16",
        "targets": {"segment_over_backbone": 1.6, "search_share": 0.10, "bytes_over_raw": 1.3},
        "config": model.config.to_dict(),
        "results": results,
    })


def write_report(args: argparse.Namespace, name: str, body: dict) -> None:
    """Write a benchmark's JSON with the command that reproduces it and the commit."""
    report = {
        "benchmark": name,
        "command": f"python bench/{name}.py " + " ".join(
            f"--{k.replace('_', '-')} {x}" for k, v in vars(args).items()
            for x in (v if isinstance(v, list) else [v])),
        "commit": git_commit(),  # '+dirty' when measured with local changes
    } | body
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")

if __name__ == "__main__":
    main()
