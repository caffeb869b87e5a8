"""The copy head: token log, pointer distribution, mixing, loading, memory save/load."""

import pytest
import torch

from conftest import PLAIN, make_model

HEAD = dict(recent_tokens=0, style_rank=0)  # the copy head (with its context gate) on the bare SideNet
from longmem.errors import LongMemError
from longmem.memory import load_memory, save_memory
from longmem.memory.token_log import TokenLog


def test_token_log_ring_lookup_and_reset():
    log = TokenLog(2, span=8)
    log.note(torch.arange(100, 112).view(1, 12).repeat(2, 1), torch.arange(12).view(1, 12).repeat(2, 1),
             valid=torch.tensor([[True] * 12, [True] * 6 + [False] * 6]))
    got = log.lookup(torch.tensor([[3, 4, 11, 12, -1], [3, 5, 6, 11, 0]]))
    assert got.tolist() == [[-1, 104, 111, -1, -1], [103, 105, -1, -1, 100]]  # row 0: 0..3 fell out of the ring
    log.reset([0])
    assert log.lookup(torch.tensor([[5], [5]])).tolist() == [[-1], [105]]


def read_text(model, ids, seg=16):
    mem = model.new_memory(1)
    for a in range(0, ids.shape[1], seg):
        model.write_memory(mem, model(ids[:, a : a + seg], memory=mem))
    return mem


def test_copy_head_leaves_an_empty_memory_alone_and_normalises():
    torch.manual_seed(0)
    plain = make_model("llama", **PLAIN)
    model = make_model("llama", **HEAD)
    model.sidenet.load_state_dict(plain.sidenet.state_dict(), strict=False)
    ids = torch.randint(0, 256, (1, 16))  # no 3-token repeat inside it: nothing to copy without a memory
    torch.testing.assert_close(model(ids, memory=model.new_memory(1)).logits, plain(ids).logits.log_softmax(-1),
                               atol=1e-5, rtol=1e-5)
    mem = read_text(model, torch.randint(0, 256, (1, 64)))
    assert mem.token_log is not None and not mem.is_empty
    logp = model(ids, memory=mem).logits  # log-probabilities of the mixture
    torch.testing.assert_close(logp.logsumexp(-1), torch.zeros(1, 16), atol=1e-4, rtol=0)
    ref_mem = read_text(plain, torch.randint(0, 256, (1, 64)))
    assert ref_mem.token_log is None


def test_token_log_matches_keys_across_the_ring():
    torch.manual_seed(4)
    log = TokenLog(1, span=8, num_kv_heads=2, head_dim=4)
    keys = torch.randn(1, 2, 12, 4)
    log.note(torch.arange(100, 112)[None], torch.arange(12)[None], keys=keys)
    sims, pos = log.match(keys[:, :, [5, 11, 2]], 3)
    assert pos[0, :, 0, 0].tolist() == [5, 5] and pos[0, :, 1, 0].tolist() == [11, 11]  # itself, best
    assert (sims[0, :, :2, 0] > 0.995).all()  # logged in bf16
    assert not (pos[0, :, 2] == 2).any() and (pos[pos >= 0] >= 4).all()  # position 2 left the ring
    assert (sims[..., :-1] >= sims[..., 1:]).all()  # best first


def test_the_copy_head_predicts_a_repeated_passage_from_memory():
    torch.manual_seed(1)
    model = make_model("llama", **HEAD)
    text = torch.randint(0, 256, (1, 64))
    mem = read_text(model, text)
    again = text[:, 16:32]  # a segment read before, in the same local context: identical keys
    with torch.no_grad():
        model.sidenet.copy_head.offset.fill_(30.0)  # trust the pointer fully
        out = model(again, memory=mem)
    ptr, best = model.sidenet.copy_head.pointer(out.match_keys, mem.token_log, out.logits.shape[-1])
    assert (best > 0.995).all()  # keys are logged in bf16
    assert torch.equal(ptr[0].argmax(-1), text[0, 17:33])  # the token after each source
    assert torch.equal(out.logits[0].argmax(-1), text[0, 17:33])
    assert (out.logits[0].exp().gather(-1, text[0, 17:33, None]) > 0.5).all()


