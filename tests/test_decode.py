"""Incremental decoding and fast reading against their slow twins (the model's own forward)."""

from dataclasses import replace

import pytest
import torch

from conftest import make_model
from longmem.inference.decode import decode, new_cache
from longmem.errors import LongMemError
from longmem.inference.generate import Decoder, ReferenceDecoder

VARIANTS = [("identity", "gated"), ("paper", "gated"), ("paper", "joint"), ("delta", "gated"), ("delta", "joint")]


def trained(family, init="paper", fusion="gated", **config):
    """A tiny model whose SideNet is not the identity (so memory changes the logits)."""
    model = make_model(family, init=init, fusion=fusion, **config)
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


@pytest.mark.parametrize("init, fusion", VARIANTS)
def test_incremental_logits_equal_the_full_window(family, init, fusion):
    model = trained(family, init, fusion)
    memory = filled(model)
    assert not memory.is_empty
    window = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    start = int(memory.end_position[0])
    full = model(window, memory=memory, positions=start + torch.arange(16)[None, :]).logits  # the slow twin
    cache = new_cache(model, 1, start, memory=memory)
    pieces = [decode(model, cache, window[:, :5], memory)]  # a prompt, then one token at a time, then a chunk
    pieces += [decode(model, cache, window[:, i : i + 1], memory) for i in range(5, 10)]
    pieces.append(decode(model, cache, window[:, 10:], memory))
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)
    assert (full - model(window, positions=start + torch.arange(16)[None, :]).logits).abs().max() > 1e-3


def test_incremental_logits_without_memory(family):
    model = trained(family)
    ids = torch.randint(0, 256, (2, 12))
    full = model(ids, positions=torch.arange(12)[None, :].expand(2, 12)).logits
    cache = new_cache(model, 2, 0)
    steps = [decode(model, cache, ids[:, :4], None)] + [decode(model, cache, ids[:, i : i + 1], None)
                                                       for i in range(4, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-4, rtol=1e-4)


def fast_and_slow(model, steps: int = 24) -> list:
    """Greedy generation after a 7-token prompt over a 20-token memory, window 12, evicting 4:
    [(logits [steps+1,V], decoder)] for the cached Decoder and the ReferenceDecoder."""
    runs = []
    for cls in (Decoder, ReferenceDecoder):
        memory = filled(model, tokens=20)
        decoder = cls(model, memory, window=12, evict=4)
        prompt = torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(5))
        logits = [decoder.feed(prompt)]
        for _ in range(steps):
            logits.append(decoder.feed(torch.tensor([int(logits[-1].argmax())])))
        runs.append((torch.stack(logits), decoder))
    return runs


