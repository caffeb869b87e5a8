"""Key matching for the copy head: does a repeated token's key find its source, per layer?

Two probes with the shipped SideNet's backbone (SmolLM2), reading text with the short-term
tier as the model does and collecting every layer's pre-rotary keys:
  * copies: a 64-token passage of the validation novel placed again 2k / 8k / 14k tokens
    later; per layer, the share of the copy's tokens (after its first 6) whose top-1 cosine
    match among all earlier tokens (the local segment excluded) is their source, for the
    best and for the majority of KV heads, and the mean top-1 cosine of copied vs other tokens.
  * passkeys (the eval's prompts, 4k-16k, depths 0.1 / 0.5): per layer, how many answer
    tokens the successor of the top-1 match (majority of KV heads) reproduces, when the
    candidates are every token before the last 1,100 (what memory holds).
No training; the copy head (src/longmem/model/copy_head.py) uses the memory layer's keys.

Run:  python bench/copy_probe.py [--layers 3,6,9,12,15,18,21]   (about 5 min)
"""

from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import torch

from core import write_report
from longmem.evals.passkey import PasskeyConfig, PromptBuilder
from longmem.files import read_text
from longmem.model.longmem import LongMemModel, LongMemOutput
from longmem.inference.reader import tokenize

TEXT = Path("data/books/validation/austen-northangerabbey.txt")
PASSKEYS = [(4096, 0.1, 0), (4096, 0.1, 1), (8192, 0.1, 0), (8192, 0.5, 0), (16384, 0.5, 0), (16384, 0.1, 0)]


@torch.no_grad()
def layer_keys(model: LongMemModel, ids: torch.Tensor, layers: list[int]) -> dict[int, torch.Tensor]:
    """Read ids [N] segment by segment (tier as the model reads) -> unit pre-rotary keys [Hkv,N,Dh] per layer."""
    bb, t = model.backbone, model.config.segment_length
    memory = model.new_memory(1)
    keys: dict[int, list] = {layer: [] for layer in layers}
    for a in range(0, ids.shape[0], t):
        seg = ids[a : a + t][None]
        frozen = bb(seg, past=memory.recent)
        for layer in layers:
            k = bb.keys_at(frozen.hidden[layer], layer)  # [1,Hkv,T,Dh]
            keys[layer].append(k[0].float())
        positions = a + torch.arange(seg.shape[1])[None]
        model.write_memory(memory, LongMemOutput(None, None, frozen.mem_keys, frozen.mem_values, positions,
                                                 layer_keys=frozen.layer_keys, layer_values=frozen.layer_values))
    out = {}
    for layer, parts in keys.items():
        k = torch.cat(parts, 1)
        out[layer] = k / k.norm(dim=-1, keepdim=True)
    return out


def top1(keys: torch.Tensor, queries: torch.Tensor, before: int) -> tuple[torch.Tensor, torch.Tensor]:
    """keys [Hkv,N,Dh], query positions [Q] -> best cosine and its position [Hkv,Q] among positions < before."""
    sim = keys[:, queries] @ keys[:, :before].transpose(-1, -2)  # [Hkv,Q,before]
    best = sim.max(-1)
    return best.values, best.indices


def copies(model: LongMemModel, ids: torch.Tensor, layers: list[int], span: int = 64) -> dict:
    t, n_ctx, rows = model.config.segment_length, 16384, {}
    for dist in (2048, 8192, 14336):
        text = ids[: n_ctx + t].clone()
        src = n_ctx - dist
        text[n_ctx + 200 : n_ctx + 200 + span] = ids[src : src + span]
        keys = layer_keys(model, text, layers)
        q = torch.arange(n_ctx + 206, n_ctx + 200 + span)  # skip the copy's first tokens
        want = src + (q - n_ctx - 200)
        other = torch.arange(n_ctx + 300, n_ctx + t)
        rows[dist] = {}
        for layer in layers:
            sims, pos = top1(keys[layer], q, n_ctx)
            hit = pos == want[None]  # [Hkv,Q]
            other_sims, _ = top1(keys[layer], other, n_ctx)
            rows[dist][layer] = {"any_head": float(hit.any(0).float().mean()),
                                 "majority": float((hit.float().mean(0) > 0.5).float().mean()),
                                 "cosine_copied": float(sims.mean()), "cosine_other": float(other_sims.mean())}
            print("copy", dist, layer, rows[dist][layer], flush=True)
    return rows


def passkeys(model: LongMemModel, layers: list[int]) -> dict:
    builder = PromptBuilder(model.tokenizer, PasskeyConfig(lengths=[4096]))
    totals = {layer: [0, 0] for layer in layers}
    for n, depth, trial in PASSKEYS:
        prompt = builder.build(n, depth, random.Random(f"probe-{n}-{depth}-{trial}"))
        full = torch.cat([prompt.ids, prompt.answer])
        keys = layer_keys(model, full, layers)
        a, total = prompt.answer.shape[0], full.shape[0]
        q = torch.arange(total - a - 1, total - 1)  # the positions predicting each answer token
        for layer in layers:
            _, pos = top1(keys[layer], q, total - 1100)
            vote = torch.mode(full[pos + 1], 0).values  # the successor the most heads point at
            totals[layer][0] += int((vote == prompt.answer).sum())
            totals[layer][1] += a
        print("passkey", n, depth, {layer: f"{c}/{m}" for layer, (c, m) in totals.items()}, flush=True)
    return {str(layer): {"correct": c, "answer_tokens": m} for layer, (c, m) in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", default="3,6,9,12,15,18,21")
    parser.add_argument("--out", type=Path, default=Path("bench/results/copy_probe.json"))
    args = parser.parse_args()
    model = LongMemModel.from_pretrained("default", dtype="bfloat16").eval()
    layers = [int(x) for x in args.layers.split(",")]
    ids = tokenize(model, read_text(TEXT))
    write_report(args, "copy_probe", {
        "command": "python bench/copy_probe.py " + " ".join(sys.argv[1:]),
        "memory_layer": model.config.memory_layer,
        "copies": copies(model, ids, layers),
        "passkeys": passkeys(model, layers),
    })


if __name__ == "__main__":
    main()