def test_the_copy_head_can_be_switched_off_at_inference():
    """copy_head_enabled = False (the ablation switch): the SideNet's own logits, in a forward pass and
    in incremental decoding, as if the model had no copy head."""
    torch.manual_seed(1)
    model = make_model("llama", **HEAD)
    text = torch.randint(0, 256, (1, 64))
    mem = read_text(model, text)
    again = text[:, 16:32]
    with torch.no_grad():
        model.sidenet.copy_head.offset.fill_(30.0)
        mixed = model(again, memory=mem).logits
        model.copy_head_enabled = False
        off = model(again, memory=mem).logits
        cache = model.new_cache(1, mem.end_position, memory=mem)
        steps = torch.cat([model(again[:, i : i + 1], mem, cache=cache).logits for i in range(again.shape[1])], 1)
        head, model.sidenet.copy_head = model.sidenet.copy_head, None
        plain = model(again, memory=mem).logits
        model.sidenet.copy_head = head
    assert not torch.allclose(mixed.log_softmax(-1), off.log_softmax(-1), atol=1e-2)
    torch.testing.assert_close(off, plain)
    torch.testing.assert_close(steps, off, atol=2e-3, rtol=1e-3)


def test_copy_head_memory_saves_and_loads_its_token_ids(tmp_path):
    model = make_model("llama", **HEAD)
    mem = read_text(model, torch.randint(0, 256, (1, 64)))
    save_memory(mem, tmp_path / "m")
    back = load_memory(tmp_path / "m")
    assert back.token_log is not None and torch.equal(back.token_log.ids, mem.token_log.ids)
    assert torch.equal(back.token_log.keys, mem.token_log.keys)
    ids = torch.randint(0, 256, (1, 16))
    torch.testing.assert_close(model(ids, memory=back).logits, model(ids, memory=mem).logits)


def test_a_sidenet_without_copy_head_loads_with_a_fresh_one(tmp_path):
    from longmem.model.longmem import LongMemModel

    plain = make_model("llama", **PLAIN)
    plain.save_pretrained(tmp_path / "s")
    model = LongMemModel.from_backbone(tmp_path / "s", plain.backbone, plain.tokenizer,
                                       config=__import__("dataclasses").replace(plain.config, copy_head=True))
    assert model.sidenet.copy_head is not None
    with pytest.raises(Exception, match="do not fit"):  # and a copy head's weights do not load without one
        model.save_pretrained(tmp_path / "p")
        LongMemModel.from_backbone(tmp_path / "p", plain.backbone, plain.tokenizer, config=plain.config)


def test_copy_head_trains():
    torch.manual_seed(2)
    model = make_model("llama", **HEAD)
    mem = read_text(model, torch.randint(0, 256, (1, 64)))
    ids = torch.randint(0, 256, (1, 16))
    out = model(ids, memory=mem, labels=ids)
    out.loss.backward()
    head = model.sidenet.copy_head
    for param in (head.agree, head.slope, head.offset, head.sharpness):
        assert param.grad is not None and param.grad.abs().sum() > 0


def test_a_row_with_an_empty_log_gets_finite_gradients():
    torch.manual_seed(3)
    model = make_model("llama", **HEAD)
    mem = model.new_memory(2)
    text = torch.randint(0, 256, (2, 32))
    for a in range(0, 32, 16):
        model.write_memory(mem, model(text[:, a : a + 16], memory=mem))
    mem.reset([1])  # row 1 starts a new document: nothing to match
    ids = torch.randint(0, 256, (2, 16))
    out = model(ids, memory=mem, labels=ids)
    out.loss.backward()
    for param in model.sidenet.copy_head.parameters():
        assert torch.isfinite(param.grad).all()
    assert torch.isfinite(out.logits).all()


