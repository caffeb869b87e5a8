"""Training throughput: tokens/s of adaptation steps on SmolLM2 with a full 16k memory.

For bf16 autocast and fp32, and batch rows 1 / 2 / 4, runs real training steps on the
book corpus (every row's memory pre-filled to capacity with the backbone's own K/V of
its document stream, so retrieval searches a full bank) and reports training tokens/s
and the share of a step spent in retrieval (chunk search + gathering the K entries).

Run:  python bench/train_throughput.py [--steps 4] [--out bench/results/train_throughput.json]
(needs `longmem data books`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from core import Timer, patched, write_report  # noqa: E402

from longmem.train.trainer import Trainer  # noqa: E402
from longmem.train.config import TrainConfig  # noqa: E402


def prefill(trainer: Trainer, tokens: int) -> None:
    """Fill every row's bank with backbone K/V of text (positions before the stream's)."""
    model, mem = trainer.model, trainer.memory
    t = model.config.segment_length
    ids = torch.from_numpy(trainer.train_data.ids[: tokens + t].astype("int64"))
    with torch.no_grad():
        for a in range(0, tokens, t):
            out = model.backbone(ids[a : a + t][None, :].expand(mem.batch_size, -1))
            pos = torch.arange(a, a + t).expand(mem.batch_size, t) - tokens - t  # before position 0
            mem.write(out.mem_keys, out.mem_values, pos)


def measure(dtype: str, rows: int, steps: int, memory: int, corpus: str) -> dict:
    cfg = TrainConfig(corpus=corpus, output_dir=f"runs/bench-train-{dtype}-{rows}", steps=steps + 1,
                      batch_size=rows, dtype=dtype, eval_every=-1, save_every=0, log_every=1000)
    cfg.model.memory_size = memory
    trainer = Trainer(cfg, progress=False).setup()
    prefill(trainer, memory)
    retrieve = Timer()
    times, shares, tokens = [], [], []
    with patched(trainer.memory, "retrieve", retrieve):
        for i in range(steps + 1):
            batch = next(trainer.stream)
            batch.reset[:] = False  # keep the pre-filled memory for the measurement
            retrieve.total = 0.0
            start = time.perf_counter()
            row = trainer.train_step(batch)
            elapsed = time.perf_counter() - start
            if i:  # the first step warms up
                times.append(elapsed)
                shares.append(retrieve.total / elapsed)
                tokens.append(row["tokens"])
    return {
        "dtype": dtype, "rows": rows, "memory_tokens": trainer.memory.num_tokens() // rows,
        "step_s": statistics.median(times), "tokens_per_s": sum(tokens) / sum(times),
        "retrieval_share": statistics.median(shares),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--memory-size", type=int, default=16384)
    parser.add_argument("--rows", default="1,2,4")
    parser.add_argument("--dtypes", default="bfloat16,float32")
    parser.add_argument("--corpus", default="data/books")
    parser.add_argument("--out", type=Path, default=Path("bench/results/train_throughput.json"))
    args = parser.parse_args()
    threads = torch.get_num_threads()
    results = []
    for dtype in args.dtypes.split(","):
        for rows in map(int, args.rows.split(",")):
            results.append(measure(dtype, rows, args.steps, args.memory_size, args.corpus))
            print(json.dumps(results[-1]), flush=True)
    write_report(args, "train_throughput", {"threads": threads, "targets": {"retrieval_share": 0.15},
                                            "results": results})

if __name__ == "__main__":
    main()
