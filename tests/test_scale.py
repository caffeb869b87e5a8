"""Large memories: approximate chunk search (IVF, HNSW), int8 storage, memory-mapped loading."""

import json

import pytest
import torch

from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.files import sha256
from longmem.inference.generate import copy_memory
from longmem.memory import MemoryBank, load_memory, save_memory
from longmem.memory.search.exact import IndexConfig
from longmem.memory.quant import dequantize, quantize

H, D, CSZ = 2, 16, 4
META = {"backbone_fingerprint": "fp", "memory_layer": 1}


def bank(capacity, index="torch", dtype="float32", batch=1):
    return MemoryBank(batch, H, D, capacity, CSZ, dtype=dtype, index=index, meta=META)


def clustered(n, seed, centers=32):
    """n keys [1,H,n,D] around a few centers, like real keys (not uniform noise)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(H, centers, D, generator=g) * 3
    pick = torch.randint(0, centers, (H, n), generator=g)
    return (c.gather(1, pick[..., None].expand(H, n, D)) + torch.randn(H, n, D, generator=g))[None]


def fill(mems, tokens, seed, segment=64, start=0):
    """Write the same clustered keys into every bank, ``segment`` tokens at a time."""
    keys = clustered(tokens, seed)
    for a in range(0, tokens, segment):
        k = keys[:, :, a : a + segment]
        pos = torch.arange(start + a, start + a + k.shape[2])[None]
        for m in mems:
            m.write(k, k * 0.5, pos)


def recall(approx, exact):
    """Share of the exact chunk slots [..., n] the approximate search found (both valid)."""
    hit = (approx.chunk_slots[..., :, None] == exact.chunk_slots[..., None, :]) & approx.mask[..., ::CSZ, None]
    return float(hit.any(-2).float().sum() / exact.mask[..., ::CSZ].sum())


def backing_file(t: torch.Tensor) -> str:
    """The file mapped at a tensor's data (Linux /proc/self/maps), or ''."""
    addr = t.data_ptr()
    for line in open("/proc/self/maps"):
        parts = line.split()
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        if lo <= addr < hi:
            return parts[5] if len(parts) > 5 else ""
    return ""


