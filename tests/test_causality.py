"""Causality and row isolation of the layout we ship (and the bare SideNet it is built from).

The texts draw from 8 token ids, so that 3-token repeats are everywhere: the copy head's exact matches then
fire inside the segment being read as well as in memory, and a leak from a later token would show.
"""

import pytest
import torch

from conftest import PLAIN, make_model

LAYOUTS = {"shipped": {}, "plain": PLAIN}


def model_of(family, layout, **config):
    return make_model(family, trained=True, **(LAYOUTS[layout] | config))


def text(n, rows=1, seed=0):
    return torch.randint(0, 8, (rows, n), generator=torch.Generator().manual_seed(seed))


def read(model, ids, batch=1):
    """Read ids [B,N] segment by segment with memory; return per-segment logits and the bank."""
    mem = model.new_memory(batch)
    logits, t = [], model.config.segment_length
    for a in range(0, ids.shape[1], t):
        out = model(ids[:, a : a + t], memory=mem)
        logits.append(out.logits)
        model.write_memory(mem, out)
    return logits, mem


@pytest.mark.parametrize("layout", LAYOUTS)
def test_later_tokens_never_change_earlier_logits(family, layout):
    """Within a segment (local attention, the copy head's matches in the context) and across segments
    (tier, bank, token log): a changed token changes nothing before it and something after it."""
    model = model_of(family, layout)
    ids = text(80)
    base, _ = read(model, ids)
    changed = ids.clone()
    changed[0, 40] = (changed[0, 40] + 1) % 8  # segment 2 (tokens 32..47), position 8
    new, _ = read(model, changed)
    for s in range(2):
        torch.testing.assert_close(new[s], base[s], rtol=0, atol=0)
    torch.testing.assert_close(new[2][:, :8], base[2][:, :8], rtol=0, atol=0)
    assert (new[2][:, 8:] - base[2][:, 8:]).abs().max() > 0
    assert (new[4] - base[4]).abs().max() > 0  # the change reaches later segments via memory


@pytest.mark.parametrize("layout", LAYOUTS)
def test_segment_never_retrieves_its_own_or_later_keys(family, layout):
    model = model_of(family, layout)
    mem = model.new_memory(2)
    t = model.config.segment_length
    for s in range(5):
        ids = text(t, rows=2, seed=s)
        q = torch.randn(2, model.backbone.attn_shape.num_heads, t, model.backbone.attn_shape.head_dim)
        found = mem.retrieve(q, model.config.chunks_per_query)
        if found is not None:
            assert (found.positions[found.mask] < s * t).all()
        model.write_memory(mem, model(ids, memory=mem))
        if mem.count[0] > 0:
            _, _, pos = mem.row_chunks(0)
            assert pos.max() < (s + 1) * t  # memory holds only text read so far
        if mem.token_log is not None:
            assert int(mem.token_log.end[0]) == (s + 1) * t  # so does the copy head's log


@pytest.mark.parametrize("layout", LAYOUTS)
def test_rows_never_see_each_others_text(family, layout):
    model = model_of(family, layout)
    a, b = text(64, seed=1), text(64, seed=2)
    alone, _ = read(model, a)
    together, _ = read(model, torch.cat([a, b]), batch=2)
    for s in range(4):
        torch.testing.assert_close(together[s][:1], alone[s], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_reset_row_reads_like_a_new_document(layout):
    model = model_of("llama", layout)
    a, b = text(48, rows=2, seed=3), text(32, rows=2, seed=4)
    _, mem = read(model, a, batch=2)
    mem.reset([0])
    fresh, _ = read(model, b[:1])
    t = model.config.segment_length
    positions = torch.stack([torch.arange(t), 48 + torch.arange(t)])  # row 0 starts again at 0
    got = model(b[:, :t], memory=mem, positions=positions).logits
    torch.testing.assert_close(got[:1], fresh[0], atol=1e-5, rtol=1e-5)


def test_sink_tokens_stay_out_of_memory():
    model = make_model("llama", sink_tokens=2, **PLAIN)
    mem = model.new_memory(1)
    t = model.config.segment_length
    for _ in range(2):
        model.write_memory(mem, model(torch.randint(0, 256, (1, t)), memory=mem))
    _, _, pos = mem.row_chunks(0)
    stored = set(pos.flatten().tolist()) | set(mem.pending_positions[0, : int(mem.pending_count[0])].tolist())
    assert stored == set(range(2 * t)) - {0, 1, t, t + 1}


def test_reader_fills_memory_like_a_manual_loop():
    from longmem.inference.reader import read as stream

    model = make_model("llama", trained=True)
    ids = torch.randint(0, 256, (50,))
    mem = stream(model, ids, model.new_memory(1))
    _, manual = read(model, ids[None, :])
    assert torch.equal(mem.row_chunks(0)[2], manual.row_chunks(0)[2])
    assert torch.equal(mem.token_log.ids, manual.token_log.ids)
    assert int(mem.end_position[0]) == 50


def test_sliding_window_equals_segments_when_stride_is_the_window():
    from longmem.inference.reader import perplexity, sliding_window_perplexity

    model = make_model("llama")
    ids = torch.randint(0, 256, (65,))  # whole segments: the last one is not shorter
    seg = perplexity(model, ids, mode="backbone")
    win = sliding_window_perplexity(model, ids, window=16, stride=16)
    assert win.tokens == seg.tokens == 64
    assert abs(win.nll - seg.nll) < 1e-5
    wide = sliding_window_perplexity(model, ids, window=32, stride=8)
    full = sliding_window_perplexity(model, ids, window=128, stride=128)  # one pass, full context
    assert wide.tokens == full.tokens == 64 and abs(wide.nll - full.nll) > 1e-6
