import pytest
import torch

from longmem.errors import LongMemError
from longmem.memory import MemoryBank, load_memory, save_memory

H, D, CSZ = 2, 4, 2


def bank(capacity=8, batch=1, index="torch", dtype="float32"):
    return MemoryBank(batch, H, D, capacity, CSZ, dtype=dtype, index=index, meta={"backbone_fingerprint": "fp",
                                                                                 "memory_layer": 1})


def segment(batch, t, start):
    """Keys whose first element is the token position (easy to read back)."""
    pos = torch.arange(start, start + t).expand(batch, t)  # [B,T]
    keys = torch.randn(batch, H, t, D)
    keys[..., 0] = pos[:, None, :].float()
    return keys, keys + 0.5, pos


def test_fifo_evicts_oldest_first_and_keeps_pending_tokens():
    mem = bank(capacity=8)
    for s in range(3):  # 3 segments of 5 tokens = 15 tokens; capacity 8 = 4 chunks
        mem.write(*segment(1, 5, 5 * s))
    assert int(mem.pending_count[0]) == 1  # token 14 waits for a partner
    keys, values, pos = mem.row_chunks(0)
    assert pos.flatten().tolist() == list(range(6, 14))  # oldest (0..5) evicted first
    torch.testing.assert_close(keys[0, :, :, 0], pos.float())
    torch.testing.assert_close(values, keys + 0.5)
    assert mem.num_tokens() == 8


def test_write_larger_than_capacity_keeps_newest():
    mem = bank(capacity=4)
    mem.write(*segment(1, 11, 0))
    assert mem.row_chunks(0)[2].flatten().tolist() == [6, 7, 8, 9]


def test_keep_mask_excludes_tokens():
    mem = bank()
    keys, values, pos = segment(1, 6, 0)
    keep = torch.ones(1, 6, dtype=torch.bool)
    keep[0, 0] = False  # a sink
    mem.write(keys, values, pos, keep)
    assert 0 not in mem.row_chunks(0)[2].flatten().tolist()


def test_rows_are_independent_and_reset_empties_one_row():
    mem = bank(batch=2)
    k, v, p = segment(2, 6, 0)
    k[1] += 100.0  # row 1 has its own text
    mem.write(k, v, p)
    q = torch.randn(2, H, 3, D)
    found = mem.retrieve(q, 2)
    assert (found.keys[0] < 50).all() and (found.keys[1][found.mask[1]] > 50).all()
    mem.reset([0])
    assert mem.num_tokens(0) == 0 and mem.num_tokens(1) == 6
    found = mem.retrieve(q, 2)
    assert not found.mask[0].any() and found.mask[1].all()


def brute_force(mem, q, n):
    """Reference: score every valid chunk of the row with a Python loop."""
    b, hq, t, _ = q.shape
    group = hq // H
    out = torch.zeros(b, hq, t, n, dtype=torch.long)
    for row in range(b):
        keys, _, _ = mem.row_chunks(row)  # [Hkv,c,csz,D] oldest first
        ck = keys.float().mean(2)
        slots = (mem.start[row] + torch.arange(keys.shape[1])) % mem.capacity
        for h in range(hq):
            for i in range(t):
                scores = ck[h // group] @ q[row, h, i].float()
                out[row, h, i] = slots[scores.topk(n).indices]
    return out


@pytest.mark.parametrize("index", ["torch", "faiss"])
def test_retrieval_equals_brute_force(index):
    torch.manual_seed(0)
    mem = bank(capacity=40, batch=2, index=index)
    for s in range(5):  # wraps the ring buffer
        mem.write(*segment(2, 12, 12 * s))
    q = torch.randn(2, 4, 7, D)  # 4 query heads share 2 KV heads
    found = mem.retrieve(q, 3)
    ref = brute_force(mem, q, 3)
    assert torch.equal(found.chunk_slots.sort(-1).values, ref.sort(-1).values)
    assert found.mask.all()
    # retrieved tokens are the stored tokens of those chunks
    flat_pos = mem.positions[torch.arange(2)[:, None, None, None], found.chunk_slots]  # [B,H,T,n,csz]
    assert torch.equal(found.positions, flat_pos.flatten(-2))


def test_faiss_equals_exact_after_eviction_and_reset():
    torch.manual_seed(1)
    exact, approx = bank(capacity=16, batch=2), bank(capacity=16, batch=2, index="faiss")
    for s in range(6):
        seg = segment(2, 6, 6 * s)
        exact.write(*seg)
        approx.write(*seg)
        if s == 3:
            exact.reset([1])
            approx.reset([1])
    q = torch.randn(2, 2, 5, D)
    a, b = exact.retrieve(q, 4), approx.retrieve(q, 4)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.chunk_slots.sort(-1).values, b.chunk_slots.sort(-1).values)


