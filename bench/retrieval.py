"""Retrieval at scale: time per segment and recall@K of every chunk-search backend, 16k..1M tokens.

For each memory size (default 16k, 65k, 262k and 1M tokens) and backend (exact torch,
exact faiss flat, faiss IVF at a few nprobe values, faiss HNSW), measured in one run:
  * retrieve_s: one segment's retrieval (chunk search + gathering the K entries) with the
    queries of a real 1024-token segment, median of --repeats
  * update_s: the index work of one segment's memory write once the memory is full
    (adding its chunks, evicting the oldest, and the amortised share of an HNSW rebuild
    or IVF retraining); fill_index_s: all index work while the memory filled
  * recall: share of the exact search's chunks (K = 64 tokens = 16 chunks per query and
    head) the backend finds; exact = the same bf16 chunk keys scored in fp32 (the default
    torch search scores in the bank's dtype, bf16, and so loses near-ties itself)
  * share: (retrieve_s + update_s) over a whole segment with that retrieval in place of
    the exact --exact-size (65k) one it was timed with. Targets at 1M tokens: recall >= 0.95, share <= 0.25.
Also bytes per cached token of every storage dtype and index (raw fp16 K/V for scale).

Keys are the real SmolLM2 memory-layer keys of the books (`longmem data books`), collected
once and cached under runs/ (see retrieval_keys.py); the segment time and the queries come
from one real LongMem segment (shipped SideNet) with an exact 65,536-token memory; chunk
size, K and who searches (every query head, or one per KV group) are the model's.
``--synthetic`` uses clustered random keys and queries of the same shape instead, and the
segment time of bench/results/core.json (or --segment-seconds): a quick run, no model.

Run:  python bench/retrieval.py [--sizes 16384,65536,262144,1048576] [--repeats 3]
      python bench/retrieval.py --synthetic --sizes 16384,65536 --repeats 1   (quick)
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

from core import Timer, patched, write_report
from longmem.memory import MemoryBank
from longmem.memory.search.exact import IndexConfig

BOOKS = [Path("data/books/train") / f"{name}.txt" for name in (
    "kjv-bible", "austen-mansfieldpark", "austen-prideprejudice", "austen-sensesensibility")]
STORAGE = ("float32", "bfloat16", "float16", "int8")


def variants(args: argparse.Namespace) -> dict[str, IndexConfig]:
    """Backend name -> index config, from --backends, --nprobe and --ef-search."""
    out = {}
    for kind in args.backends.split(","):
        if kind in ("ivf", "torch-ivf"):
            out |= {f"{kind}/nprobe={p}": IndexConfig(kind=kind, nprobe=int(p), nlist=args.nlist)
                    for p in args.nprobe.split(",")}
        elif kind == "hnsw":
            out |= {f"hnsw/ef={e}": IndexConfig(kind="hnsw", ef_search=int(e)) for e in args.ef_search.split(",")}
        else:
            out[kind] = IndexConfig(kind=kind)
    return out


def fill(chunk_keys: torch.Tensor, size: int, csz: int, adds: int, config: IndexConfig,
         dtype: str = "bfloat16") -> tuple[MemoryBank, float]:
    """A bank of ``size`` tokens holding the last chunk keys [Hkv,C,Dh], written ``adds`` chunks (a segment) at a time.

    Keys/values stay zero (their values do not change search or gather cost). Returns the
    bank and the seconds spent in its index (adding, training) while it filled.
    """
    h, c, d = chunk_keys.shape
    bank = MemoryBank(1, h, d, size, csz, dtype=dtype, index=config)
    timer = Timer()
    with patched(bank.index, "add", timer), patched(bank.index, "evict", timer):
        for a in range(c - size // csz, c, adds):
            write(bank, chunk_keys[:, a : a + adds], a)
    return bank, timer.total


def write(bank: MemoryBank, keys: torch.Tensor, first: int) -> None:
    """Append chunk keys [Hkv,n,Dh] (zero K/V) as chunks number first.. of the text."""
    h, n, d = keys.shape
    csz = bank.chunk_size
    zeros = torch.zeros(h, n, csz, d, dtype=keys.dtype)
    pos = (first + torch.arange(n))[:, None] * csz + torch.arange(csz)  # [n,csz]
    bank.append_chunks(0, zeros, zeros, pos, keys)


def steady_update(bank: MemoryBank, chunk_keys: torch.Tensor, adds: int, segments: int = 5) -> float:
    """Index seconds per segment once the memory is full: add + evict (median), plus amortised rebuilds.

    An HNSW graph is rebuilt every rebuild_dead * C evicted chunks, an IVF retrained every
    retrain_growth * C added chunks at most: each is timed once and spread over those segments.
    """
    index, config, c = bank.index, bank.index_config, bank.capacity
    end = int(bank.positions.max()) // bank.chunk_size + 1
    times = []
    for i in range(segments):
        timer = Timer()
        with patched(index, "add", timer), patched(index, "evict", timer):
            write(bank, chunk_keys[:, i * adds : (i + 1) * adds], end + i * adds)
        times.append(timer.total)
    per_segment = statistics.median(times)
    rebuild = {"hnsw": ("rebuild", config.rebuild_dead), "ivf": ("train", config.retrain_growth),
               "torch-ivf": ("train", config.retrain_growth)}.get(config.kind)
    if rebuild and rebuild[1]:
        start = time.perf_counter()
        getattr(index, rebuild[0])(0)
        per_segment += (time.perf_counter() - start) / max(1.0, rebuild[1] * c / adds)
    return per_segment


def measure(bank: MemoryBank, queries: torch.Tensor, k_chunks: int, repeats: int) -> dict:
    """Median retrieve and search seconds; the last result's chunk slots and mask."""
    search = Timer()
    rows = []
    with patched(bank.index, "search", search):
        for i in range(repeats + 1):
            search.total = 0.0
            start = time.perf_counter()
            found = bank.retrieve(queries, k_chunks)
            if i or not repeats:  # the first one warms up
                rows.append((time.perf_counter() - start, search.total))
    return {"retrieve_s": statistics.median(r[0] for r in rows), "search_s": statistics.median(r[1] for r in rows),
            "slots": found.chunk_slots, "valid": found.mask[..., :: bank.chunk_size]}


