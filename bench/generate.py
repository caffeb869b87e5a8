"""Remember and generate: LongMem against the backbone alone, with a 65,536-token memory.

On SmolLM2 (bf16), measured in one run, interleaved, medians (ratios, so machine noise
largely cancels):
  * reading ("remember"): tokens/s of reading text into a named memory on disk (frozen
    backbone up to what the memory needs + the append to disk) / tokens/s of the
    backbone's own forward (with its LM head) over the same 1024-token segments
  * generation: tokens/s of LongMem's incremental decoding (cached backbone + cached
    SideNet + retrieval from the full memory + sampling) / tokens/s of the backbone's own
    cached generation (Hugging Face DynamicCache, greedy), same prompt, same length;
    once with a short prompt and once with a prompt that fills the local window, so
    that tokens move into the memory during generation

Run:  python bench/generate.py [--sidenet default] [--read-tokens 16384] [--fill text|random] [--new-tokens 128] [--repeats 3]
      python bench/generate.py --sidenet fresh --set recent_tokens=0 --set copy_head=false --set copy_gate=false
          (the paper's design: no short-term tier, no copy head)
(``--fill random``: the 65,536 memory entries are random keys/values — the same search and
attention cost — then two segments of text, to save reading a whole book first.)
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import DynamicCache

from core import add_set_argument, architecture_overrides, write_report
from longmem.model.backbone import with_cache
from longmem.inference.generate import GenerationConfig
from longmem.memory.io.named import NamedMemory
from longmem.model.longmem import LongMemModel
from longmem.inference.reader import tokenize
from longmem.inference.session import Session, _remember, read_into

DEFAULT_TEXT = Path("data/books/train/austen-mansfieldpark.txt")
DEFAULT_PROMPT = Path("data/books/test/austen-emma.txt")


@torch.no_grad()
def backbone_forward_s(model: LongMemModel, ids: torch.Tensor, t: int) -> float:
    """Seconds of the HF model's own forward (with LM head) over ids [N] in T-token segments."""
    start = time.perf_counter()
    for a in range(0, ids.shape[0], t):
        model.backbone.model(ids[a : a + t][None, :])
    return time.perf_counter() - start


def reading(model: LongMemModel, ids: torch.Tensor, root: Path, chunk: int, t: int) -> dict:
    """Read ids into a named memory chunk by chunk, each chunk timed against the backbone's forward."""
    store = NamedMemory(root / "read")
    rows = []
    for i, a in enumerate(range(0, ids.shape[0] - chunk + 1, chunk)):
        part = ids[a : a + chunk]
        _, remember_s = _remember(model, store, part, f"chunk-{i}", None)
        base_s = backbone_forward_s(model, part, t)
        rows.append({"tokens": chunk, "remember_s": remember_s, "backbone_s": base_s})
        print(f"read chunk {i}: remember {chunk / remember_s:.0f} tok/s, backbone {chunk / base_s:.0f} tok/s",
              flush=True)
    timed = rows[1:] or rows  # the first pair warms up
    return {
        "chunk_tokens": chunk,
        "chunks": len(rows),
        "remember_tokens_per_s": statistics.median(r["tokens"] / r["remember_s"] for r in timed),
        "backbone_forward_tokens_per_s": statistics.median(r["tokens"] / r["backbone_s"] for r in timed),
        "ratio": statistics.median(r["backbone_s"] / r["remember_s"] for r in timed),
        "runs": rows,
    }


def filled_session(model: LongMemModel, ids: torch.Tensor, root: Path, fill: str) -> Session:
    """A session whose memory holds ``memory_size`` tokens: read from text, or random keys/values
    (same search and attention cost) followed by two segments of text (a real short-term tier)."""
    session = Session(model, "generate", root)
    t, size = model.config.segment_length, model.config.memory_size
    if fill == "random":
        shape = model.backbone.attn_shape
        gen = torch.Generator().manual_seed(0)
        keys = torch.randn(1, shape.num_kv_heads, size, shape.head_dim, generator=gen)
        session.memory.write(keys, torch.randn(keys.shape, generator=gen), torch.arange(size)[None, :])
        read_into(model, ids[: 2 * t], session.memory, start=size)
    else:
        read_into(model, ids[: size + 3 * t], session.memory, start=0)
    return session