def test_sparse_mixing_equals_the_dense_mixture():
    torch.manual_seed(2)
    model = make_model("llama", **(HEAD | dict(copy_gate=False)))
    text = torch.randint(0, 16, (1, 64))  # a small alphabet: candidates repeat ids, exact matches abound
    mem = read_text(model, text)
    head = model.sidenet.copy_head
    with torch.no_grad():
        head.offset.fill_(1.0)
        head.keyed_bias.fill_(0.0)  # keyed matches trusted at 0.5 where there is one
        out = model(text[:, 8:24], memory=mem)
        ids, w, best, run, _ = head.candidates(out.match_keys, mem.token_log)
        ptr, _ = head.pointer(out.match_keys, mem.token_log, 256)
        torch.testing.assert_close(ptr.sum(-1), w.sum(-1))
        logits = torch.randn(1, 16, 256)
        lam = torch.sigmoid(head.slope * (best - 0.95) / 0.05 + head.agree * ptr.amax(-1) + head.run * run
                            + head.offset)[..., None]
        keys = (1 - lam * ptr.sum(-1, keepdim=True)) * logits.softmax(-1) + lam * ptr
        context = (text[:, 8:24], 64 + torch.arange(16)[None])
        ids_n, w_n, lam_n = head.exact(mem.token_log, context, logits.log_softmax(-1))
        assert (lam_n > 0).any()  # the exact source is at work too
        exact = torch.zeros(1, 16, 256).scatter_add(-1, ids_n, w_n)
        ids_k, w_k, lam_k = head.keyed_source(mem.token_log, context, 16)
        assert (lam_k > 0.1).any()  # and the keyed one
        keyed = torch.zeros(1, 16, 256).scatter_add(-1, ids_k, w_k)
        dense = torch.log((1 - lam_k[..., None]) * ((1 - lam_n[..., None]) * keys + lam_n[..., None] * exact)
                          + lam_k[..., None] * keyed)
        torch.testing.assert_close(head(logits, out.match_keys, mem.token_log, context=context), dense,
                                   atol=1e-3, rtol=1e-4)


def test_a_match_that_continues_the_previous_one_wins():
    torch.manual_seed(5)
    log = TokenLog(1, span=32, num_kv_heads=1, head_dim=8)
    keys = torch.randn(1, 1, 12, 8)
    keys[:, :, 9] = keys[:, :, 3]  # position 3's look-alike at 9, with another successor
    log.note(torch.arange(100, 112)[None], torch.arange(12)[None], keys=keys)
    from longmem.model.copy_head import CopyHead
    head = CopyHead(1, topk=2)
    with torch.no_grad():
        head.sharpness.fill_(0.0)  # similarity alone cannot choose between 3 and 9
        before = head.candidates(keys[:, :, 2:3], log).positions  # position 2's matches
        ids, w, *_ = head.candidates(keys[:, :, 3:4], log, history=before)  # after position 2's twin
    assert ids[0, 0, w[0, 0].argmax()].item() == 104  # the successor of 3, which follows 2


def test_runs_count_consecutive_matches_up_to_the_cap():
    from longmem.model.copy_head import RUN, _runs
    top = torch.tensor([[[10, 11, 12, 13, 14, 15, 3, 4, -1, 0, 1]]])
    assert _runs(top)[0, 0].tolist() == [0, 1, 2, 3, 4, 4, 0, 1, 0, 0, 1]
    assert RUN == 4


def _brute_matches(seq, end, lo, q, n, m, long, local=False):
    """Reference: the m most recent log positions p (p + 1 < end; with ``local``: context positions
    end <= p < q) whose suffix equals q's for >= n (and >= long) tokens, lengths capped at MAX_LEN."""
    from longmem.memory.suffix import MAX_LEN

    def length(p):
        k = 0
        while k < MAX_LEN and p - k >= lo and q - k >= 0 and seq[p - k] == seq[q - k]:
            k += 1
        return k

    found = {}
    for need in (n, long):
        span = range(q - 1, end - 1, -1) if local else range(end - 2, lo - 1, -1)
        hits = [p for p in span if length(p) >= need][:m]
        found.update({p: length(p) for p in hits})
    return found


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_suffix_matches_equal_a_brute_force_search(seed):
    from longmem.memory.suffix import suffix_matches

    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(0, 3, (120,), generator=g)  # 3 symbols: many matches of every length
    seq[90:110] = seq[20:40]  # and one long repeat
    other = torch.randint(0, 3, (120,), generator=g)  # a second row reads another text
    both = torch.stack([seq, other])
    log = TokenLog(2, span=64)
    log.note(both[:, :80], torch.arange(80)[None].repeat(2, 1))  # the ring keeps 16..79
    pos, length, nxt, local = suffix_matches(log, both[:, 80:], torch.arange(80, 120)[None].repeat(2, 1), 40,
                                             n=2, m=3)
    for row, text in enumerate((seq, other)):
        for i, q in enumerate(range(80, 120)):
            for in_context in (False, True):
                sel = local[row, i] == in_context
                got = {int(p): int(k) for p, k in zip(pos[row, i][sel], length[row, i][sel]) if p >= 0}
                assert got == _brute_matches(text.tolist(), 80, 16, q, 2, 3, 8, in_context), (row, q, in_context)
            hit = pos[row, i] >= 0
            assert torch.equal(nxt[row, i][hit], text[pos[row, i][hit] + 1])  # the id after each match
    assert length[0, 39 - 10].max() >= 10  # position 109 copies 39: a match of 20 tokens


