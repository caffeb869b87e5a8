"""Attention kernels of the SideNet: local causal, memory, and their fusion.

Pure functions on tensors; every one has shapes in its docstring. ``lse`` is the
log-sum-exp of the (scaled) scores, which lets two softmaxes be merged exactly into one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def expand_kv(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B,H_kv,T,Dh] -> [B,H,T,Dh] by repeating each KV head for its query group."""
    group = heads // x.shape[1]
    return x if group == 1 else x.repeat_interleave(group, dim=1)


Past = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # keys, values [B,H_kv,P,Dh], valid [B,P]


def local_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, past: Past | None = None
) -> torch.Tensor:
    """Causal attention: q [B,H,T,Dh], k/v [B,H_kv,T,Dh] -> [B,H,T,Dh].

    ``past`` prepends P earlier entries (a short-term cache) that every token may see.
    """
    h = q.shape[1]  # repeating KV heads measured faster here than SDPA's enable_gqa
    if past is None:
        return F.scaled_dot_product_attention(q, expand_kv(k, h), expand_kv(v, h), is_causal=True, scale=scale)
    if _all_visible(past) and not _needs_grad(q, k, v) and q.device.type == "cpu":
        split = split_past_attention(q, past[0], past[1], k, v, scale)
        if split is not None:
            return split[0]
    k, v, mask = _with_past(k, v, past)
    return F.scaled_dot_product_attention(q, expand_kv(k, h), expand_kv(v, h), attn_mask=mask, scale=scale)


def _needs_grad(*xs: torch.Tensor) -> bool:
    return torch.is_grad_enabled() and any(x.requires_grad for x in xs)


def _all_visible(past: Past | None) -> bool:
    """True when a past has entries and every one of them is visible to every row."""
    return past is not None and past[0].shape[2] > 0 and bool(past[2].all())


def local_attention_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, past: Past | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention with its log-sum-exp: -> out [B,H,T,Dh], lse [B,H,T] (fp32).

    Without autograd this runs the fused CPU flash kernel, which returns the log-sum-exp
    but no gradient for it; training takes the explicit path below.
    """
    h, t = q.shape[1], q.shape[2]
    if not _needs_grad(q, k, v) and q.device.type == "cpu":
        fused = _flash_lse(q, k, v, scale, past)
        if fused is not None:
            return fused
    if past is None:
        allowed = torch.ones(t, t, dtype=torch.bool, device=q.device).tril()  # [T,T]
    else:
        k, v, allowed = _with_past(k, v, past)  # allowed [B,1,T,P+T]
    scores = torch.matmul(q.float(), expand_kv(k, h).float().transpose(-1, -2)) * scale  # [B,H,T,P+T]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B,H,T]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs, expand_kv(v, h).float()).to(q.dtype), lse


def _flash_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, past: Past | None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The CPU flash kernel with its log-sum-exp (no autograd), or None where it refuses."""
    if _all_visible(past):  # two unmasked calls beat one masked call over P+T keys
        return split_past_attention(q, past[0], past[1], k, v, scale)
    h = q.shape[1]
    mask = None
    if past is not None:
        k, v, allowed = _with_past(k, v, past)  # allowed [B,1,T,P+T]
        mask = torch.zeros(allowed.shape, dtype=q.dtype, device=q.device).masked_fill_(~allowed, float("-inf"))
    try:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, expand_kv(k.to(q.dtype), h), expand_kv(v.to(q.dtype), h), is_causal=past is None,
            attn_mask=mask, scale=scale)
    except (RuntimeError, AttributeError):  # another build or dtype: fall back to the explicit path
        return None
    return out, lse.float()


