"""Retrieval-quality probe: does retrieval return what the backbone would attend to?

For a window of W tokens that fits the backbone's native context, the frozen backbone
reads the whole window once and we take its memory layer's attention (true rotary
positions) from the queries of the last segment. LongMem reads the same window the way
it always does — segment by segment, earlier segments going into memory — and we record
which memory entries it retrieves for those queries. The score is the share of the
backbone's attention mass on earlier (memory-eligible) tokens that lands on retrieved
entries: 1.0 means retrieval found everything the real layer looks at. With a short-term tier,
the tokens it holds are attended exactly: their mass counts as found, for retrieval and for the
random baseline alike.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from longmem.errors import LongMemError
from longmem.model.families import apply_rope
from longmem.memory.bank import MemoryBank, Retrieved
from longmem.model.longmem import LongMemModel


@dataclass
class RetrievalQuality:
    """Result of :func:`retrieval_quality`."""

    window: int  # W tokens read
    queries: int  # query tokens scored (the last segment)
    sink_share: float  # backbone attention mass on the window's first token (an attention sink)
    earlier_share: float  # mass on the other tokens before the last segment (mean)
    captured: float  # share of that earlier mass on retrieved entries (mean over queries and heads)
    random_captured: float  # the same for K entries drawn uniformly from memory (a baseline)
    retrieved_per_query: float  # real entries per query and head
    memory_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@torch.no_grad()
def backbone_attention(model: LongMemModel, ids: torch.Tensor, last: int) -> torch.Tensor:
    """ids [1,W] -> memory-layer attention of the last ``last`` queries [H,last,W] (fp32, causal, true positions)."""
    backbone = model.backbone
    out = backbone(ids)
    family, shape = backbone.family, backbone.attn_shape
    norm, attn, _, _ = family.parts(backbone.layers[backbone.memory_layer])
    x = norm(out.hidden[backbone.memory_layer])  # [1,W,D]
    q = family.queries(attn, x, shape).float()  # [1,H,W,Dh]
    k = out.mem_keys.float()  # [1,Hkv,W,Dh]
    w, dev = ids.shape[1], ids.device
    if family.rotary:
        cos, sin = family.rope_cos_sin(backbone.model, torch.arange(w, device=dev), torch.float32,
                                       backbone.memory_layer)  # [W,Dh]
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    k = k.repeat_interleave(shape.num_heads // shape.num_kv_heads, dim=1)  # [1,H,W,Dh]
    scores = (q[:, :, w - last :] @ k.transpose(-1, -2))[0] * shape.scaling  # [H,last,W]
    future = torch.arange(w, device=dev)[None, :] > torch.arange(w - last, w, device=dev)[:, None]  # [last,W]
    return scores.masked_fill(future, float("-inf")).softmax(-1)


@torch.no_grad()
def retrieval_quality(model: LongMemModel, ids: torch.Tensor, window: int = 4096, seed: int = 0) -> RetrievalQuality:
    """Score retrieval on the first ``window`` tokens of ids [N] (see the module docstring)."""
    t = model.config.segment_length
    if window > model.backbone.native_context:
        raise LongMemError(f"window {window} exceeds the backbone's native context {model.backbone.native_context}")
    if window <= t or ids.shape[0] < window:
        raise LongMemError(f"need at least window={window} > segment={t} tokens, text has {ids.shape[0]}")
    ids = ids[:window][None, :].to(model.device)  # [1,W]
    probs = backbone_attention(model, ids, t)  # [H,T,W] the last segment's queries
    memory = model.new_memory(1)
    model.eval()
    for a in range(0, window - t, t):
        model.write_memory(memory, model(ids[:, a : a + t], memory=memory))
    found = _capture_retrieval(model, ids[:, window - t :], memory)
    heads = probs.shape[0]
    mask = found.mask[0]  # [H,T,K]
    pos = found.positions[0].clamp(min=0)  # [H,T,K]
    earlier = probs[:, :, 1 : window - t].sum(-1)  # [H,T] position 0 is the sink
    tier = _tier_mass(probs, memory)  # [H,T]
    hit = (probs.gather(-1, pos) * (mask & (pos > 0))).sum(-1) + tier  # [H,T]
    stored = _stored_positions(memory)
    g = torch.Generator().manual_seed(seed)
    rand = stored[torch.randint(0, stored.numel(), (heads, t, model.config.topk), generator=g, device="cpu")]
    rand_hit = (probs.gather(-1, rand) * (rand > 0)).sum(-1) + tier
    return RetrievalQuality(
        window=window,
        queries=t,
        sink_share=float(probs[:, :, 0].mean()),
        earlier_share=float(earlier.mean()),
        captured=float((hit / earlier.clamp_min(1e-12)).mean()),
        random_captured=float((rand_hit / earlier.clamp_min(1e-12)).mean()),
        retrieved_per_query=float(mask.sum(-1).float().mean()),
        memory_tokens=memory.num_tokens(),
    )


def _capture_retrieval(model: LongMemModel, seg: torch.Tensor, memory: MemoryBank) -> Retrieved:
    """Run one segment and return what its memory block retrieved."""
    seen: list[Retrieved] = []
    original = memory.retrieve

    def recording(*args, **kwargs):
        result = original(*args, **kwargs)
        seen.append(result)
        return result

    memory.retrieve = recording  # type: ignore[method-assign]
    try:
        model(seg, memory=memory)
    finally:
        memory.retrieve = original  # type: ignore[method-assign]
    if not seen or seen[0] is None:
        raise LongMemError("nothing was retrieved (empty memory)")
    return seen[0]


def _stored_positions(memory: MemoryBank) -> torch.Tensor:
    return memory.row_chunks(0)[2].flatten()


def _tier_mass(probs: torch.Tensor, memory: MemoryBank) -> torch.Tensor:
    """Attention mass [H,T] on the earlier tokens a short-term tier holds (0 without a tier; the sink excluded)."""
    recent = memory.recent
    if recent is None:
        return torch.zeros(probs.shape[:2], device=probs.device)
    held = recent.held_positions[0][recent.valid[0, recent.slots - recent.held_positions.shape[1] :]]  # [R']
    held = held[held > 0]
    return probs[:, :, held].sum(-1)