@torch.no_grad()
def backbone_generate(model: LongMemModel, prompt: torch.Tensor, n: int) -> tuple[float, float]:
    """(prompt seconds, tokens/s) of the HF model's own cached greedy generation: the faster of its
    stock sdpa attention and the one longmem routes it through (one decoded token: one GQA call)."""
    hf = model.backbone.model
    ours = hf.config._attn_implementation
    best = (0.0, 0.0)
    for impl in ("sdpa", ours):
        hf.set_attn_implementation(impl)
        try:
            cache = DynamicCache(config=hf.config)
            start = time.perf_counter()
            out = hf(input_ids=prompt[None, :], use_cache=True, **with_cache(hf, cache))
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            mid = time.perf_counter()
            for _ in range(n - 1):
                out = hf(input_ids=token, use_cache=True, **with_cache(hf, cache))
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            tps = n / (time.perf_counter() - mid)
        finally:
            hf.set_attn_implementation(ours)
        best = max(best, (mid - start, tps), key=lambda r: r[1])
    return best


def generation(model: LongMemModel, session: Session, prompt: torch.Tensor, n: int, repeats: int) -> dict:
    config = GenerationConfig(max_new_tokens=n, stop_at_eos=False)
    rows = []
    for i in range(repeats + 1):
        pieces = session.stream(prompt, config)
        for _ in pieces:
            pass
        res = pieces.result
        base_prompt_s, base_tps = backbone_generate(model, prompt, n)
        rows.append({"longmem_tokens_per_s": res.tokens_per_s, "backbone_tokens_per_s": base_tps,
                     "longmem_prompt_s": res.prompt_seconds, "backbone_prompt_s": base_prompt_s,
                     "memory_tokens_end": res.memory_tokens})
        print(f"generate ({prompt.numel()}-token prompt) {i}: longmem {res.tokens_per_s:.2f} tok/s, "
              f"backbone {base_tps:.2f} tok/s", flush=True)
    timed = rows[1:]
    return {
        "prompt_tokens": int(prompt.numel()),
        "new_tokens": n,
        "longmem_tokens_per_s": statistics.median(r["longmem_tokens_per_s"] for r in timed),
        "backbone_tokens_per_s": statistics.median(r["backbone_tokens_per_s"] for r in timed),
        "ratio": statistics.median(r["longmem_tokens_per_s"] / r["backbone_tokens_per_s"] for r in timed),
        "runs": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="text read into the memory")
    parser.add_argument("--prompt-text", type=Path, default=DEFAULT_PROMPT, help="where prompts come from")
    parser.add_argument("--sidenet", default="default", help="SideNet directory, 'default' (shipped) or 'fresh'")
    parser.add_argument("--memory-size", type=int, default=65536)
    parser.add_argument("--read-tokens", type=int, default=16384, help="tokens of timed reading")
    parser.add_argument("--chunk", type=int, default=4096, help="tokens per timed remember call")
    parser.add_argument("--fill", choices=["text", "random"], default="text",
                        help="fill the generation memory by reading text, or with random keys/values")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    add_set_argument(parser)
    parser.add_argument("--out", type=Path, default=Path("bench/results/generate.json"))
    args = parser.parse_args()
    overrides = architecture_overrides(parser, args)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    model = LongMemModel.from_pretrained(args.sidenet, dtype="bfloat16", memory_size=args.memory_size, **overrides)
    t = model.config.segment_length
    ids = tokenize(model, args.text.read_text(encoding="utf-8"))
    prompt_ids = tokenize(model, args.prompt_text.read_text(encoding="utf-8"))
    with tempfile.TemporaryDirectory() as root:
        read = reading(model, ids[: args.read_tokens], Path(root), args.chunk, t)
        session = filled_session(model, ids, Path(root), args.fill)
        assert session.memory.num_tokens() == args.memory_size, session.memory.num_tokens()
        short = generation(model, session, prompt_ids[:256], args.new_tokens, args.repeats)
        window = prompt_ids[: t - args.new_tokens // 2]  # the window fills halfway through
        sliding = generation(model, session, window, args.new_tokens, args.repeats)
    write_report(args, "generate", {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": threads,
                    "load_average": os.getloadavg()},
        "sidenet": args.sidenet,
        "backbone": model.config.backbone,
        "dtype": "bfloat16",
        "memory_tokens": args.memory_size,
        "short_term_tier_tokens": getattr(model, "recent_tokens", 0),
        "targets": {"generation_ratio": 0.6, "reading_ratio": 0.9},
        "reading": read,
        "generation": short,
        "generation_window_slides": sliding,
        "config": model.config.to_dict(),
    })


if __name__ == "__main__":
    main()
