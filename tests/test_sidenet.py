import pytest
import torch

from conftest import PLAIN, make_model
from longmem.baselines.memtrm import gated_fusion
from longmem.model.attention import (joint_fusion, local_attention, local_attention_lse, memory_attention,
                                     split_past_attention)


def fill(model, segments: int, batch: int = 1, seed: int = 0):
    torch.manual_seed(seed)
    mem = model.new_memory(batch)
    for _ in range(segments):
        ids = torch.randint(0, 256, (batch, model.config.segment_length))
        model.write_memory(mem, model(ids, memory=mem))
    return mem


def test_an_empty_memory_without_style_is_the_backbone(family):
    model = make_model(family, **PLAIN)
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, memory=model.new_memory(2), backbone_logits=True)
    assert torch.equal(out.logits, out.backbone_logits) or (out.logits - out.backbone_logits).abs().max() < 1e-6
    assert not model(ids, labels=ids).loss.requires_grad  # empty memory: nothing to learn


def test_sidenet_blocks_copy_the_backbone_layers_from_the_memory_layer_up(family):
    model = make_model(family, **PLAIN)
    assert [b.layer_index for b in model.sidenet.blocks] == [1, 3]  # memory layer 1 of 4, r = 2
    ids = torch.randint(0, 256, (2, 16))
    ids[:, 0] = 257  # <bos> first (Gemma's backbone puts one ahead of a window without it)
    frozen = model.backbone(ids)
    rope = model._rope(16) if model.backbone.family.rotary else None
    for block in model.sidenet.blocks:  # a block without memory is its backbone layer
        torch.testing.assert_close(block(frozen.hidden[block.layer_index], rope and rope[block.layer_index]),
                                   frozen.hidden[block.layer_index + 1], atol=1e-5, rtol=1e-5)


def test_the_memory_changes_the_logits_and_trains_the_gate(family):
    model = make_model(family, **PLAIN)
    mem = fill(model, 2)
    ids = torch.randint(0, 256, (1, 16))
    out = model(ids, memory=mem, backbone_logits=True, labels=ids)
    assert out.stats is not None and out.stats.retrieved > 0  # memory really was read
    assert (out.logits - out.backbone_logits).abs().max() > 1e-3
    out.loss.backward()
    assert model.sidenet.memory_block.gate.grad.abs().sum() > 0


def test_attention_kernels_against_naive_softmax():
    torch.manual_seed(0)
    b, h, t, k, d = 2, 4, 6, 5, 8
    q, kl, vl = torch.randn(b, h, t, d), torch.randn(b, 2, t, d), torch.randn(b, 2, t, d)
    mk, mv = torch.randn(b, h, t, k, d), torch.randn(b, h, t, k, d)
    mask = torch.rand(b, h, t, k) > 0.3
    mask[0, 0, 0] = False  # a token without memory
    local, llse = local_attention_lse(q, kl, vl, 0.3)
    torch.testing.assert_close(local, local_attention(q, kl, vl, 0.3), atol=1e-5, rtol=1e-5)
    mem, mlse, _ = memory_attention(q, mk, mv, mask, 0.3)
    joint, share = joint_fusion(local, llse, mem, mlse)
    # naive: one softmax over [causal local keys ; real memory keys]
    klx, vlx = kl.repeat_interleave(2, 1), vl.repeat_interleave(2, 1)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                keys = torch.cat([klx[bi, hi, : ti + 1], mk[bi, hi, ti][mask[bi, hi, ti]]])
                vals = torch.cat([vlx[bi, hi, : ti + 1], mv[bi, hi, ti][mask[bi, hi, ti]]])
                p = torch.softmax(keys @ q[bi, hi, ti] * 0.3, 0)
                torch.testing.assert_close(joint[bi, hi, ti], p @ vals, atol=1e-5, rtol=1e-5)
                torch.testing.assert_close(share[bi, hi, ti], p[ti + 1 :].sum(), atol=1e-5, rtol=1e-5)
    gate = torch.tensor([0.0, 1.0, -1.0, 2.0])
    fused = gated_fusion(local, mem, mlse, gate)
    g = torch.sigmoid(gate)[1]
    torch.testing.assert_close(fused[1, 1], (1 - g) * local[1, 1] + g * mem[1, 1])
    torch.testing.assert_close(fused[0, 0, 0], local[0, 0, 0])  # no memory -> local only


def test_shared_group_retrieval_equals_repeated_entries():
    torch.manual_seed(1)
    q = torch.randn(2, 4, 5, 8)
    keys, values = torch.randn(2, 2, 5, 6, 8), torch.randn(2, 2, 5, 6, 8)
    mask = torch.rand(2, 2, 5, 6) > 0.2
    shared = memory_attention(q, keys, values, mask, 0.5)
    repeated = memory_attention(q, keys.repeat_interleave(2, 1), values.repeat_interleave(2, 1),
                                mask.repeat_interleave(2, 1), 0.5)
    for a, b in zip(shared, repeated):
        torch.testing.assert_close(a, b)


def test_every_retrieval_backend_reads_the_memory(family):
    for retrieval in ("torch", "faiss"):
        model = make_model(family, retrieval=retrieval, **PLAIN)
        mem = fill(model, 2)
        out = model(torch.randint(0, 256, (1, 16)), memory=mem, backbone_logits=True)
        assert out.stats.retrieved > 0, retrieval