def test_exact_matches_copy_a_passage_the_keys_do_not_recognise():
    torch.manual_seed(6)
    model = make_model("llama", **HEAD)
    text = torch.randint(0, 256, (1, 64))
    mem = read_text(model, text)
    again = torch.cat([torch.randint(0, 256, (1, 8)), text[:, 20:36]], 1)  # new context, then a repeat
    with torch.no_grad():
        model.sidenet.copy_head.offset.fill_(-30.0)  # the key match is switched off
        model.sidenet.copy_head.length_bias.fill_(30.0)  # exact matches are trusted fully
        out = model(again, memory=mem)
    pred = out.logits[0].argmax(-1)
    assert torch.equal(pred[10:], text[0, 23:37])  # from the third copied token on: the source's successor
    assert not torch.equal(pred[:8], text[0, 1:9])
    logp = out.logits.logsumexp(-1)
    torch.testing.assert_close(logp, torch.zeros_like(logp), atol=1e-4, rtol=0)


def test_exact_match_gate_trains_and_decoding_agrees():
    torch.manual_seed(7)
    model = make_model("llama", **HEAD)
    text = torch.randint(0, 32, (1, 64))
    mem = read_text(model, text)
    ids = torch.cat([text[:, 5:15], torch.randint(0, 32, (1, 6))], 1)
    out = model(ids, memory=mem, labels=ids)
    out.loss.backward()
    head = model.sidenet.copy_head
    assert head.length_bias.grad.abs().sum() > 0 and head.length_sharp.grad is not None
    with torch.no_grad():
        full = model(ids, memory=mem).logits
        cache = model.new_cache(1, mem.end_position, memory=mem)
        steps = torch.cat([model(ids[:, i : i + 1], mem, cache=cache).logits for i in range(ids.shape[1])], 1)
    torch.testing.assert_close(steps, full, atol=2e-3, rtol=1e-3)


def test_local_exact_matches_copy_inside_the_context_without_a_memory():
    torch.manual_seed(8)
    model = make_model("llama", **HEAD)
    part = torch.randint(0, 256, (1, 8))
    ids = torch.cat([part, torch.randint(0, 256, (1, 2)), part], 1)  # [1,18]: 8 tokens said twice
    with torch.no_grad():
        model.sidenet.copy_head.length_bias.fill_(30.0)
        for memory in (None, model.new_memory(1)):
            pred = model(ids, memory=memory).logits[0].argmax(-1)
            assert torch.equal(pred[12:17], ids[0, 13:18])  # from the third repeated token on


def test_context_gate_starts_neutral_trains_and_decoding_agrees(tmp_path):
    from dataclasses import replace

    from longmem.model.longmem import LongMemModel

    torch.manual_seed(9)
    plain = make_model("llama", **(HEAD | dict(copy_gate=False)))
    plain.save_pretrained(tmp_path / "p")  # a head without the gate gains a fresh (zero) one
    model = LongMemModel.from_backbone(tmp_path / "p", plain.backbone, plain.tokenizer,
                                       config=replace(plain.config, copy_gate=True))
    model.float()
    text = torch.randint(0, 32, (1, 64))
    mem = read_text(model, text)
    ids = torch.cat([text[:, 5:15], torch.randint(0, 32, (1, 6))], 1)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, memory=mem).logits, plain(ids, memory=read_text(plain, text)).logits)
    out = model(ids, memory=mem, labels=ids)
    out.loss.backward()
    gate = model.sidenet.copy_head.context.weight
    assert gate.grad is not None and gate.grad.abs().sum() > 0
    with torch.no_grad():
        gate.normal_(0, 0.5)  # a trained gate moves the mixture, and decoding reads it the same way
        full = model(ids, memory=mem).logits
        assert (full - plain(ids, memory=read_text(plain, text)).logits).abs().max() > 1e-3
        cache = model.new_cache(1, mem.end_position, memory=mem)
        steps = torch.cat([model(ids[:, i : i + 1], mem, cache=cache).logits for i in range(ids.shape[1])], 1)
    torch.testing.assert_close(steps, full, atol=2e-3, rtol=1e-3)
    with pytest.raises(LongMemError, match="copy_gate"):
        make_model("llama", copy_head=False, copy_gate=True)
