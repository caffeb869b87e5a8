"""Incremental decoding and fast reading against their slow twins (the model's own forward on the whole window,
``reference.ReferenceDecoder``), for the shipped layout and the simpler ones it is built from."""

from dataclasses import replace

import pytest
import torch

from conftest import PLAIN, make_model, perturb
from longmem.errors import LongMemError
from longmem.inference.generate import Decoder
from reference import ReferenceDecoder

LAYOUTS = {
    "shipped": {},  # short-term tier (Llama), copy head with its context gate, style adapter
    "no-tier": dict(recent_tokens=0),
    "no-copy-head": dict(copy_head=False, copy_gate=False),
    "plain": PLAIN,  # the bare memory-delta SideNet
}


def trained(family="llama", layout="shipped", **config):
    """A tiny model whose SideNet is not the backbone (so memory changes the logits): every trainable weight moved."""
    model = perturb(make_model(family, **(LAYOUTS[layout] | config)))
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in model.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def filled(model, tokens=40, seed=1):
    """A memory that read ``tokens`` random tokens segment by segment."""
    memory = model.new_memory(1)
    ids = torch.randint(0, 256, (1, tokens), generator=torch.Generator().manual_seed(seed))
    t = model.config.segment_length
    for a in range(0, tokens, t):
        model.write_memory(memory, model(ids[:, a : a + t], memory=memory))
    return memory


def decoded(model, cache, window, memory, cuts):
    """window [B,N] fed through ``cache`` in pieces ending at ``cuts`` -> logits [B,N,V]."""
    pieces, a = [], 0
    for b in [*cuts, window.shape[1]]:
        pieces.append(model(window[:, a:b], memory, cache=cache).logits)
        a = b
    return torch.cat(pieces, 1)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("read_tokens", [0, 10, 40])  # empty, a partly filled tier, tier + bank
def test_incremental_logits_equal_the_full_window(family, layout, read_tokens):
    model = trained(family, layout)
    memory = filled(model, tokens=read_tokens) if read_tokens else model.new_memory(1)
    window = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    start = int(memory.end_position[0])
    positions = start + torch.arange(16)[None, :]
    with torch.no_grad():
        full = model(window, memory=memory, positions=positions).logits  # the slow twin
        cache = model.new_cache(1, start, memory=memory)
        got = decoded(model, cache, window, memory, [5, 6, 7, 8, 9, 10])  # a prompt, single tokens, a chunk
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)
    if read_tokens == 40:
        assert (full - model(window, positions=positions).logits).abs().max() > 1e-3  # the memory was read


@pytest.mark.parametrize("layout", LAYOUTS)
def test_incremental_logits_without_memory(family, layout):
    model = trained(family, layout)
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(ids, positions=torch.arange(12)[None, :].expand(2, 12)).logits
        got = decoded(model, model.new_cache(2, 0), ids, None, list(range(4, 12)))
    torch.testing.assert_close(got, full, atol=1e-4, rtol=1e-4)


def fast_and_slow(model, steps: int = 24, window: int = 12, evict: int = 4) -> list:
    """Greedy generation after a 7-token prompt over a 20-token memory, through several evictions:
    [(logits [steps+1,V], decoder)] for the cached Decoder and the ReferenceDecoder."""
    runs = []
    for cls in (Decoder, ReferenceDecoder):
        memory = filled(model, tokens=20)
        decoder = cls(model, memory, window=window, evict=evict)
        prompt = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(5))
        logits = [decoder.feed(prompt)]
        for _ in range(steps):
            logits.append(decoder.feed(torch.tensor([int(logits[-1].argmax())])))
        runs.append((torch.stack(logits), decoder))
    return runs


