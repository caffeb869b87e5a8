"""Sentence-classification tasks for in-context learning: files, verbalizers, templates.

A task is a folder with ``train.*`` and a test file. Lines are read in whichever of three
formats the file uses: tab-separated with a header naming a ``label`` column (SST-2's
``sentence<TAB>label``), CSV ``label,text`` (``.csv``; text may be quoted), or
``label text`` (label, one space, text). The five tasks of the LongMem paper have built-in
label words and templates; any other task uses its labels as words (or a given mapping).
"""

from __future__ import annotations

import csv
import io
import logging
from dataclasses import dataclass
from pathlib import Path

from longmem.errors import LongMemError
from longmem.files import read_text

log = logging.getLogger(__name__)

REVIEW = "Review: {text} Sentiment:"
INPUT = "Input: {text} Type:"
POLARITY = {"0": "negative", "1": "positive"}


@dataclass(frozen=True)
class TaskSpec:
    """A known task: its folder name, test split, label words and prompt template."""

    folder: str
    test: str
    labels: dict[str, str]
    template: str


KNOWN = {
    "sst-2": TaskSpec("SST-2", "dev", POLARITY, REVIEW),
    "mr": TaskSpec("mr", "test", POLARITY, REVIEW),
    "mpqa": TaskSpec("mpqa", "test", POLARITY, REVIEW),
    "subj": TaskSpec("subj", "test", {"0": "subjective", "1": "objective"}, INPUT),
    "sst-5": TaskSpec("sst-5", "test", {"0": "terrible", "1": "bad", "2": "okay", "3": "good", "4": "great"}, REVIEW),
}


@dataclass
class Task:
    """A loaded task: (text, label key) pairs, label key -> word, template with ``{text}``."""

    name: str
    train: list[tuple[str, str]]
    test: list[tuple[str, str]]
    labels: dict[str, str]
    template: str

    def prompt(self, text: str) -> str:
        return self.template.format(text=text)

    def demo(self, text: str, label: str) -> str:
        """One demonstration, e.g. ``Review: {text} Sentiment: positive.``"""
        return f"{self.prompt(text)} {self.labels[label]}."


def read_examples(path: Path) -> list[tuple[str, str]]:
    """(text, label) pairs of one file in any of the three formats (see the module docstring)."""
    lines = [line for line in read_text(path).splitlines() if line.strip()]
    head = lines[0].split("\t")
    if len(head) >= 2 and "label" in [h.strip().lower() for h in head]:
        col = [h.strip().lower() for h in head].index("label")
        rows = [line.split("\t") for line in lines[1:]]
        pairs = [("\t".join(r[:col] + r[col + 1 :]), r[col]) if len(r) == len(head) else None for r in rows]
    elif path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO("\n".join(lines))))
        pairs = [(",".join(r[1:]), r[0]) if len(r) >= 2 else None for r in rows]
    else:
        pairs = [tuple(reversed(line.split(None, 1))) if len(line.split(None, 1)) == 2 else None for line in lines]
    for i, pair in enumerate(pairs):
        if pair is None or not pair[1].strip():
            raise LongMemError(f"{path}: line {i + 1} is not 'label<sep>text'")
    kept = [(text.strip(), label.strip()) for text, label in pairs if text.strip()]  # type: ignore[misc]
    if not kept:
        raise LongMemError(f"{path}: no example has any text")
    if len(kept) < len(pairs):  # e.g. MPQA's train.csv has a "0," line: a label without text
        log.warning("%s: %d example(s) with a label but no text skipped", path, len(pairs) - len(kept))
    return kept


def _find(folder: Path, stem: str) -> Path | None:
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.stem.lower() == stem)
    return found[0] if found else None


def task_folder(data: Path, name: str) -> Path:
    """The folder of task ``name``: a path, or a folder of ``data`` (case-insensitive)."""
    spec = KNOWN.get(name.lower())
    if Path(name).is_dir() and spec is None:
        return Path(name)
    if not data.is_dir():
        raise LongMemError(f"ICL data folder {data} does not exist (give --data)")
    want = (spec.folder if spec else name).lower()
    found = [p for p in data.iterdir() if p.is_dir() and p.name.lower() == want]
    if not found:
        raise LongMemError(f"no task folder {name!r} in {data}")
    return found[0]


def load_task(data: Path, name: str, labels: dict[str, str] | None = None, template: str | None = None) -> Task:
    """Load task ``name`` (known or not) with its train and test examples."""
    folder = task_folder(Path(data), name)
    spec = KNOWN.get(name.lower())
    train = _find(folder, "train")
    test = _find(folder, spec.test) if spec else (_find(folder, "test") or _find(folder, "dev"))
    if train is None or test is None:
        raise LongMemError(f"task folder {folder} needs a train file and a {spec.test if spec else 'test or dev'} file")
    train_ex, test_ex = read_examples(train), read_examples(test)
    keys = sorted({label for _, label in train_ex + test_ex})
    words = (spec.labels if spec else None) or labels or {k: k for k in keys}
    if not spec and not labels and all(k.lstrip("-").isdigit() for k in keys):
        raise LongMemError(f"task {name}: labels {', '.join(keys)} are numbers; give label words "
                           f"(e.g. --labels 0=negative,1=positive)")
    missing = [k for k in keys if k not in words]
    if missing:
        raise LongMemError(f"task {name}: no label word for {', '.join(missing)}")
    template = template or (spec.template if spec else REVIEW)
    if "{text}" not in template:
        raise LongMemError(f"template {template!r} has no {{text}} field")
    return Task(Path(name).name.lower(), train_ex, test_ex, {k: words[k] for k in keys}, template)
