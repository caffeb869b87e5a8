"""Forgetting one remembered text: afterwards nothing of it is retrieved or copied, and the write is crash-safe."""

import pytest
import torch

from conftest import run_cli
from longmem.errors import LongMemError
from longmem.inference.session import Session, forget_source, load_named, remember
from longmem.memory.suffix import suffix_matches
from test_decode import trained

A, B, C = (bytes(torch.randint(97, 123, (120,), generator=torch.Generator().manual_seed(s)).tolist()).decode()
           for s in (1, 2, 3))  # three texts of 120 random letters (one token per byte)


@pytest.fixture
def model():
    return trained("llama", memory_size=1024)


def fill(model, root):
    for text, source in ((A, "a.txt"), (B, "b.txt"), (C, "c.txt")):
        remember(model, "m", text, source=source, root=root)


def every_position(bank) -> torch.Tensor:
    """Positions of everything the memory can hand back: bank chunks, pending tokens, the tier's visible slots."""
    held = [bank.row_positions(0).flatten(), bank.pending_positions[0, : int(bank.pending_count[0])]]
    tier = bank.recent
    s = tier.sinks
    held.append(tier.held_positions[0][tier.valid[0, s:]])
    return torch.cat(held)


def test_a_forgotten_text_is_never_retrieved_or_copied(model, tmp_path):
    fill(model, tmp_path)
    before, _ = load_named(model, "m", tmp_path)
    b_range = (len(A), len(A) + len(B))
    assert ((every_position(before) >= b_range[0]) & (every_position(before) < b_range[1])).any()  # it was there
    info = forget_source(model, "m", "b.txt", tmp_path)
    assert info.tokens_read == len(A) + len(C)
    bank, _ = load_named(model, "m", tmp_path)
    pos = every_position(bank)
    assert not ((pos >= b_range[0]) & (pos < b_range[1])).any()  # not in the bank, pending or the tier
    assert (pos >= b_range[1]).any() and (pos < b_range[0]).any()
    log = bank.token_log
    assert (log.lookup(torch.arange(*b_range)[None]) == -1).all()  # no id of it to copy
    assert (log.lookup(torch.arange(0, len(A))[None]) >= 0).all()
    queries = torch.randn(1, bank.num_kv_heads, 16, bank.head_dim)
    got = bank.retrieve(queries, 8)
    hit = got.positions[got.mask]
    assert not ((hit >= b_range[0]) & (hit < b_range[1])).any()
    passage = torch.tensor([list(B[40:80].encode())])  # asked to continue a passage of the forgotten text
    start = int(bank.end_position[0])
    positions = torch.arange(start, start + passage.shape[1])[None]
    matched, _, _, _ = suffix_matches(log, passage, positions, passage.shape[1], 3, local=False)
    assert not ((matched >= b_range[0]) & (matched < b_range[1])).any()
    passage_a = torch.tensor([list(A[40:80].encode())])
    matched_a, _, _, _ = suffix_matches(log, passage_a, positions, passage_a.shape[1], 3, local=False)
    assert (matched_a >= 0).any()  # the same search still finds what was kept
    with pytest.raises(LongMemError, match="no text from source 'b.txt'"):
        forget_source(model, "m", "b.txt", tmp_path)


def test_a_session_forgets_in_ram_as_on_disk(model, tmp_path, capsys):
    fill(model, tmp_path)
    session = Session(model, "m", tmp_path, create=False)
    session.forget_source("a.txt")
    disk, _ = load_named(model, "m", tmp_path)
    assert torch.equal(every_position(session.memory), every_position(disk))
    assert not (every_position(disk) < len(A)).any()


def test_forget_a_source_from_the_command_line(tmp_path, capsys, backbone_dir):
    for name, text in (("a.txt", A), ("b.txt", B)):
        (tmp_path / name).write_text(text)
    common = ["--memory-dir", tmp_path / "m", "--backbone", backbone_dir, "--dtype", "float32", "--segment", 64]
    assert run_cli(capsys, "remember", "m", tmp_path / "a.txt", tmp_path / "b.txt", *common)[0] == 0
    code, out, _ = run_cli(capsys, "forget", "m", "--source", "b.txt", *common)
    assert code == 0 and "forgot 'b.txt' in m" in out
    code, _, err = run_cli(capsys, "forget", "m", "--source", "nope.txt", *common)
    assert code == 2 and "no text from source 'nope.txt'" in err and "a.txt" in err


def test_a_failed_forget_leaves_the_memory_as_it_was(model, tmp_path, monkeypatch):
    fill(model, tmp_path)
    before, _ = load_named(model, "m", tmp_path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("longmem.memory.io.named.save_json", crash)
    with pytest.raises(OSError):
        forget_source(model, "m", "b.txt", tmp_path)
    monkeypatch.undo()
    after, _ = load_named(model, "m", tmp_path)
    assert torch.equal(every_position(after), every_position(before))
    assert torch.equal(after.token_log.ids, before.token_log.ids)


def test_forget_a_source_over_http(tmp_path):
    from test_serve import Running

    server = Running(tmp_path)
    try:
        server.call("POST", "/v1/sessions", {"name": "s"})
        for text, source in ((A, "a"), (B, "b")):
            assert server.call("POST", "/v1/sessions/s/memory", {"text": text, "source": source})[0] == 200
        status, info = server.call("DELETE", "/v1/sessions/s/memory?source=b")
        assert status == 200 and info["tokens_read"] == len(A)
        status, body = server.call("DELETE", "/v1/sessions/s/memory?source=b")
        assert status == 400 and "no text from source 'b'" in body["error"]
        assert server.call("GET", "/v1/sessions/s")[1]["tokens_read"] == len(A)
    finally:
        server.stop()
