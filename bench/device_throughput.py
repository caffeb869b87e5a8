"""One device against the CPU: the same numbers, and how fast reading and decoding run there.

The packaged default (SmolLM2-135M, bf16) on ``--device`` (default auto: CUDA when present), beside the same
model on the CPU, in one run:
  * perplexity of the first ``--tokens`` tokens of a held-out book read with memory: the device's must equal
    the CPU's within 0.01 (``ppl_delta``);
  * greedy decoding of ``--new-tokens`` tokens after that book as memory: the same text on both;
  * tokens/s of reading with memory (segments of 1,024 tokens) and of decoding, on each device (medians).

Run:  python bench/device_throughput.py [--device cuda] [--tokens 8192] [--new-tokens 64] [--repeats 3]
It writes bench/results/device-<type>.json (``--out``); bench/gpu_check.sh runs it on a GPU machine.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from core import write_report
from longmem.devices import resolve_device
from longmem.inference.generate import GenerationConfig, generate
from longmem.inference.reader import perplexity, read, tokenize
from longmem.model.longmem import LongMemModel

DEFAULT_TEXT = Path("data/books/test/austen-persuasion.txt")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model: LongMemModel, ids: torch.Tensor, new_tokens: int, repeats: int) -> dict:
    """Perplexity, greedy text and median reading / decoding speed of ``model`` on ids [N]."""
    dev = model.device
    result = perplexity(model, ids, "memory")
    reads, decodes, text = [], [], ""
    for _ in range(repeats):
        memory = model.new_memory(1)
        _sync(dev)
        start = time.perf_counter()
        read(model, ids, memory)
        _sync(dev)
        reads.append(ids.shape[0] / (time.perf_counter() - start))
        start = time.perf_counter()
        text = generate(model, ids[-32:], memory, GenerationConfig(max_new_tokens=new_tokens, temperature=0.0,
                                                                   stop_at_eos=False)).text
        _sync(dev)
        decodes.append(new_tokens / (time.perf_counter() - start))
    return {"device": str(dev), "name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "ppl_memory": result.perplexity, "greedy_text": text,
            "read_tokens_per_s": statistics.median(reads), "decode_tokens_per_s": statistics.median(decodes)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT)
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    device = resolve_device(args.device)
    args.out = args.out or Path(f"bench/results/device-{device.type}.json")
    runs = {}
    for name, where in (("cpu", torch.device("cpu")), ("device", device)):
        model = LongMemModel.from_pretrained("default", dtype="bfloat16", device=where)
        ids = tokenize(model, args.text.read_text(encoding="utf-8"))[: args.tokens]
        runs[name] = measure(model, ids, args.new_tokens, args.repeats)
        print(name, runs[name], flush=True)
        del model
    cpu, dev = runs["cpu"], runs["device"]
    write_report(args, "device_throughput", {
        "targets": {"ppl_delta": 0.01},
        "ppl_delta": abs(dev["ppl_memory"] - cpu["ppl_memory"]),
        "same_greedy_text": dev["greedy_text"] == cpu["greedy_text"],
        "read_speedup": dev["read_tokens_per_s"] / cpu["read_tokens_per_s"],
        "decode_speedup": dev["decode_tokens_per_s"] / cpu["decode_tokens_per_s"],
        "threads": torch.get_num_threads(),
        "runs": runs,
    })


if __name__ == "__main__":
    main()
