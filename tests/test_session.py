"""Named memories on disk: append-only, bounded, refused by other models, crash-safe."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import make_model
from longmem.errors import LongMemError
from longmem.inference.reader import read
from longmem.inference.session import Session, forget, list_memories, load_named, remember

TESTS = Path(__file__).parent
TEXT_A = "It is a truth universally acknowledged, that a single man in possession of a good fortune. " * 2
TEXT_B = "Call me Ishmael. Some years ago, never mind how long precisely, having little money. " * 2


def reference(model, *texts):
    """The memory the reader fills reading the texts one after another (the slow twin)."""
    memory = model.new_memory(1)
    for text in texts:
        read(model, torch.tensor(list(text.encode())), memory)
    return memory


def assert_same_bank(a, b):
    for x, y in zip(a.row_chunks(0), b.row_chunks(0)):
        assert torch.equal(x, y)
    assert torch.equal(a.row_chunk_keys(0), b.row_chunk_keys(0))
    for name in ("end_position", "pending_count"):
        assert torch.equal(getattr(a, name), getattr(b, name))
    p = int(a.pending_count[0])
    assert torch.equal(a.pending_keys[0, :, :p], b.pending_keys[0, :, :p])
    if a.token_log is not None:  # the copy head's log: every token it can match, sinks and the tier's included
        assert torch.equal(a.token_log.ids, b.token_log.ids) and torch.equal(a.token_log.end, b.token_log.end)
        torch.testing.assert_close(a.token_log.keys.float(), b.token_log.keys.float(), atol=1e-2, rtol=0)


def test_remember_appends_and_loads_like_reading(tmp_path, family):
    model = make_model(family, trained=True)
    first = remember(model, "book", TEXT_A, source="a.txt", root=tmp_path)
    assert first.tokens == len(TEXT_A) and first.memory.end_position == len(TEXT_A)
    remember(model, "book", TEXT_B, source="b.txt", root=tmp_path)  # continues where it left off
    bank, manifest = load_named(model, "book", tmp_path)
    assert_same_bank(bank, reference(model, TEXT_A, TEXT_B))
    assert manifest["end_position"] == len(TEXT_A) + len(TEXT_B)
    assert [s["source"] for s in manifest["sources"]] == ["a.txt", "b.txt"]


def test_list_and_forget(tmp_path):
    model = make_model("llama")
    remember(model, "b-book", TEXT_A, root=tmp_path)
    remember(model, "a.notes_1", TEXT_B[:50], root=tmp_path)
    (tmp_path / "half-made").mkdir()  # a directory without a manifest is no memory
    infos = list_memories(tmp_path)
    assert [m.name for m in infos] == ["a.notes_1", "b-book"]
    notes = infos[0]
    assert notes.tokens_read == 50 and notes.capacity_tokens == 64
    # the short-term tier holds the last 16 tokens, the document's sink stays out: 33 in whole chunks
    assert notes.tokens == 32 == load_named(model, "a.notes_1", tmp_path)[0].num_tokens()
    assert notes.bytes > 0 and notes.backbone == "tiny-llama"
    forget("b-book", tmp_path)
    assert [m.name for m in list_memories(tmp_path)] == ["a.notes_1"]
    assert not (tmp_path / "b-book").exists()
    with pytest.raises(LongMemError, match="no memory named 'b-book'"):
        forget("b-book", tmp_path)


def test_disk_stays_bounded_and_the_bank_exact_past_capacity(tmp_path):
    model = make_model("llama", trained=True)  # capacity 64 tokens, chunks of 2
    texts = [(TEXT_A * 2)[i : i + 37] for i in range(0, 37 * 6, 37)] + [TEXT_B * 2]  # small appends, then a long one
    for text in texts:
        remember(model, "m", text, root=tmp_path)
        manifest = json.loads((tmp_path / "m" / "manifest.json").read_text())
        stored = sum(p["tokens"] for p in manifest["parts"])
        assert stored <= 64 + len(text)  # the bank's capacity + the newest append at most
        assert len(list((tmp_path / "m").glob("part-*"))) == len(manifest["parts"])  # nothing stale
    bank, _ = load_named(model, "m", tmp_path)
    assert_same_bank(bank, reference(model, *texts))


def test_other_backbone_or_sidenet_is_refused(tmp_path):
    model = make_model("llama", trained=True)
    remember(model, "m", TEXT_A, root=tmp_path)
    with pytest.raises(LongMemError, match="another backbone"):
        load_named(make_model("gpt2", trained=True), "m", tmp_path)
    other = make_model("llama", trained=True)
    with torch.no_grad():
        other.sidenet.memory_block.gate.add_(0.5)
    with pytest.raises(LongMemError, match="another SideNet"):
        load_named(other, "m", tmp_path)
    with pytest.raises(LongMemError, match="another SideNet"):
        remember(other, "m", TEXT_B, root=tmp_path)
    with pytest.raises(LongMemError, match="another SideNet"):
        Session(other, "m", tmp_path)
    load_named(make_model("llama", trained=True), "m", tmp_path)  # the same model is welcome


def test_tampered_torn_or_foreign_files_give_clear_errors(tmp_path):
    model = make_model("llama")
    remember(model, "m", TEXT_A, root=tmp_path)
    part = next((tmp_path / "m").glob("part-*"))
    raw = part.read_bytes()
    part.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(LongMemError, match="truncated or modified"):
        load_named(model, "m", tmp_path)
    part.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(LongMemError, match="truncated or modified"):
        load_named(model, "m", tmp_path)
    part.write_bytes(raw)
    manifest = tmp_path / "m" / "manifest.json"
    text = manifest.read_text()
    manifest.write_text(text[: len(text) // 2])
    with pytest.raises(LongMemError, match="corrupt JSON"):
        load_named(model, "m", tmp_path)
    manifest.write_text(text.replace("longmem-named-memory", "something-else"))
    with pytest.raises(LongMemError, match="not a longmem named memory"):
        load_named(model, "m", tmp_path)
    with pytest.raises(LongMemError, match="no memory named 'missing'"):
        load_named(model, "missing", tmp_path)


@pytest.mark.parametrize("name", ["../up", "a/b", "", ".hidden", "-x", "x" * 65, "white space", "ü"])
def test_bad_names_are_refused(tmp_path, name):
    with pytest.raises(LongMemError, match="bad memory name"):
        remember(make_model("llama"), name, TEXT_A, root=tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_session_keeps_ram_and_disk_in_step(tmp_path):
    model = make_model("llama", trained=True)
    session = Session(model, "s", tmp_path)
    assert session.memory.is_empty and session.info().tokens_read == 0
    session.remember(TEXT_A)
    remember(model, "s", TEXT_B, root=tmp_path)  # another writer (e.g. the CLI) appends meanwhile
    session.remember(TEXT_A[:30])
    assert_same_bank(session.memory, reference(model, TEXT_A, TEXT_B, TEXT_A[:30]))
    assert_same_bank(Session(model, "s", tmp_path).memory, session.memory)  # a restart sees the same


def both_paths(model, root):
    """TEXT_A remembered from the command line (no bank in RAM), then TEXT_B by a session (RAM,
    then disk) -> (the reader's memory of both, [the session's bank, the bank reloaded from disk])."""
    remember(model, "m", TEXT_A, root=root)
    session = Session(model, "m", root)
    session.remember(TEXT_B)
    return reference(model, TEXT_A, TEXT_B), [session.memory, load_named(model, "m", root)[0]]


def test_a_short_term_tier_is_saved_and_restored(tmp_path):
    model = make_model("llama", trained=True, recent_tokens=16)
    expected, banks = both_paths(model, tmp_path)
    for bank in banks:
        assert_same_bank(bank, expected)
        for name, x in bank.recent.state().items():
            assert torch.equal(x, expected.recent.state()[name]), name
    with pytest.raises(LongMemError, match="recent_tokens"):
        load_named(make_model("llama", trained=True, recent_tokens=0), "m", tmp_path)  # a model without the tier
    assert len(list((tmp_path / "m").glob("state-*"))) == 1


def test_a_copy_head_memory_keeps_its_token_ids_on_disk(tmp_path):
    model = make_model("llama")
    expected, banks = both_paths(model, tmp_path)
    for bank in banks:
        assert_same_bank(bank, expected)
        held = expected.row_positions(0).flatten()  # every token the bank holds is known by id and key
        assert torch.equal(bank.token_log.lookup(held[None]), expected.token_log.lookup(held[None]))
        assert (bank.token_log.lookup(held[None]) >= 0).all()
        slots = held % bank.token_log.span
        torch.testing.assert_close(bank.token_log.keys[0][:, slots].float(),
                                   expected.token_log.keys[0][:, slots].float(), atol=1e-2, rtol=0)
    ids = torch.tensor(list(TEXT_B[:16].encode()))[None]
    reloaded = load_named(model, "m", tmp_path)[0]
    assert not reloaded.token_log.is_empty  # the copy head reads a reloaded memory too
    ptr, best = model.sidenet.copy_head.pointer(model(ids, memory=reloaded).match_keys, reloaded.token_log, 256)
    assert ptr.sum(-1).mean() > 0.5 and best.max() > 0.95  # matches found, most successors known


# ---------------------------------------------------------------- crash safety (kill -9 mid-write)
CHILD = r"""
import json, os, sys, time
sys.path.insert(0, sys.argv[1])
from conftest import make_model
import longmem.memory.io.named as named
from longmem.inference.session import remember