def queries(seed, t=32, heads=4):
    return clustered(heads // H * t, seed).view(1, heads, t, D)  # 2 query heads per KV head


# ------------------------------------------------------------------ approximate search
@pytest.mark.parametrize("kind", ["ivf", "torch-ivf"])
def test_ivf_with_every_list_probed_equals_exact_through_training_eviction_and_reset(kind):
    ivf = IndexConfig(kind=kind, nlist=8, nprobe=8, train_chunks=64, retrain_growth=1.0, ivf_codes="float32")
    exact, approx = bank(1024), bank(1024, ivf)
    fill([exact, approx], 128, seed=0)  # 32 chunks: not trained yet, exact search
    assert not approx.index.is_trained(0)
    q = queries(1)
    a, b = exact.retrieve(q, 4), approx.retrieve(q, 4)
    assert torch.equal(a.chunk_slots.sort(-1).values, b.chunk_slots.sort(-1).values)
    fill([exact, approx], 3000, seed=2, start=128)  # trains at 64 chunks, evicts, retrains on growth
    assert approx.index.is_trained(0) and int(exact.count[0]) == 256
    a, b = exact.retrieve(q, 4), approx.retrieve(q, 4)
    assert torch.equal(a.mask, b.mask)
    assert torch.equal(a.chunk_slots.sort(-1).values, b.chunk_slots.sort(-1).values)
    for m in (exact, approx):
        m.reset()
    fill([exact, approx], 40, seed=3)
    a, b = exact.retrieve(q, 4), approx.retrieve(q, 4)
    assert torch.equal(a.chunk_slots.sort(-1).values, b.chunk_slots.sort(-1).values) and torch.equal(a.mask, b.mask)


def test_torch_ivf_on_a_bf16_bank_with_every_list_probed_finds_the_exact_chunks():
    # bf16 products rank groups with near-ties; the margin of groups and the fp32 rescoring recover them
    config = IndexConfig(kind="torch-ivf", nlist=8, nprobe=8, train_chunks=64)
    exact, approx = bank(2048, "torch", "bfloat16"), bank(2048, config, "bfloat16")
    fill([exact, approx], 4000, seed=21)
    q = queries(22, t=64)
    a, b = exact.retrieve(q, 4), approx.retrieve(q, 4)
    assert approx.index.is_trained(0) and recall(b, a) >= 0.98
    live = set(exact.row_chunks(0)[2].flatten().tolist())
    assert set(b.positions[b.mask].tolist()) <= live


def test_ivf_float16_codes_are_lossless_for_bf16_keys():
    config = dict(kind="ivf", nlist=8, nprobe=8, train_chunks=64)
    half, full = bank(1024, IndexConfig(**config), "bfloat16"), bank(1024, IndexConfig(**config, ivf_codes="float32"),
                                                                    "bfloat16")
    fill([half, full], 1500, seed=17)
    q = queries(18)
    assert torch.equal(half.retrieve(q, 4).chunk_slots, full.retrieve(q, 4).chunk_slots)
    assert half.index.nbytes() < full.index.nbytes()


@pytest.mark.parametrize("index", [IndexConfig(kind="ivf", nlist=16, nprobe=8, train_chunks=128),
                                   IndexConfig(kind="torch-ivf", nlist=16, nprobe=8, train_chunks=128),
                                   IndexConfig(kind="hnsw", ef_search=64, rebuild_dead=0.25)])
def test_approximate_recall_is_high_and_never_returns_evicted_chunks(index):
    exact, approx = bank(2048), bank(2048, index=index)
    fill([exact, approx], 6000, seed=4)  # FIFO: 1500 chunks written into 512 slots (HNSW rebuilds)
    q = queries(5, t=64)
    a, b = exact.retrieve(q, 4), approx.retrieve(q, 4)
    assert recall(b, a) >= 0.9
    live = set(exact.row_chunks(0)[2].flatten().tolist())
    assert set(b.positions[b.mask].tolist()) <= live
    if index.kind == "hnsw":
        assert approx.index.base[0] > 0  # evicted chunks were rebuilt away


@pytest.mark.parametrize("kind", ["ivf", "torch-ivf"])
def test_approximate_indexes_save_and_load_their_config(tmp_path, kind):
    index = IndexConfig(kind=kind, nlist=8, nprobe=8, train_chunks=32)
    mem = bank(512, index)
    fill([mem], 300, seed=6)
    save_memory(mem, tmp_path / "m")
    back = load_memory(tmp_path / "m")
    assert back.index_config == index and back.index.is_trained(0)
    q = queries(7)
    assert torch.equal(mem.retrieve(q, 3).chunk_slots, back.retrieve(q, 3).chunk_slots)
    assert load_memory(tmp_path / "m", index="torch").index_name == "torch"


@pytest.mark.parametrize("kind", ["hnsw", "torch-ivf"])
def test_model_reads_with_an_approximate_memory(kind):
    from conftest import make_model

    model = make_model(retrieval=kind, trained=True)
    memory = model.new_memory(1)
    assert memory.index_name == kind
    ids = torch.randint(0, 256, (1, 16))
    for _ in range(3):
        model.write_memory(memory, model(ids, memory=memory))
    assert torch.isfinite(model(ids, memory=memory).logits).all()


# ------------------------------------------------------------------ int8 storage
def test_int8_roundtrip_error_is_within_half_a_step():
    x = torch.randn(3, 7, 64) * torch.logspace(-3, 3, 7)[None, :, None]  # scales from 1e-3 to 1e3
    q, s = quantize(x)
    err = (dequantize(q, s, torch.float32) - x).abs().amax(-1)
    assert (err <= x.abs().amax(-1) / 250).all()
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16


def test_int8_bank_retrieves_close_entries_and_saves_loads_exactly(tmp_path):
    ref, mem = bank(512, dtype="bfloat16"), bank(512, dtype="int8")
    fill([ref, mem], 600, seed=8)
    q = queries(9)
    a, b = ref.retrieve(q, 4), mem.retrieve(q, 4)
    assert torch.equal(a.chunk_slots, b.chunk_slots)  # search keys stay bf16: the same chunks are found
    assert b.keys.dtype == torch.bfloat16
    step = a.keys.float().abs().amax(-1, keepdim=True) / 127  # one int8 step of each token
    assert ((b.keys.float() - a.keys.float()).abs() <= step).all()
    assert ((b.values.float() - a.values.float()).abs() <= step / 2 + 1e-6).all()
    save_memory(mem, tmp_path / "m")
    assert json.loads((tmp_path / "m" / "manifest.json").read_text())["dtype"] == "int8"
    back = load_memory(tmp_path / "m", dtype="int8")
    for name, t in mem.row_storage(0).items():  # int8 values and scales, bit for bit
        assert torch.equal(t, back.row_storage(0)[name]), name
    assert torch.equal(mem.row_chunk_keys(0), back.row_chunk_keys(0))
    copy = copy_memory(mem)
    assert torch.equal(copy.row_storage(0)["keys"], mem.row_storage(0)["keys"])
    assert mem.nbytes() < 0.7 * ref.nbytes()


def test_model_reads_an_int8_memory_almost_like_a_float_one():
    from conftest import make_model
    from longmem.evals.scoring import variant
    from longmem.inference.reader import perplexity

    model = make_model(trained=True, memory_size=256)
    ids = torch.randint(0, 256, (160,), generator=torch.Generator().manual_seed(19))
    ref = model.new_memory(1)
    int8 = variant(model, memory_dtype="int8").new_memory(1)  # the same tier and token log, the bank in int8
    assert int8.dtype_name == "int8" and int8.recent is not None
    a = perplexity(model, ids, mode="memory", memory=ref)
    b = perplexity(model, ids, mode="memory", memory=int8)
    assert int8.num_tokens() == ref.num_tokens() > 0
    assert a.perplexity != b.perplexity and abs(b.perplexity / a.perplexity - 1) < 0.01


def test_storage_dtype_mismatch_is_refused(tmp_path):
    mem = bank(64, dtype="int8")
    fill([mem], 64, seed=10)
    save_memory(mem, tmp_path / "m")
    with pytest.raises(LongMemError, match="stores keys/values as int8, not bfloat16"):
        load_memory(tmp_path / "m", dtype="bfloat16")
    manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest | {"dtype": "bfloat16"}))
    with pytest.raises(LongMemError, match="its manifest says torch.bfloat16"):
        load_memory(tmp_path / "m")
    (tmp_path / "m" / "manifest.json").write_text(json.dumps(manifest | {"dtype": "int4"}))
    with pytest.raises(LongMemError, match="unknown storage dtype 'int4'"):
        load_memory(tmp_path / "m")