def recall(found: dict, exact: dict) -> float:
    """Mean share of the exact valid chunks [...,n] found (per query and head)."""
    hit = (found["slots"][..., :, None] == exact["slots"][..., None, :]) & found["valid"][..., :, None]
    hit = hit.any(-2) & exact["valid"]  # [...,n] exact chunk found
    return float(hit.sum() / exact["valid"].sum())


def storage_bytes(h: int, d: int, csz: int, configs: dict[str, IndexConfig], tokens: int = 65536) -> dict:
    """Bytes per cached token: every storage dtype (exact index), and every index's own share."""
    raw = 2 * h * d * 2
    out = {"raw_fp16_kv": raw, "storage": {}, "index": {}}
    for dtype in STORAGE:
        bank = MemoryBank(1, h, d, tokens, csz, dtype=dtype)
        out["storage"][dtype] = {"bytes_per_token": bank.nbytes() / tokens, "over_raw": bank.nbytes() / tokens / raw}
    for name, config in configs.items():
        bank = MemoryBank(1, h, d, tokens, csz, dtype="bfloat16", index=config)
        out["index"][name] = {"index_bytes_per_token": bank.index.nbytes() / tokens,
                              "bank_over_raw": bank.nbytes() / tokens / raw}
    return out


def synthetic(args: argparse.Namespace, h: int = 3, hq: int = 9, d: int = 64, t: int = 1024):
    """Clustered random chunk keys [Hkv,C,Dh] and queries [1,Hq,T,Dh] shaped like SmolLM2's."""
    g = torch.Generator().manual_seed(0)
    chunks = max(args.sizes) // args.chunk_size
    centers = torch.randn(h, 256, d, generator=g) * 2
    pick = torch.randint(0, 256, (h, chunks), generator=g)
    keys = centers.gather(1, pick[..., None].expand(h, chunks, d)) + torch.randn(h, chunks, d, generator=g)
    n = hq // h * t  # queries per KV head
    qpick = torch.randint(0, 256, (h, n), generator=g)
    queries = centers.gather(1, qpick[..., None].expand(h, n, d)) + torch.randn(h, n, d, generator=g)
    return keys.bfloat16(), queries.view(1, hq, t, d), {"segment_s": segment_seconds(args), "retrieve_s": 0.0,
                                                         "calls": 1, "source": "synthetic"}


def segment_seconds(args: argparse.Namespace) -> float:
    """A LongMem segment's time without its retrieval: --segment-seconds or bench/results/core.json."""
    if args.segment_seconds:
        return args.segment_seconds
    core = Path("bench/results/core.json")
    if not core.is_file():
        raise SystemExit("--synthetic needs --segment-seconds (or bench/results/core.json)")
    row = next(iter(json.loads(core.read_text())["results"].values()))
    return row["longmem_segment_s"] - row["retrieve_s"]