root, point, text = sys.argv[2], sys.argv[3], sys.argv[4]

def pause(*args, **kwargs):
    print("PAUSED", flush=True)
    time.sleep(120)

if point == "part":  # half of the new part file is on disk
    real = named.save_file
    def torn(tensors, path, **kwargs):
        real(tensors, path + ".whole")
        data = open(path + ".whole", "rb").read()
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
        pause()
    named.save_file = torn
elif point == "manifest":  # the part is complete; half of the new manifest's temporary file is written
    def torn_json(path, data):
        raw = json.dumps(data).encode()
        with open(path.parent / f".{path.name}.crash.tmp", "wb") as handle:
            handle.write(raw[: len(raw) // 2])
        pause()
    named.save_json = torn_json
elif point == "switched":  # the manifest is switched; stale files not yet deleted
    real_json = named.save_json
    def switch_then_pause(path, data):
        real_json(path, data)
        pause()
    named.save_json = switch_then_pause
model = make_model("llama", trained=True)
if point == "loop":
    for i in range(1000):
        remember(model, "m", text[: 20 + i % 50], root=root)
        print("APPENDED", i, flush=True)
else:
    remember(model, "m", text, root=root)
print("DONE", flush=True)
"""


def run_child(tmp_path, point, text, wait_for):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS), str(tmp_path), point, text],
                            stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 180
    try:
        for line in proc.stdout:
            if line.startswith(wait_for) or time.monotonic() > deadline:
                break
        return proc, line
    finally:
        if point == "loop":
            time.sleep(random.Random(0).uniform(0.05, 0.5))  # land anywhere inside a later append
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


@pytest.mark.parametrize("point, survives", [("part", "old"), ("manifest", "old"), ("switched", "new")])
def test_kill_9_mid_write_leaves_the_old_or_the_new_memory(tmp_path, point, survives):
    model = make_model("llama", trained=True)
    remember(model, "m", TEXT_A, root=tmp_path)
    _, line = run_child(tmp_path, point, TEXT_B, "PAUSED")
    assert line.startswith("PAUSED")
    bank, _ = load_named(model, "m", tmp_path)
    expected = (TEXT_A,) if survives == "old" else (TEXT_A, TEXT_B)
    assert_same_bank(bank, reference(model, *expected))
    remember(model, "m", TEXT_A[:40], root=tmp_path)  # the next write works and sweeps the debris
    bank, manifest = load_named(model, "m", tmp_path)
    assert_same_bank(bank, reference(model, *expected, TEXT_A[:40]))
    listed = {p["file"] for p in manifest["parts"]} | {manifest["state"]["file"], "manifest.json", ".lock"}
    listed |= {e["spans"]["file"] for e in manifest["sources"] if "spans" in e}  # each text's character spans
    assert {p.name for p in (tmp_path / "m").iterdir()} == listed


def test_kill_9_at_a_random_moment_of_many_appends(tmp_path):
    model = make_model("llama", trained=True)
    _, line = run_child(tmp_path, "loop", TEXT_B, "APPENDED 3")
    assert line.startswith("APPENDED")
    bank, manifest = load_named(model, "m", tmp_path)
    done = manifest["revision"] - 1  # revision 1 created the memory with the first append
    assert done >= 3
    assert_same_bank(bank, reference(model, *(TEXT_B[: 20 + i % 50] for i in range(done + 1))))
