"""LongMem's cost against what users do today, and how it grows with the length of the text.

Two measurements, each in one run on this machine:

  * side-by-side (``--windows``): on the same held-out text (default: the first 65,536
    tokens of Emma), LongMem reading with its memory (1024-token segments, shipped SideNet,
    memory filling as it reads) against the frozen backbone with a sliding window of 2k,
    4k and 8k tokens (stride 1k, every token scored once) and the backbone on the same
    1024-token segments: perplexity and seconds. Goal: LongMem at least as good as the best
    sliding window at a fraction of its time.
  * growth (``--growth``): LongMem reads a long token stream (the books, test split first)
    segment by segment and the cumulative time is taken at 4k, 16k, 64k, 256k ... tokens.
    Linear cost = constant seconds per token across the checkpoints once the memory
    (FIFO, --memory-size tokens) is full; ``--remember`` also times reading into a named
    memory on disk whose size grows with the text (no eviction), up to the largest size.

Run:  python bench/cost.py                                   # side by side + growth to 262,144
      python bench/cost.py --growth 4096,16384,65536,262144,1048576 --remember   # to 1M (about 1 h)
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from core import write_report
from longmem.files import read_text
from longmem.model.longmem import LongMemModel
from longmem.inference.reader import perplexity, sliding_window_perplexity, tokenize

TEXT = Path("data/books/test/austen-emma.txt")
BOOKS = Path("data/books")


def stream(model: LongMemModel, n: int) -> torch.Tensor:
    """The first n tokens of the books (test split first, then the others) -> ids [n]."""
    files = sorted((BOOKS / "test").glob("*.txt")) + sorted((BOOKS / "validation").glob("*.txt")) + \
        sorted((BOOKS / "train").glob("*.txt"))
    parts, total = [], 0
    for path in files:
        ids = tokenize(model, read_text(path))
        parts.append(ids)
        total += ids.shape[0]
        if total >= n:
            break
    ids = torch.cat(parts)
    if ids.shape[0] < n:
        raise SystemExit(f"the books hold only {ids.shape[0]} tokens, fewer than {n}")
    return ids[:n]


@torch.no_grad()
def side_by_side(model: LongMemModel, ids: torch.Tensor, windows: list[int], stride: int) -> dict:
    rows = {}
    for mode in ("memory", "no-memory", "backbone"):
        res = perplexity(model, ids, mode=mode, progress=True)
        rows[mode] = {"perplexity": res.perplexity, "seconds": res.seconds, "tokens_per_s": res.tokens_per_s}
        print(mode, rows[mode], flush=True)
    for w in windows:
        res = sliding_window_perplexity(model, ids, w, stride, progress=True)
        rows[f"window-{w}"] = {"perplexity": res.perplexity, "seconds": res.seconds,
                               "tokens_per_s": res.tokens_per_s}
        print(f"window-{w}", rows[f"window-{w}"], flush=True)
    longmem = rows["memory"]
    for name, row in rows.items():
        row["seconds_over_longmem"] = row["seconds"] / longmem["seconds"]
    best = min((r for n, r in rows.items() if n.startswith("window-")), key=lambda r: r["perplexity"], default=None)
    summary = {}
    if best is not None:
        summary = {"longmem_perplexity_over_best_window": longmem["perplexity"] / best["perplexity"],
                   "longmem_seconds_over_best_window": longmem["seconds"] / best["seconds"]}
    return {"tokens": int(ids.shape[0]), "stride": stride, "rows": rows, "summary": summary}


@torch.no_grad()
def growth(model: LongMemModel, ids: torch.Tensor, sizes: list[int]) -> dict:
    """Cumulative seconds of LongMem reading (forward + memory write) at each checkpoint."""
    t = model.config.segment_length
    memory = model.new_memory(1)
    points, elapsed, done = [], 0.0, 0
    model.eval()
    for a in range(0, ids.shape[0], t):
        seg = ids[a : a + t][None, :]
        start = time.perf_counter()
        model.write_memory(memory, model(seg, memory=memory))
        elapsed += time.perf_counter() - start
        done += seg.shape[1]
        if done in sizes:
            points.append({"tokens": done, "seconds": elapsed, "seconds_per_1k_tokens": 1000 * elapsed / done,
                           "memory_tokens": int(memory.num_tokens(0))})
            print("growth", points[-1], flush=True)
    return {"memory_size": model.config.memory_size, "points": points}


@torch.no_grad()
def remember_growth(model: LongMemModel, ids: torch.Tensor, sizes: list[int]) -> dict:
    """Cumulative seconds of reading into a named memory on disk that keeps every token."""
    from longmem.memory.io.named import NamedMemory
    from longmem.inference.session import _remember

    points, elapsed = [], 0.0
    with tempfile.TemporaryDirectory() as root:
        store = NamedMemory(Path(root) / "growth")
        for a, b in zip([0] + sizes[:-1], sizes):
            _, seconds = _remember(model, store, ids[a:b], f"{a}-{b}", None, capacity_tokens=sizes[-1])
            elapsed += seconds
            points.append({"tokens": b, "seconds": elapsed, "seconds_per_1k_tokens": 1000 * elapsed / b,
                           "disk_bytes": sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())})
            print("remember", points[-1], flush=True)
    return {"points": points}


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    rows = report.get("side_by_side", {}).get("rows", {})
    for name, row in rows.items():
        left.scatter(row["seconds"], row["perplexity"])
        left.annotate(name, (row["seconds"], row["perplexity"]), fontsize=8)
    left.set_xlabel("seconds")
    left.set_ylabel("perplexity")
    left.set_title(f"{report.get('side_by_side', {}).get('tokens', 0)} held-out tokens")
    for name in ("growth", "remember"):
        pts = report.get(name, {}).get("points", [])
        if pts:
            right.loglog([p["tokens"] for p in pts], [p["seconds"] for p in pts], "o-", label=name)
    right.set_xlabel("tokens read")
    right.set_ylabel("cumulative seconds")
    right.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--tokens", type=int, default=65536, help="side by side: first N tokens of --text")
    parser.add_argument("--windows", default="2048,4096,8192", help="sliding windows ('' to skip side by side)")
    parser.add_argument("--stride", type=int, default=1024)
    parser.add_argument("--growth", default="4096,16384,65536,262144", help="checkpoints ('' to skip)")
    parser.add_argument("--remember", action="store_true", help="also time reading into a named memory")
    parser.add_argument("--sidenet", default="default")
    parser.add_argument("--out", type=Path, default=Path("bench/results/cost.json"))
    args = parser.parse_args()
    model = LongMemModel.from_pretrained(args.sidenet, dtype="bfloat16")
    report: dict = {}
    if args.windows:
        ids = tokenize(model, read_text(args.text))[: args.tokens]
        windows = [int(w) for w in args.windows.split(",")]
        report["side_by_side"] = side_by_side(model, ids, windows, args.stride) | {"text": str(args.text)}
    if args.growth:
        sizes = sorted(int(s) for s in args.growth.split(","))
        if any(s % model.config.segment_length for s in sizes):
            raise SystemExit(f"growth checkpoints must be multiples of {model.config.segment_length}")
        ids = stream(model, sizes[-1])
        report["growth"] = growth(model, ids, sizes)
        if args.remember:
            report["remember"] = remember_growth(model, ids, sizes)
    write_report(args, "cost", {
        "command": "python bench/cost.py " + shlex.join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads()},
        "config": model.config.to_dict(),
    } | report)
    plot(report, args.out.with_suffix(".png"))
    print(json.dumps(report.get("side_by_side", {}).get("summary", {})))


if __name__ == "__main__":
    main()