def test_underfull_memory_pads_with_invalid_entries():
    mem = bank(capacity=16)
    mem.write(*segment(1, 4, 0))  # 2 chunks
    found = mem.retrieve(torch.randn(1, 2, 3, D), 4)
    assert found.mask.sum(-1).eq(4).all()  # 2 real chunks x csz 2


def test_save_load_roundtrip_is_bit_exact(tmp_path):
    torch.manual_seed(3)
    mem = bank(capacity=12, batch=2, dtype="bfloat16")
    for s in range(4):
        mem.write(*segment(2, 5, 5 * s))
    save_memory(mem, tmp_path / "m")
    back = load_memory(tmp_path / "m", expect={"backbone_fingerprint": "fp", "memory_layer": 1})
    for row in range(2):
        for a, b in zip(mem.row_chunks(row), back.row_chunks(row)):
            assert torch.equal(a, b)
    assert torch.equal(mem.pending_count, back.pending_count)
    assert torch.equal(mem.end_position, back.end_position)
    q = torch.randn(2, 2, 4, D)
    a, b = mem.retrieve(q, 3), back.retrieve(q, 3)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.positions, b.positions)
    save_memory(back, tmp_path / "m2")
    data = lambda p: sorted(p.glob("memory-*.safetensors"))[0].read_bytes()  # noqa: E731
    assert data(tmp_path / "m") == data(tmp_path / "m2")


def test_resave_replaces_data_file(tmp_path):
    mem = bank()
    mem.write(*segment(1, 4, 0))
    save_memory(mem, tmp_path / "m")
    mem.write(*segment(1, 4, 4))
    save_memory(mem, tmp_path / "m")
    assert len(list((tmp_path / "m").glob("memory-*.safetensors"))) == 1
    assert load_memory(tmp_path / "m").num_tokens() == 8


def test_load_refuses_other_backbone_tampered_and_truncated(tmp_path):
    mem = bank()
    mem.write(*segment(1, 6, 0))
    save_memory(mem, tmp_path / "m")
    with pytest.raises(LongMemError, match="backbone_fingerprint"):
        load_memory(tmp_path / "m", expect={"backbone_fingerprint": "other"})
    data = next((tmp_path / "m").glob("memory-*.safetensors"))
    raw = data.read_bytes()
    data.write_bytes(raw[:-7])
    with pytest.raises(LongMemError, match="checksum"):
        load_memory(tmp_path / "m")
    data.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(LongMemError, match="checksum"):
        load_memory(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").write_text("{not json")
    with pytest.raises(LongMemError, match="corrupt JSON"):
        load_memory(tmp_path / "m")
    with pytest.raises(LongMemError, match="no memory directory"):
        load_memory(tmp_path / "nothing")


def test_bank_size_per_token_is_close_to_raw_kv():
    mem = MemoryBank(1, 3, 64, 65536, 4, dtype="bfloat16")
    raw = 2 * 3 * 64 * 2  # fp16 keys + values per token
    assert mem.nbytes() / 65536 / raw <= 1.3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_two_level_topk_equals_topk(dtype):
    from longmem.memory.search.exact import topk_two_level

    torch.manual_seed(4)
    scores = torch.randn(3, 50, 4096).to(dtype)
    scores[0, 0, :1000] = float("-inf")  # masked slots
    scores[1, 1, 64:80] = 9.0  # many winners in one group
    values, indices = topk_two_level(scores, 16)
    ref = scores.topk(16, dim=-1).values
    assert torch.equal(values.sort(-1, descending=True).values, ref)
    assert torch.equal(scores.gather(-1, indices), values)


def test_faiss_search_leaves_torch_threads_alone():
    before = torch.get_num_threads()
    mem = bank(index="faiss")
    mem.write(*segment(1, 8, 0))
    mem.retrieve(torch.randn(1, 2, 3, D), 2)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("index", ["torch", "faiss"])
def test_search_keys_drive_chunk_keys_and_survive_save_load(tmp_path, index):
    torch.manual_seed(6)
    mem = bank(capacity=12, index=index)
    keys, values, pos = segment(1, 7, 0)
    search = torch.randn_like(keys)
    mem.write(keys, values, pos, search_keys=search)
    expected = search[0, :, :6].reshape(H, 3, CSZ, D).mean(2)  # 3 full chunks
    torch.testing.assert_close(mem.row_chunk_keys(0).float(), expected)
    save_memory(mem, tmp_path / "m")
    back = load_memory(tmp_path / "m")
    assert torch.equal(back.row_chunk_keys(0), mem.row_chunk_keys(0))
    assert torch.equal(back.pending_search[0, :, :1], mem.pending_search[0, :, :1])
    q = torch.randn(1, 2, 3, D)
    assert torch.equal(mem.retrieve(q, 2).chunk_slots, back.retrieve(q, 2).chunk_slots)