@pytest.mark.parametrize("layout", LAYOUTS)
def test_sliding_window_matches_re_running_the_window(family, layout):
    """Through several evictions: same logits every step, same tokens, same memory (bank, tier, token log)."""
    model = trained(family, layout)
    (fast, a), (slow, b) = fast_and_slow(model)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.window_ids, b.window_ids)
    assert int(a.memory.end_position[0]) == int(b.memory.end_position[0]) == 20 + 7 + 24 - a.window_ids.numel()
    for x, y in zip(a.memory.row_chunks(0), b.memory.row_chunks(0)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.memory.row_chunk_keys(0), b.memory.row_chunk_keys(0), atol=1e-5, rtol=1e-5)
    if a.memory.recent is not None:
        for name, x in a.memory.recent.state().items():
            torch.testing.assert_close(x, b.memory.recent.state()[name], atol=1e-5, rtol=1e-5)
    if model.config.copy_head:  # the copy head reads the ids and keys of evicted tokens as the slow twin writes them
        assert torch.equal(a.memory.token_log.ids, b.memory.token_log.ids)
        assert int(a.memory.token_log.end[0]) == int(a.memory.end_position[0])  # generated tokens are logged too
        torch.testing.assert_close(a.memory.token_log.keys.float(), b.memory.token_log.keys.float(), atol=1e-2, rtol=0)


@pytest.mark.parametrize("evict", [16, 8])  # the whole window (the default with a tier), or part of it
def test_sliding_window_with_a_tier_matches_re_running_the_window(evict):
    model = trained("llama")
    (fast, a), (slow, b) = fast_and_slow(model, steps=40, window=16, evict=evict)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert a.memory.num_tokens() > 0 and a.memory.num_tokens() == b.memory.num_tokens()
    for name, x in a.memory.recent.state().items():
        torch.testing.assert_close(x, b.memory.recent.state()[name], atol=1e-5, rtol=1e-5)


def test_evicted_tokens_enter_memory_as_reading_writes_them():
    """Tokens leaving the window are stored like a segment read by the reader (sink excluded)."""
    model = trained(layout="plain")
    memory = model.new_memory(1)
    ids = torch.randint(0, 256, (20,))
    decoder = Decoder(model, memory, window=12, evict=8)
    decoder.feed(ids)  # 12 fit, then 8 leave, then 8 more
    reference = model.new_memory(1)
    out = model(ids[None, :12], memory=reference)
    model.write_memory(reference, out, valid=torch.arange(12)[None, :] < 8)
    _, _, positions = memory.row_chunks(0)
    assert positions.flatten().tolist() == list(range(1, 7))  # token 0 is the window's sink
    for x, y in zip(memory.row_chunks(0), reference.row_chunks(0)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)


def test_copy_on_write_leaves_the_given_memory_alone():
    model = trained()
    memory = filled(model, tokens=20)
    before = [t.clone() for t in memory.row_chunks(0)]
    decoder = Decoder(model, memory, window=8, evict=4, copy_on_write=True)
    decoder.feed(torch.randint(0, 256, (30,)))
    assert decoder.memory is not memory and decoder.memory.num_tokens() > memory.num_tokens()
    for x, y in zip(before, memory.row_chunks(0)):
        assert torch.equal(x, y)
    assert int(memory.end_position[0]) == 20


def test_decode_refuses_a_memory_changed_under_it_and_window_overflow():
    model = trained()
    memory = filled(model, tokens=20)
    cache = model.new_cache(1, 20, capacity=8, memory=memory)
    model(torch.randint(0, 256, (1, 4)), memory, cache=cache)
    model.write_memory(memory, model(torch.randint(0, 256, (1, 16)), memory=memory))
    with pytest.raises(LongMemError, match="memory changed"):
        model(torch.randint(0, 256, (1, 1)), memory, cache=cache)
    cache = model.new_cache(1, 0, capacity=8)
    with pytest.raises(LongMemError, match="do not fit"):
        model(torch.randint(0, 256, (1, 9)), None, cache=cache)
    with pytest.raises(LongMemError, match="native context"):
        model.new_cache(1, 0, capacity=10_000)


def test_memory_kv_equals_the_full_backbone_pass(family):
    model = make_model(family)
    ids = torch.randint(0, 256, (2, 16))
    out = model.backbone(ids)
    keys, values, match = model.backbone.memory_kv(ids, 1)
    torch.testing.assert_close(match, model.backbone.keys_at(out.hidden[1], 1))
    assert torch.equal(keys, out.mem_keys) and torch.equal(values, out.mem_values)


