"""More long public-domain texts for the training corpus: opt-in sources of ``longmem data books``.

Other authors and kinds than the default three sources (and none of the held-out set's, ``data/heldout.py``):

* ``doyle``: Arthur Conan Doyle, *The Adventures of Sherlock Holmes* (stories), and ``twain``: Mark Twain,
  *The Adventures of Tom Sawyer* (novel): Project Gutenberg test files of Debian ``golang-github-pierrec-lz4-dev``;
* ``newton``: Isaac Newton, *Opticks* (a scientific treatise), test data of Debian
  ``golang-github-andybalholm-brotli-dev``;
* ``lcet10``: *Library of Congress Workshop on Electronic Texts: Proceedings* (1992; talks and discussion), the
  Canterbury corpus file in the test data of the PyPI sdist ``brotli`` (whose ``plrabn12.txt``, Milton, is held
  out and never read here);
* ``henry``: Matthew Henry, *Concise Commentary on the Whole Bible* (commentary), the SWORD module of Debian
  ``sword-comm-mhcc``.
"""

from __future__ import annotations

import html
import re
import struct
import zlib
from pathlib import Path

from longmem.data.books import Document, _fetch_deb, _find_one, _make_document
from longmem.data.heldout import _BROTLI, brotli_testdata
from longmem.errors import LongMemError

_LZ4 = "golang-github-pierrec-lz4-dev"
_LZ4_TESTDATA = "usr/share/gocode/src/github.com/pierrec/lz4/testdata"
_GO_BROTLI = "golang-github-andybalholm-brotli-dev"
_TAG = re.compile(r"<[^>]*>")
_DOYLE, _TWAIN = f"debian:{_LZ4}:pg1661.txt", f"debian:{_LZ4}:Mark.Twain-Tom.Sawyer.txt"  # one package, two sources


def _plain(root: Path, pattern: str) -> str:
    return _find_one(root, pattern).read_bytes().decode("utf-8", errors="replace")


def fetch_doyle(workdir: Path) -> list[Document]:
    root = _fetch_deb(_LZ4, workdir)
    raw = _plain(root, f"{_LZ4_TESTDATA}/pg1661.txt")
    return [_make_document("doyle-sherlock-holmes", "The Adventures of Sherlock Holmes", _DOYLE, raw)]


def fetch_twain(workdir: Path) -> list[Document]:
    root = _fetch_deb(_LZ4, workdir)
    raw = _plain(root, f"{_LZ4_TESTDATA}/Mark.Twain-Tom.Sawyer.txt")
    return [_make_document("twain-tom-sawyer", "The Adventures of Tom Sawyer", _TWAIN, raw)]


def fetch_newton(workdir: Path) -> list[Document]:
    root = _fetch_deb(_GO_BROTLI, workdir)
    raw = _plain(root, "usr/share/gocode/src/github.com/andybalholm/brotli/testdata/Isaac.Newton-Opticks.txt")
    return [_make_document("newton-opticks", "Opticks", f"debian:{_GO_BROTLI}", raw)]


def fetch_lcet10(workdir: Path) -> list[Document]:
    raw = brotli_testdata(workdir, "lcet10.txt")
    return [_make_document("loc-workshop-electronic-texts", "Library of Congress Workshop on Electronic Texts",
                           f"pypi:{_BROTLI}", raw)]


def read_sword(index: Path, data: Path) -> str:
    """A compressed SWORD module's text: the index holds 12-byte records (offset, size, uncompressed size,
    little-endian) of zlib blocks in ``data``; the blocks' markup is dropped and entities unescaped."""
    idx, blob = index.read_bytes(), data.read_bytes()
    if len(idx) % 12:
        raise LongMemError(f"{index}: not a SWORD block index ({len(idx)} bytes)")
    parts = []
    for at in range(0, len(idx), 12):
        offset, size, _ = struct.unpack("<III", idx[at : at + 12])
        if size:
            parts.append(zlib.decompress(blob[offset : offset + size]).decode("utf-8", errors="replace"))
    text = html.unescape(_TAG.sub(" ", "".join(parts)))
    text = re.sub(r"[ \t]+", " ", text.replace("\x00", ""))
    return re.sub(r"\n\s*\n+", "\n\n", text)


def fetch_henry(workdir: Path) -> list[Document]:
    root = _fetch_deb("sword-comm-mhcc", workdir)
    folder = _find_one(root, "usr/share/sword/modules/comments/zcom/mhcc")
    text = "\n\n".join(read_sword(folder / f"{t}.bzs", folder / f"{t}.bzz") for t in ("ot", "nt"))
    return [_make_document("henry-concise-commentary", "Concise Commentary on the Whole Bible (Matthew Henry)",
                           "debian:sword-comm-mhcc", text)]


SOURCES = {
    "doyle": (_DOYLE, fetch_doyle),
    "twain": (_TWAIN, fetch_twain),
    "newton": (f"debian:{_GO_BROTLI}", fetch_newton),
    "lcet10": (f"pypi:{_BROTLI}", fetch_lcet10),
    "henry": ("debian:sword-comm-mhcc", fetch_henry),
}