# ------------------------------------------------------------------ memory-mapped loading
@pytest.mark.parametrize("dtype", ["bfloat16", "int8"])
def test_mmap_load_retrieves_exactly_what_an_in_ram_load_does(tmp_path, dtype):
    mem = bank(512, dtype=dtype)
    fill([mem], 700, seed=11)  # full, wrapped ring, 3 pending tokens
    save_memory(mem, tmp_path / "m")
    ram, mapped = load_memory(tmp_path / "m"), load_memory(tmp_path / "m", mmap=True)
    data = next((tmp_path / "m").glob("memory-*.safetensors"))
    assert backing_file(mapped.keys) == backing_file(mapped.values) == str(data)  # on disk, not copied
    assert backing_file(ram.keys) != str(data)
    q = queries(12)
    a, b = ram.retrieve(q, 4), mapped.retrieve(q, 4)
    for name in ("keys", "values", "positions", "mask"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert torch.equal(ram.pending_count, mapped.pending_count) and torch.equal(ram.end_position, mapped.end_position)
    digest = sha256(data)
    fill([ram, mapped], 64, seed=13, start=700)  # writes go to private pages, never to the file
    assert sha256(data) == digest
    a, b = ram.retrieve(q, 4), mapped.retrieve(q, 4)
    assert torch.equal(a.keys, b.keys) and torch.equal(a.positions, b.positions)


def test_model_reads_a_mapped_memory_with_its_short_term_tier_like_a_loaded_one(tmp_path):
    from conftest import make_model
    from longmem.inference.reader import read

    model = make_model(trained=True, recent_tokens=16, memory_size=128)
    ids = torch.randint(0, 256, (200,), generator=torch.Generator().manual_seed(20))
    save_memory(read(model, ids, model.new_memory(1)), tmp_path / "m")
    expect = model.memory_meta()
    ram, mapped = load_memory(tmp_path / "m", expect=expect), load_memory(tmp_path / "m", expect=expect, mmap=True)
    seg = ids[:16][None]
    assert torch.equal(model(seg, memory=ram).logits, model(seg, memory=mapped).logits)


def test_mmap_of_a_partly_filled_memory_holds_what_was_saved(tmp_path):
    mem = bank(1024)
    fill([mem], 200, seed=14)
    save_memory(mem, tmp_path / "m")
    mapped = load_memory(tmp_path / "m", mmap=True, index=IndexConfig(kind="ivf", nlist=4, nprobe=4, train_chunks=16))
    assert mapped.capacity * CSZ == 200 and mapped.num_tokens() == 200 and mapped.index.is_trained(0)
    q = queries(15)
    assert torch.equal(mem.retrieve(q, 2).keys, mapped.retrieve(q, 2).keys)
    with pytest.raises(LongMemError, match="holds exactly its 200 saved tokens"):
        load_memory(tmp_path / "m", mmap=True, capacity_tokens=1024)
    two = bank(64, batch=2)
    two.write(clustered(8, 16).expand(2, H, 8, D), clustered(8, 16).expand(2, H, 8, D), torch.arange(8).expand(2, 8))
    save_memory(two, tmp_path / "two")
    with pytest.raises(LongMemError, match="one-row memory"):
        load_memory(tmp_path / "two", mmap=True)


# ------------------------------------------------------------------ bad options
def test_bad_options_are_clear_errors():
    with pytest.raises(LongMemError, match="retrieval index 'annoy' is not one of"):
        bank(64, index="annoy")
    with pytest.raises(LongMemError, match="memory dtype 'int4' is not one of"):
        bank(64, dtype="int4")
    with pytest.raises(LongMemError, match="nprobe=0 must be a positive integer"):
        IndexConfig(kind="ivf", nprobe=0)
    with pytest.raises(LongMemError, match="rebuild_dead"):
        IndexConfig(kind="hnsw", rebuild_dead=0)
    with pytest.raises(LongMemError, match="retrieval='scann'"):
        LongMemConfig(retrieval="scann")
    with pytest.raises(LongMemError, match="nprobe"):
        LongMemConfig(retrieval="ivf", retrieval_nprobe=-1)
    assert LongMemConfig(retrieval="ivf", retrieval_nprobe=8).index_config().nprobe == 8


# ------------------------------------------------------------------ through the model config
def test_model_config_reaches_the_bank_int8_with_a_short_term_tier():
    from conftest import make_model

    model = make_model("llama", memory_dtype="int8", recent_tokens=16, retrieval="ivf", retrieval_nprobe=7)
    mem = model.new_memory(1)
    assert mem.dtype_name == "int8" and mem.index_config.kind == "ivf" and mem.index_config.nprobe == 7
    assert mem.recent is not None and mem.recent.keys.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 64))
    ref = make_model("llama", memory_dtype="bfloat16", recent_tokens=16)
    ref.sidenet.load_state_dict(model.sidenet.state_dict())
    ref_mem = ref.new_memory(1)
    for a in range(0, 48, 16):  # three segments fill tier and bank
        model.write_memory(mem, model(ids[:, a : a + 16], memory=mem))
        ref.write_memory(ref_mem, ref(ids[:, a : a + 16], memory=ref_mem))
    assert mem.num_tokens() > 0
    got, want = model(ids[:, 48:], memory=mem).logits, ref(ids[:, 48:], memory=ref_mem).logits
    assert (got - want).abs().max() < 0.05 * want.abs().max()  # int8 storage: close, not exact