@pytest.mark.parametrize("layout", ["shipped", "plain"])
def test_fast_reading_fills_the_same_memory_as_the_reader(family, layout):
    from longmem.inference.reader import read
    from longmem.inference.session import read_into

    model = trained(family, layout)
    ids = torch.randint(0, 256, (150,))  # more than the 64-token capacity: eviction too
    slow = read(model, ids, model.new_memory(1))
    fast = model.new_memory(1)
    read_into(model, ids, fast, start=0)
    for x, y in zip(fast.row_chunks(0), slow.row_chunks(0)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(fast.row_chunk_keys(0), slow.row_chunk_keys(0), atol=1e-6, rtol=1e-6)
    if fast.recent is not None:
        for name, x in fast.recent.state().items():
            torch.testing.assert_close(x, slow.recent.state()[name], atol=1e-6, rtol=1e-6)
    if fast.token_log is not None:
        assert torch.equal(fast.token_log.ids, slow.token_log.ids)
    assert torch.equal(fast.end_position, slow.end_position) and torch.equal(fast.pending_count, slow.pending_count)


def test_growing_cache_layer_equals_hf_dynamic_layer_through_growth():
    """The decode cache's layers hold what HF's concatenating DynamicLayer holds, after updates that
    outgrow the first allocation, and the views they return are not overwritten by later updates."""
    from transformers.cache_utils import DynamicLayer

    from longmem.model.hf_cache import GrowingLayer

    grow, ref = GrowingLayer(capacity=3), DynamicLayer()
    gen = torch.Generator().manual_seed(0)
    seen = []
    for t in (2, 1, 1, 5, 1):
        k, v = torch.randn(1, 2, t, 4, generator=gen), torch.randn(1, 2, t, 4, generator=gen)
        got, want = grow.update(k, v), ref.update(k.clone(), v.clone())
        seen.append((got, [x.clone() for x in want]))
        assert grow.get_seq_length() == ref.get_seq_length()
    for got, want in seen:
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_the_style_adapter_acts_without_memory():
    model = trained(layout="no-tier")
    window = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    backbone = model.backbone.logits(model.backbone(window).hidden[-1])
    model.copy_head_enabled = False  # the SideNet's own logits
    assert (model(window).logits - backbone).abs().max() > 1e-3
    model.sidenet.style = None
    assert (model(window).logits - backbone).abs().max() < 1e-5  # without it an empty memory is the backbone


def test_fresh_parts_added_to_a_saved_sidenet_change_nothing(tmp_path):
    """A style adapter, a copy head's context gate start at zero: loading a SideNet without them into a
    layout with them gives the same logits, with and without memory."""
    from longmem.model.longmem import LongMemModel

    plain = trained(layout="plain", copy_head=True)
    plain.save_pretrained(tmp_path / "plain")
    richer = LongMemModel.from_backbone(tmp_path / "plain", plain.backbone,
                                        config=replace(plain.config, style_rank=4, copy_gate=True))
    assert richer.sidenet.style is not None and richer.sidenet.copy_head.context is not None
    memory = filled(plain)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    for mem in (None, memory):
        torch.testing.assert_close(richer(ids, memory=mem).logits, plain(ids, memory=mem).logits)
    with pytest.raises(LongMemError, match="style_rank"):
        make_model("llama", style_rank=-1)
    with pytest.raises(LongMemError, match="copy_gate"):
        make_model("llama", copy_head=False, copy_gate=True)


READS = ("item", "tolist", "__int__", "__bool__", "__float__", "__index__")  # a tensor's value to the host


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_decoding_reads_nothing_back_per_token(family, monkeypatch):
    """The per-token loop reads no tensor value back to the host (on a GPU each read waits for the device):
    with a bank, a short-term tier (Llama), exact and keyed matches, feeding one token at a time through a
    decode window calls none of the methods that hand a tensor's value to Python. Sampling's one read is the
    caller's (``sample``); evicting (a write) may read. The counter is checked to count: a read is seen."""
    model = trained(family)
    memory = filled(model, tokens=64)
    decoder = Decoder(model, memory, window=32, evict=8)
    ids = torch.randint(0, 256, (24,), generator=torch.Generator().manual_seed(5))
    decoder.feed(ids[:4])  # the window's first tokens (a new window may read its start once)
    reads = []
    for name in READS:
        method = getattr(torch.Tensor, name)

        def counted(self, *args, _method=method, _name=name, **kwargs):
            reads.append(_name)
            return _method(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    for t in range(4, 24):
        logits = decoder.feed(ids[t : t + 1])
    assert reads == [], f"{len(reads)} reads in 20 decoded tokens: {sorted(set(reads))}"
    int(logits.argmax())
    assert reads == ["__int__"]