def split_past_attention(
    q: torch.Tensor, pk: torch.Tensor, pv: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Causal attention over P fully visible past entries + the segment, without a mask (no autograd).

    q [B,H,T,Dh]; pk/pv [B,H_kv,P,Dh]; k/v [B,H_kv,T,Dh] -> out [B,H,T,Dh], lse [B,H,T] (fp32).
    Two calls of the CPU flash kernel (past: unmasked; segment: causal) merged by their
    log-sum-exps: the same softmax as one masked call over P+T keys, and faster here, since
    the kernel skips masked blocks only for ``is_causal``. None where the kernel refuses.
    """
    h = q.shape[1]
    flash = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    try:
        o_past, l_past = flash(q, expand_kv(pk.to(q.dtype), h), expand_kv(pv.to(q.dtype), h), scale=scale)
        o_seg, l_seg = flash(q, expand_kv(k.to(q.dtype), h), expand_kv(v.to(q.dtype), h), is_causal=True,
                             scale=scale)
    except (RuntimeError, AttributeError):
        return None
    lse = torch.logaddexp(l_past.float(), l_seg.float())  # [B,H,T]
    w = torch.exp(l_past.float() - lse).unsqueeze(-1)  # [B,H,T,1] the past's share
    return (w * o_past.float() + (1 - w) * o_seg.float()).to(q.dtype), lse


def _with_past(k: torch.Tensor, v: torch.Tensor, past: Past) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Prepend past entries: -> keys/values [B,H_kv,P+T,Dh], allowed mask [B,1,T,P+T]."""
    pk, pv, valid = past
    b, t = k.shape[0], k.shape[2]
    causal = torch.ones(t, t, dtype=torch.bool, device=k.device).tril()  # [T,T]
    allowed = torch.cat([valid[:, None, None, :].expand(b, 1, t, valid.shape[1]),
                         causal.expand(b, 1, t, t)], dim=-1)  # [B,1,T,P+T]
    return torch.cat([pk.to(k.dtype), k], 2), torch.cat([pv.to(v.dtype), v], 2), allowed


def memory_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each token attends to its own K retrieved entries.

    q [B,H,T,Dh]; keys/values [B,Hs,T,K,Dh]; mask [B,Hs,T,K] (True = real entry), where
    Hs divides H and query head h reads the entries of searching head h // (H / Hs)
    -> out [B,H,T,Dh], lse [B,H,T] (fp32, -inf where no entry), probs [B,H,T,K].
    """
    b, h, t, d = q.shape
    hs = keys.shape[1]
    qg = q.view(b, hs, h // hs, t, d)  # [B,Hs,G,T,Dh]
    scores = torch.einsum("bsgtd,bstkd->bsgtk", qg, keys).float() * scale  # [B,Hs,G,T,K]
    scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B,Hs,G,T]
    probs = torch.exp(scores - lse.nan_to_num(neginf=0.0).unsqueeze(-1))  # 0 where masked
    out = torch.einsum("bsgtk,bstkd->bsgtd", probs.to(values.dtype), values)  # [B,Hs,G,T,Dh]
    return out.reshape(b, h, t, d), lse.reshape(b, h, t), probs.reshape(b, h, t, -1)


def joint_fusion(
    local: torch.Tensor, local_lse: torch.Tensor, mem: torch.Tensor, mem_lse: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """One softmax over local + memory keys, merged from two partial softmaxes.

    local/mem [B,H,T,Dh], lse [B,H,T] -> out [B,H,T,Dh], memory share of the mass [B,H,T].
    """
    share = torch.sigmoid(mem_lse - local_lse).nan_to_num(0.0)  # exp(m) / (exp(l) + exp(m))
    out = (1 - share).unsqueeze(-1) * local.float() + share.unsqueeze(-1) * mem.float()
    return out.to(local.dtype), share


def cached_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of the last Tn window tokens: q [B,H,Tn,Dh], k/v [B,H_kv,N,Dh] -> [B,H,Tn,Dh]."""
    b, h, tn, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    if tn == 1:  # one new token sees every key: its G query heads per KV head are rows, K/V are not copied
        out = F.scaled_dot_product_attention(q.reshape(b, hkv, h // hkv, d), k, v, scale=scale)  # [B,Hkv,G,Dh]
        return out.reshape(b, h, 1, d)
    k, v = expand_kv(k, h), expand_kv(v, h)
    if tn == n:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=_allowed(tn, n, q.device), scale=scale)


def cached_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """``cached_attention`` with its log-sum-exp: -> out [B,H,Tn,Dh], lse [B,H,Tn] (fp32)."""
    b, h, tn, d = q.shape
    hkv, n = k.shape[1], k.shape[2]
    qg = q.reshape(b, hkv, h // hkv * tn, d)  # [B,Hkv,G*Tn,Dh]: query head h reads KV head h // G
    scores = torch.matmul(qg.float(), k.float().transpose(-1, -2)) * scale  # [B,Hkv,G*Tn,N]
    scores = scores.view(b, hkv, h // hkv, tn, n).masked_fill(~_allowed(tn, n, q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B,Hkv,G,Tn]
    probs = torch.exp(scores - lse.unsqueeze(-1)).view(b, hkv, -1, n)
    out = torch.matmul(probs, v.float()).view(b, h, tn, d)  # [B,H,Tn,Dh]
    return out.to(q.dtype), lse.reshape(b, h, tn)


def windowed_attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, window: int,
                           past: Past | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal attention that sees only the last ``window`` positions (a sliding-window layer), with its lse.

    q [B,H,Tq,Dh]. Reading: k/v [B,H_kv,Tq,Dh] of the same tokens, ``past`` (P slots) ahead of them.
    Decoding: k/v [B,H_kv,N,Dh] are the whole window so far (no ``past``), q its last Tq tokens.
    Query i may see key j when j <= i and i - j < window (positions counted over past + tokens, as the
    backbone's own mask counts them) -> out [B,H,Tq,Dh], lse [B,H,Tq] (fp32). Explicit fp32 path.
    """
    b, h, tq, _ = q.shape
    valid = None
    if past is not None:
        valid = past[2]  # [B,P]
        k, v = torch.cat([past[0].to(k.dtype), k], 2), torch.cat([past[1].to(v.dtype), v], 2)
    n = k.shape[2]
    kpos = torch.arange(n, device=q.device)
    qpos = torch.arange(n - tq, n, device=q.device)
    allowed = (kpos[None, :] <= qpos[:, None]) & (qpos[:, None] - kpos[None, :] < window)  # [Tq,N]
    allowed = allowed.expand(b, 1, tq, n)
    if valid is not None:
        seen = torch.cat([valid, torch.ones(b, n - valid.shape[1], dtype=torch.bool, device=q.device)], 1)
        allowed = allowed & seen[:, None, None, :]  # [B,1,Tq,N]
    scores = torch.matmul(q.float(), expand_kv(k, h).float().transpose(-1, -2)) * scale  # [B,H,Tq,N]
    scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [B,H,Tq]
    probs = torch.exp(scores - lse.unsqueeze(-1))
    return torch.matmul(probs, expand_kv(v, h).float()).to(q.dtype), lse


def _allowed(tn: int, n: int, device: torch.device) -> torch.Tensor:
    """[Tn,N] True where new token i (window position n-Tn+i) may attend to window token j."""
    return torch.arange(n, device=device)[None, :] <= torch.arange(n - tn, n, device=device)[:, None]
