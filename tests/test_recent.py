"""The short-term tier: every layer's K/V of the last R tokens, read by the next segment."""

from __future__ import annotations

import pytest
import torch

from longmem.errors import LongMemError
from longmem.memory import load_memory, save_memory

from conftest import PLAIN, make_model

T = 16


def read(model, ids, memory):
    """Read ids [B,N] segment by segment -> list of outputs."""
    outs = []
    for a in range(0, ids.shape[1], T):
        out = model(ids[:, a : a + T], memory=memory, backbone_logits=True)
        model.write_memory(memory, out)
        outs.append(out)
    return outs


def banded_oracle(model, ids: torch.Tensor) -> torch.Tensor:
    """The frozen HF model on the whole text, each segment seeing itself + the previous one.

    With no sink slots and R = T this is exactly the Transformer-XL recurrence.
    """
    n = ids.shape[1]
    seg = torch.arange(n) // T
    q, k = seg[:, None], seg[None, :]
    causal = torch.arange(n)[:, None] >= torch.arange(n)[None, :]
    allowed = causal & ((q == k) | (q == k + 1))  # [N,N]
    mask = torch.zeros(n, n).masked_fill(~allowed, float("-inf"))[None, None]
    return model.backbone.model(input_ids=ids, attention_mask=mask).logits


def test_short_term_tier_equals_the_transformer_xl_recurrence():
    model = make_model("llama", recent_tokens=T, sink_tokens=0)
    ids = torch.randint(0, 256, (1, 3 * T))
    outs = read(model, ids, model.new_memory(1))
    got = torch.cat([o.backbone_logits for o in outs], 1)
    torch.testing.assert_close(got, banded_oracle(model, ids), atol=1e-4, rtol=1e-4)


def test_a_full_tier_is_read_by_the_split_kernel_with_the_same_logits(monkeypatch):
    import longmem.model.backbone as backbone

    calls = []
    real = backbone.split_past_attention
    monkeypatch.setattr(backbone, "split_past_attention", lambda *a: calls.append(a[1].shape[2]) or real(*a))
    model = make_model("llama", recent_tokens=T, sink_tokens=0)
    ids = torch.randint(0, 256, (1, 3 * T))
    with torch.no_grad():
        outs = read(model, ids, model.new_memory(1))
    assert calls and set(calls) == {T}  # segments 2 and 3 read a full tier of T slots in every layer
    got = torch.cat([o.backbone_logits for o in outs], 1)
    torch.testing.assert_close(got, banded_oracle(model, ids), atol=1e-4, rtol=1e-4)


def test_a_bare_sidenet_keeps_backbone_logits_with_the_tier_until_the_bank_is_read():
    model = make_model("llama", memory_size=16, **(PLAIN | dict(recent_tokens=T)))
    ids = torch.randint(0, 256, (2, 3 * T))
    outs = read(model, ids, model.new_memory(2))
    for out in outs:
        if out.stats is None:  # nothing retrieved from the bank: the backbone reading the tier
            assert (out.logits - out.backbone_logits).abs().max() < 1e-4
    assert outs[0].stats is None and outs[-1].stats is not None


def test_the_tier_changes_what_the_next_segment_sees():
    model = make_model("llama", recent_tokens=T)
    ids = torch.randint(0, 256, (1, 2 * T))
    other = ids.clone()
    other[0, 5] = (other[0, 5] + 1) % 256
    a = read(model, ids, model.new_memory(1))
    b = read(model, other, model.new_memory(1))
    assert (a[1].backbone_logits - b[1].backbone_logits).abs().max() > 1e-4  # earlier text matters
    empty = model(ids[:, T:], memory=None, backbone_logits=True)
    assert (a[1].backbone_logits - empty.backbone_logits).abs().max() > 1e-4


def test_rows_never_mix_and_reset_empties_a_row():
    model = make_model("llama", recent_tokens=T, memory_size=32, trained=True)
    ids = torch.randint(0, 256, (2, 3 * T))
    both = read(model, ids, model.new_memory(2))
    alone = read(model, ids[1:], model.new_memory(1))
    for x, y in zip(both, alone):
        torch.testing.assert_close(x.logits[1:], y.logits, atol=1e-4, rtol=1e-4)
    mem = model.new_memory(2)
    read(model, ids, mem)
    mem.reset([0])
    assert not mem.recent.valid[0].any() and mem.recent.valid[1].any()
    assert mem.num_tokens(0) == 0


def test_tokens_leave_the_tier_into_the_bank_and_sinks_stay():
    model = make_model("llama", recent_tokens=T, sink_tokens=1, memory_size=64)
    mem = model.new_memory(1)
    read(model, torch.randint(0, 256, (1, 3 * T)), mem)
    _, _, pos = mem.row_chunks(0)
    stored = set(pos.flatten().tolist()) | set(mem.pending_positions[0, : int(mem.pending_count[0])].tolist())
    assert stored == set(range(1, 2 * T))  # the last segment is still short-term; token 0 is a sink
    assert mem.recent.held_positions[0].tolist() == list(range(2 * T, 3 * T))
    assert mem.recent.valid[0, 0]  # the document's sink slot


def test_memory_with_a_tier_round_trips_and_refuses_another_tier(tmp_path):
    model = make_model("llama", recent_tokens=T)
    mem = model.new_memory(1)
    read(model, torch.randint(0, 256, (1, 3 * T)), mem)
    save_memory(mem, tmp_path / "m")
    back = load_memory(tmp_path / "m", expect=model.memory_meta())
    for name, value in mem.recent.state().items():
        assert torch.equal(value, back.recent.state()[name]), name
    nxt = torch.randint(0, 256, (1, T))
    torch.testing.assert_close(model(nxt, memory=mem).logits, model(nxt, memory=back).logits)
    other = make_model("llama", recent_tokens=0)
    with pytest.raises(LongMemError, match="recent_tokens"):
        load_memory(tmp_path / "m", expect=other.memory_meta())


def test_the_tier_needs_a_rotary_backbone_and_room_in_its_context():
    with pytest.raises(LongMemError, match="rotary"):
        make_model("gpt2", recent_tokens=T)
    with pytest.raises(LongMemError, match="native context"):
        make_model("llama", recent_tokens=250)
    assert make_model("gpt2", recent_tokens=None).recent_tokens == 0  # auto: off without rotary
    assert make_model("llama", recent_tokens=None).recent_tokens == T  # auto: one segment