def test_true_positions_place_keys_at_their_real_distance():
    """Memory attention with 'true' positions == local RoPE attention at the same distances."""
    from longmem.model.families import apply_rope

    model = make_model("llama")
    fam, hf = model.backbone.family, model.backbone.model
    torch.manual_seed(5)
    q, k = torch.randn(1, 4, 1, 8), torch.randn(1, 4, 1, 3, 8)
    qpos, kpos = torch.tensor([[40]]), torch.tensor([[[[3, 17, 39]]]]).expand(1, 4, 1, 3)
    ctx = model._context(None, qpos)
    placed = model.sidenet.memory_block.place(k, kpos, ctx)
    scores = torch.einsum("bhtd,bhtkd->bhtk", q, placed)
    cq, sq = fam.rope_cos_sin(hf, qpos, torch.float32)
    ck, sk = fam.rope_cos_sin(hf, kpos, torch.float32)
    ref = torch.einsum("bhtd,bhtkd->bhtk", apply_rope(q, cq[:, None], sq[:, None]), apply_rope(k, ck, sk))
    torch.testing.assert_close(scores, ref, atol=1e-4, rtol=1e-4)


def test_absolute_search_compares_rotated_keys_and_queries():
    from longmem.model.families import apply_rope

    model = make_model("llama", chunk_size=1, topk=4, sink_tokens=0, **PLAIN)
    mem = fill(model, 2)
    keys, _, pos = mem.row_chunks(0)  # [Hkv,n,1,Dh], [n,1]
    cos, sin = model.backbone.family.rope_exact(model.backbone.model, pos[:, 0], torch.float32)
    torch.testing.assert_close(mem.row_chunk_keys(0).float(), apply_rope(keys[:, :, 0].float(), cos, sin))
    # rotated dot products depend only on the distance: shifting every position leaves scores unchanged
    q = torch.randn(4, 8)
    c1, s1 = model.backbone.family.rope_exact(model.backbone.model, torch.tensor([100, 37]), torch.float32)
    c2, s2 = model.backbone.family.rope_exact(model.backbone.model, torch.tensor([100000, 99937]), torch.float32)
    a = apply_rope(q, c1[0], s1[0]) @ apply_rope(q, c1[1], s1[1]).T
    b = apply_rope(q, c2[0], s2[0]) @ apply_rope(q, c2[1], s2[1]).T
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("with_past", [False, "partial", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lse_kernel_matches_the_differentiable_path(with_past, dtype):
    torch.manual_seed(0)
    b, h, t, p, d = 2, 6, 7, 5, 16
    q, k, v = (torch.randn(b, n, t, d, dtype=dtype) for n in (h, 2, 2))
    past = None
    if with_past:
        valid = torch.rand(b, p) > 0.3 if with_past == "partial" else torch.ones(b, p, dtype=torch.bool)
        past = (torch.randn(b, 2, p, d, dtype=dtype), torch.randn(b, 2, p, d, dtype=dtype), valid)
    with torch.no_grad():  # fused kernel
        out, lse = local_attention_lse(q, k, v, 0.25, past)
    qg = q.clone().requires_grad_(True)  # explicit path (autograd needs the lse gradient)
    ref, ref_lse = local_attention_lse(qg, k, v, 0.25, past)
    tol = 1e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out.float(), ref.detach().float(), atol=tol, rtol=tol)
    torch.testing.assert_close(lse, ref_lse.detach(), atol=tol, rtol=tol)
    assert ref_lse.requires_grad and not lse.requires_grad


def test_split_past_kernel_equals_one_masked_softmax():
    torch.manual_seed(1)
    b, h, t, p, d = 2, 6, 9, 11, 16
    q, k, v = (torch.randn(b, n, t, d) for n in (h, 2, 2))
    past = (torch.randn(b, 2, p, d), torch.randn(b, 2, p, d), torch.ones(b, p, dtype=torch.bool))
    out, lse = split_past_attention(q, past[0], past[1], k, v, 0.25)
    keys, values = torch.cat([past[0], k], 2).repeat_interleave(3, 1), torch.cat([past[1], v], 2).repeat_interleave(3, 1)
    scores = q @ keys.transpose(-1, -2) * 0.25  # [B,H,T,P+T]
    allowed = torch.cat([torch.ones(t, p, dtype=torch.bool), torch.ones(t, t, dtype=torch.bool).tril()], 1)
    scores = scores.masked_fill(~allowed, float("-inf"))
    torch.testing.assert_close(lse, scores.logsumexp(-1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out, scores.softmax(-1) @ values, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(local_attention(q, k, v, 0.25, past), out, atol=1e-5, rtol=1e-5)


def test_delta_streams_in_one_batch_equal_two_separate_calls():
    model = make_model("llama", trained=True)
    mem = fill(model, 3)
    sn, seen = model.sidenet, {}
    batched = sn.forward
    sn.forward = lambda hidden, rope, ctx, caches=None: seen.update(args=(hidden, rope, ctx)) or batched(hidden, rope, ctx)
    model(torch.randint(0, 256, (1, model.config.segment_length)), memory=mem)
    hidden, rope, ctx = seen["args"]
    later = sn.blocks[1]
    assert ctx.past(later.layer_index) is not None  # the later block reads the short-term tier
    x = hidden[sn.memory_block.layer_index]
    with torch.no_grad():
        local, fused, _ = sn.memory_block.attend(x, rope[sn.memory_block.layer_index], ctx)
        delta = sn.memory_block.finish(x, fused) - sn.memory_block.finish(x, local) + sn.style(x)
        h, past = hidden[later.layer_index], ctx.past(later.layer_index)  # the two streams one after the other
        delta = later(h + delta, rope[later.layer_index], past) - later(h, rope[later.layer_index], past)
        got, _ = batched(hidden, rope, ctx)
    assert delta.abs().max() > 1e-3  # the memory changes the later block's output
    torch.testing.assert_close(got, sn.norm(hidden[-1] + delta), atol=1e-5, rtol=1e-5)