def books(args: argparse.Namespace):
    """Real keys, queries and segment time (see retrieval_keys.py)."""
    from longmem.model.longmem import LongMemModel
    from retrieval_keys import collect, time_segment

    overrides = {"segment_length": args.segment} if args.segment else {}
    model = LongMemModel.from_pretrained(args.sidenet, backbone=args.backbone, dtype="bfloat16",
                                         memory_size=args.exact_size, **overrides)
    args.chunk_size, args.topk, args.segment = model.config.chunk_size, model.config.topk, model.config.segment_length
    keys = collect(model, args.texts, max(args.sizes), args.exact_size, args.cache)
    seg = time_segment(model, keys, args.repeats)
    other = seg.segment_s - seg.retrieve_s  # the segment without its (exact) retrieval
    info = {"segment_s": other, "measured_segment_s": seg.segment_s, "measured_retrieve_s": seg.retrieve_s,
            "calls": seg.calls, "source": "books", "sidenet": args.sidenet,
            "config": model.config.to_dict()}
    return keys.chunk_keys, seg.queries, info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="16384,65536,262144,1048576")
    parser.add_argument("--backends", default="torch,faiss,ivf,hnsw")
    parser.add_argument("--nprobe", default="16,64", help="IVF variants")
    parser.add_argument("--nlist", type=int, default=0, help="IVF lists (0: about sqrt of the chunks)")
    parser.add_argument("--ef-search", default="128", help="HNSW variants")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--synthetic", action="store_true", help="clustered random keys, no model")
    parser.add_argument("--segment-seconds", type=float, help="a segment's time without retrieval (synthetic)")
    parser.add_argument("--sidenet", default="default")
    parser.add_argument("--backbone", help="with --sidenet fresh: another backbone (e.g. a small test model)")
    parser.add_argument("--segment", type=int, help="segment length T (default: the model's, 1024)")
    parser.add_argument("--exact-size", type=int, default=65536, help="the exact memory the segment is timed with")
    parser.add_argument("--texts", type=Path, nargs="+", default=BOOKS)
    parser.add_argument("--chunk-size", type=int, default=4, help="synthetic (else the model's)")
    parser.add_argument("--topk", type=int, default=64, help="K retrieved tokens per query and head (synthetic)")
    parser.add_argument("--cache", type=Path, default=Path("runs/retrieval-keys"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/retrieval.json"))
    args = parser.parse_args()
    args.sizes = [int(s) for s in args.sizes.split(",")]
    configs = variants(args)
    threads = torch.get_num_threads()
    chunk_keys, queries, segment = synthetic(args) if args.synthetic else books(args)
    h, _, d = chunk_keys.shape
    k_chunks, adds = args.topk // args.chunk_size, (args.segment or 1024) // args.chunk_size
    results: dict = {}
    for size in args.sizes:
        # the reference: exact search, the bf16 chunk keys scored in fp32
        bank, _ = fill(chunk_keys, size, args.chunk_size, adds, IndexConfig(), dtype="float32")
        exact = measure(bank, queries, k_chunks, 0)
        results[str(size)] = row = {}
        for name, config in configs.items():
            del bank
            gc.collect()
            bank, fill_s = fill(chunk_keys, size, args.chunk_size, adds, config)
            found = measure(bank, queries, k_chunks, args.repeats)
            update_s = steady_update(bank, chunk_keys, adds)
            cost = segment["calls"] * found["retrieve_s"] + update_s
            row[name] = {"retrieve_s": found["retrieve_s"], "search_s": found["search_s"], "update_s": update_s,
                         "fill_index_s": fill_s, "recall": recall(found, exact),
                         "share": cost / (segment["segment_s"] + cost)}
            print(size, name, json.dumps(row[name]), flush=True)
    body = {
        "command": "python bench/retrieval.py " + shlex.join(sys.argv[1:]),
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads},
        "keys": "synthetic (clustered random)" if args.synthetic else [str(p) for p in args.texts],
        "shape": {"num_kv_heads": h, "head_dim": d, "chunk_size": args.chunk_size, "topk": args.topk,
                  "segment": args.segment or 1024,
                  "queries": list(queries.shape)},
        "segment": segment,
        "reference": "exact search, fp32 scores of the bf16 chunk keys",
        "targets": {"recall_at_1m": 0.95, "share_at_1m": 0.25, "fp16_bytes_over_raw": 1.3},
        "index_configs": {name: c.to_dict() for name, c in configs.items()},
        "results": results,
        "bytes": storage_bytes(h, d, args.chunk_size, configs),
    }
    write_report(args, "retrieval", body)
    plot(results, args.out.with_suffix(".png"))


def plot(results: dict, path: Path) -> None:
    """Recall and retrieval share against memory size, one line per backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    sizes = [int(s) for s in results]
    for name in next(iter(results.values())):
        left.plot(sizes, [results[str(s)][name]["recall"] for s in sizes], marker="o", label=name)
        right.plot(sizes, [results[str(s)][name]["share"] for s in sizes], marker="o", label=name)
    left.axhline(0.95, color="grey", ls="--", lw=1)
    right.axhline(0.25, color="grey", ls="--", lw=1)
    for ax, title in ((left, "recall@K vs exact search"), (right, "retrieval share of a segment")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("memory tokens")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    left.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