@pytest.mark.parametrize("init, fusion", [("paper", "gated"), ("delta", "joint")])
def test_sliding_window_matches_re_running_the_window(family, init, fusion):
    """Through several evictions: same logits every step, same tokens, same memory."""
    model = trained(family, init, fusion)
    (fast, a), (slow, b) = fast_and_slow(model)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.window_ids, b.window_ids)
    assert int(a.memory.end_position[0]) == int(b.memory.end_position[0]) == 20 + 7 + 24 - a.window_ids.numel()
    for x, y in zip(a.memory.row_chunks(0), b.memory.row_chunks(0)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(a.memory.row_chunk_keys(0), b.memory.row_chunk_keys(0), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("ngram, local", [(0, False), (2, False), (2, True)])
def test_sliding_window_with_a_copy_head_matches_re_running_the_window(ngram, local):
    """The copy head reads the ids and keys of evicted tokens exactly as the slow twin writes them
    (and, with exact matches, the window's ids before each new token)."""
    model = trained("llama", "delta", "joint", pointer=True, pointer_ngram=ngram, pointer_local=local)
    (fast, a), (slow, b) = fast_and_slow(model)
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert torch.equal(a.memory.token_log.ids, b.memory.token_log.ids)
    assert int(a.memory.token_log.end[0]) == int(a.memory.end_position[0])  # generated tokens are logged too
    torch.testing.assert_close(a.memory.token_log.keys.float(), b.memory.token_log.keys.float(), atol=1e-2, rtol=0)


def test_evicted_tokens_enter_memory_as_reading_writes_them():
    """Tokens leaving the window are stored like a segment read by the reader (sink excluded)."""
    model = trained("llama")
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
    model = trained("llama")
    memory = filled(model, tokens=20)
    before = [t.clone() for t in memory.row_chunks(0)]
    decoder = Decoder(model, memory, window=8, evict=4, copy_on_write=True)
    decoder.feed(torch.randint(0, 256, (30,)))
    assert decoder.memory is not memory and decoder.memory.num_tokens() > memory.num_tokens()
    for x, y in zip(before, memory.row_chunks(0)):
        assert torch.equal(x, y)
    assert int(memory.end_position[0]) == 20


def test_decode_refuses_a_memory_changed_under_it_and_window_overflow():
    model = trained("llama")
    memory = filled(model, tokens=20)
    cache = new_cache(model, 1, 20, capacity=8, memory=memory)
    decode(model, cache, torch.randint(0, 256, (1, 4)), memory)
    model.write_memory(memory, model(torch.randint(0, 256, (1, 16)), memory=memory))
    with pytest.raises(LongMemError, match="memory changed"):
        decode(model, cache, torch.randint(0, 256, (1, 1)), memory)
    cache = new_cache(model, 1, 0, capacity=8)
    with pytest.raises(LongMemError, match="do not fit"):
        decode(model, cache, torch.randint(0, 256, (1, 9)), None)
    with pytest.raises(LongMemError, match="native context"):
        new_cache(model, 1, 0, capacity=10_000)


def test_memory_kv_equals_the_full_backbone_pass(family):
    model = make_model(family)
    ids = torch.randint(0, 256, (2, 16))
    out = model.backbone(ids)
    keys, values, match = model.backbone.memory_kv(ids, 1)
    torch.testing.assert_close(match, model.backbone.keys_at(out.hidden[1], 1))
    assert torch.equal(keys, out.mem_keys) and torch.equal(values, out.mem_values)


def test_fast_reading_fills_the_same_memory_as_the_reader(family):
    from longmem.inference.reader import read
    from longmem.inference.session import read_into

    model = trained(family)
    ids = torch.randint(0, 256, (150,))  # more than the 64-token capacity: eviction too
    slow = read(model, ids, model.new_memory(1))
    fast = model.new_memory(1)
    read_into(model, ids, fast, start=0)
    for x, y in zip(fast.row_chunks(0), slow.row_chunks(0)):
        assert torch.equal(x, y)
    assert torch.equal(fast.row_chunk_keys(0), slow.row_chunk_keys(0))
    assert torch.equal(fast.end_position, slow.end_position) and torch.equal(fast.pending_count, slow.pending_count)


# ---------------------------------------------------------------- with a short-term tier
def tiered(init="paper", fusion="gated"):
    """A tiny Llama whose memory keeps the last 16 tokens at every layer (a short-term tier)."""
    model = trained("llama", init, fusion, recent_tokens=16)
    assert model.new_memory(1).recent is not None
    return model


@pytest.mark.parametrize("init, fusion", [("paper", "gated"), ("delta", "joint")])
@pytest.mark.parametrize("read_tokens", [0, 10, 40])  # empty, partly filled, full tier (+ bank)
def test_incremental_logits_equal_the_full_window_with_a_tier(init, fusion, read_tokens):
    model = tiered(init, fusion)
    memory = filled(model, tokens=read_tokens) if read_tokens else model.new_memory(1)
    window = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    start = int(memory.end_position[0])
    full = model(window, memory=memory, positions=start + torch.arange(16)[None, :]).logits
    cache = new_cache(model, 1, start, memory=memory)
    pieces = [decode(model, cache, window[:, :6], memory)] + [
        decode(model, cache, window[:, i : i + 1], memory) for i in range(6, 16)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("evict", [None, 8])  # the whole window (default with a tier), or part of it
def test_sliding_window_with_a_tier_matches_re_running_the_window(evict):
    model = tiered()
    runs = []
    for cls in (Decoder, ReferenceDecoder):
        memory = filled(model, tokens=20)
        decoder = cls(model, memory, window=16, evict=evict or 16)
        logits = [decoder.feed(torch.randint(0, 256, (7,), generator=torch.Generator().manual_seed(5)))]
        for _ in range(40):
            logits.append(decoder.feed(torch.tensor([int(logits[-1].argmax())])))
        runs.append((torch.stack(logits), decoder.memory))
    (fast, a), (slow, b) = runs
    torch.testing.assert_close(fast, slow, atol=1e-4, rtol=1e-4)
    assert a.num_tokens() > 0 and a.num_tokens() == b.num_tokens()
    for x, y in zip(a.row_chunks(0), b.row_chunks(0)):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=1e-5)
    for name, x in a.recent.state().items():
        torch.testing.assert_close(x, b.recent.state()[name], atol=1e-5, rtol=1e-5)


def test_fast_reading_with_a_tier_fills_the_same_memory():
    from longmem.inference.reader import read
    from longmem.inference.session import read_into

    model = tiered()
    ids = torch.randint(0, 256, (150,))
    slow = read(model, ids, model.new_memory(1))
    fast = model.new_memory(1)
    read_into(model, ids, fast, start=0)
    for x, y in zip(fast.row_chunks(0), slow.row_chunks(0)):
        torch.testing.assert_close(x, y, atol=1e-6, rtol=1e-6)
    for name, x in fast.recent.state().items():
        torch.testing.assert_close(x, slow.recent.state()[name], atol=1e-6, rtol=1e-6)
    assert torch.equal(fast.end_position, slow.end_position)


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


@pytest.mark.parametrize("layers,width", [("memory", 0), ("all", 0), ("all", 8)])
@pytest.mark.parametrize("read_tokens", [0, 40])  # the style adapter alone, and with memory
def test_incremental_logits_with_a_style_adapter(read_tokens, layers, width):
    model = trained("llama", "delta", "joint", style_rank=4, style_layers=layers, style_width=width)
    memory = filled(model, tokens=read_tokens) if read_tokens else model.new_memory(1)
    window = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(2))
    start = int(memory.end_position[0])
    positions = start + torch.arange(16)[None, :]
    full = model(window, memory=memory, positions=positions).logits
    cache = new_cache(model, 1, start, memory=memory)
    pieces = [decode(model, cache, window[:, :6], memory)] + [
        decode(model, cache, window[:, i : i + 1], memory) for i in range(6, 16)]
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=1e-4, rtol=1e-4)
    backbone = model.backbone.logits(model.backbone(window).hidden[-1])
    assert (model(window, positions=positions).logits - backbone).abs().max() > 1e-3  # acts without memory


@pytest.mark.parametrize("layers,width", [("memory", 0), ("all", 0), ("all", 8)])
def test_a_fresh_style_adapter_changes_nothing(tmp_path, layers, width):
    from longmem.model.longmem import LongMemModel

    plain = trained("llama", "delta", "joint")
    plain.save_pretrained(tmp_path / "plain")
    styled = LongMemModel.from_backbone(tmp_path / "plain", plain.backbone,
                                        config=replace(plain.config, style_rank=4, style_layers=layers,
                                                                  style_width=width))
    assert (styled.sidenet.styles is None) == (layers == "memory")
    memory = filled(plain)
    ids = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(4))
    for mem in (None, memory):
        torch.testing.assert_close(styled(ids, memory=mem).logits, plain(ids, memory=mem).logits)
    with pytest.raises(LongMemError, match="style_rank"):
        make_model("llama", init="paper", style_rank=4)
    with pytest.raises(LongMemError, match="style_layers"):
        make_model("llama", init="delta", style_layers="all")
    with pytest.raises(LongMemError, match="style_layers"):
        make_model("llama", init="delta", style_rank=4, style_layers="every")
    with pytest.raises(LongMemError, match="style_width"):
        make_model("llama", init="delta", style_rank=4, style_width=8)
