"""Real memory-layer keys and retrieval queries for bench/retrieval.py (collected once, cached).

The token stream is the concatenation of a few training books (``longmem data books``).
Its first N_mem tokens are what the memory holds (a memory of M tokens holds the last M
of them), the next segment sits in the short-term tier and the segment after it is the
one whose queries search the memory. Keys come from the frozen backbone run up to the
memory layer on plain T-token segments (no short-term context), rotated to their
absolute positions as the model's chunk search does; a chunk key is the mean of csz of
them. Cached under ``runs/retrieval-keys/`` as safetensors (no unpickling), keyed by the
backbone fingerprint, texts and sizes.
"""

from __future__ import annotations

import hashlib
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from longmem.model.families import apply_rope
from longmem.files import read_text
from longmem.inference.generate import copy_memory
from longmem.model.longmem import LongMemModel
from longmem.inference.reader import tokenize



@dataclass
class Keys:
    """What retrieval is benchmarked on."""

    chunk_keys: torch.Tensor  # [Hkv,C,Dh] bf16, chunk keys of tokens [0, N_mem)
    tail_keys: torch.Tensor  # [Hkv,R,Dh] bf16, pre-rotary keys of the last R memory tokens
    tail_values: torch.Tensor  # [Hkv,R,Dh]
    tail_search: torch.Tensor  # [Hkv,R,Dh] keys rotated to their absolute positions
    ids: torch.Tensor  # [N_mem + 2T] token ids of the stream


def collect(model: LongMemModel, texts: list[Path], n_mem: int, tail: int, cache: Path) -> Keys:
    """The cached keys for this backbone and stream, computed first if missing.

    ``tail``: the last tokens whose full keys/values are kept (for the exact memory the
    segment is timed with).
    """
    t, csz = model.config.segment_length, model.config.chunk_size
    if n_mem % t or tail % t or n_mem < tail:
        raise SystemExit(f"the largest memory ({n_mem}) and --exact-size ({tail}) must be multiples of the "
                         f"segment ({t}), the memory at least --exact-size")
    ids = stream_ids(model, texts, n_mem + 2 * t)
    tag = {"backbone": model.backbone.fingerprint, "layer": model.backbone.memory_layer,
           "texts": [str(p) for p in texts], "n_mem": n_mem, "tail": tail, "segment": t, "chunk_size": csz,
           "ids": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}
    path = cache / f"{hashlib.sha256(json.dumps(tag, sort_keys=True).encode()).hexdigest()[:16]}.safetensors"
    if path.is_file():
        data = load_file(str(path))
        return Keys(data["chunk_keys"], data["tail_keys"], data["tail_values"], data["tail_search"], ids)
    chunks, kept = [], {"keys": [], "values": [], "search": []}
    start = time.perf_counter()
    for a in range(0, n_mem, t):
        keys, values, _ = model.backbone.memory_kv(ids[a : a + t][None])  # [1,Hkv,T,Dh] pre-rotary
        cos, sin = model.backbone.family.rope_exact(model.backbone.model, torch.arange(a, a + t)[None], torch.float32)
        search = apply_rope(keys.float(), cos[:, None], sin[:, None])[0]  # [Hkv,T,Dh] at absolute positions
        h, _, d = search.shape
        chunks.append(search.view(h, t // csz, csz, d).mean(2).bfloat16())  # [Hkv,T/csz,Dh]
        if a >= n_mem - tail:
            for name, x in (("keys", keys[0]), ("values", values[0]), ("search", search)):
                kept[name].append(x.bfloat16())
        if (a // t) % 64 == 63:
            done = a + t
            print(f"keys: {done}/{n_mem} tokens, {done / (time.perf_counter() - start):.0f} tokens/s",
                  file=sys.stderr, flush=True)
    data = {"chunk_keys": torch.cat(chunks, 1)} | {f"tail_{k}": torch.cat(v, 1) for k, v in kept.items()}
    cache.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(data, str(tmp), metadata={"tag": json.dumps(tag)})
    tmp.replace(path)
    return Keys(data["chunk_keys"], data["tail_keys"], data["tail_values"], data["tail_search"], ids)


def stream_ids(model: LongMemModel, texts: list[Path], need: int) -> torch.Tensor:
    """The first ``need`` token ids of the texts read one after another."""
    parts, have = [], 0
    for path in texts:
        if have >= need:
            break
        parts.append(tokenize(model, read_text(path)))
        have += parts[-1].shape[0]
    if have < need:
        raise SystemExit(f"the texts hold {have} tokens, {need} are needed: add --texts")
    return torch.cat(parts)[:need]


@dataclass
class Segment:
    """One timed LongMem segment with a full exact memory (the tail), and its retrieval queries."""

    segment_s: float  # forward + memory write, median
    retrieve_s: float  # time in MemoryBank.retrieve within it, median
    calls: int  # retrieve calls per segment
    queries: torch.Tensor  # [1,H,T,Dh] what the memory was searched with


@torch.no_grad()
def time_segment(model: LongMemModel, keys: Keys, repeats: int) -> Segment:
    """Fill an exact memory with the tail, read the tier segment, time the query segment."""
    t = model.config.segment_length
    n_mem, tail = keys.chunk_keys.shape[1] * model.config.chunk_size, keys.tail_keys.shape[1]
    bank = model.new_memory(1, capacity=tail, index="torch")
    positions = torch.arange(n_mem - tail, n_mem)[None]
    bank.write(keys.tail_keys[None], keys.tail_values[None], positions, search_keys=keys.tail_search[None])
    tier_seg, query_seg = keys.ids[n_mem : n_mem + t][None], keys.ids[n_mem + t : n_mem + 2 * t][None]
    model.write_memory(bank, model(tier_seg, memory=bank))
    captured, seconds = [], []
    original = bank.retrieve

    def retrieve(queries, num_chunks):
        start = time.perf_counter()
        found = original(queries, num_chunks)
        captured.append((queries.detach().clone(), time.perf_counter() - start))
        return found

    rows = []
    for i in range(repeats + 1):  # the first one warms up
        mem = copy_memory(bank)
        mem.retrieve = retrieve
        captured.clear()
        start = time.perf_counter()
        model.write_memory(mem, model(query_seg, memory=mem))
        seconds.append(time.perf_counter() - start)
        if i:
            rows.append((seconds[-1], sum(c[1] for c in captured)))
    queries, _ = captured[0]
    return Segment(statistics.median(r[0] for r in rows), statistics.median(r[1] for r in rows), len(captured),
                   queries)
