"""Resumable evaluations: every finished unit of a long run is kept in a JSON-lines file beside its
results (``<out>.partial.jsonl``), so that an interrupted run started again with ``--resume`` skips
what it already scored.

The first line is a header naming what is being run (the evaluation, its config, the model); a
resume reads the file back only if the header is the same, so units of another setting are never
mixed in; a run without ``--resume`` refuses to overwrite a partial file (hours of work may be in
it). Each later line is one unit (an ICL (task, seed, k, mode) accuracy, a ChapterBreak example in
one mode, one perplexity run on one file, one passkey prompt in one mode) and the seconds it took.
Lines are appended and flushed one at a time; a torn last line (the process died while writing it)
is dropped. A finished run deletes the file, and so does one that stops before its first unit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from longmem.errors import LongMemError


def partial_path(out: Path) -> Path:
    """The partial file of a results JSON: results/icl.json -> results/icl.partial.jsonl."""
    return Path(out).with_suffix(".partial.jsonl")


class PartialLog:
    """Units finished so far by one evaluation run (see the module docstring)."""

    def __init__(self, path: Path, header: dict, resume: bool = False):
        self.path, self.header = Path(path), json.loads(json.dumps(header))  # as it reads back from JSON
        self.units: list[dict] = []
        self.seconds = 0.0  # spent on the units read back
        self.added = 0  # units written by this run
        if not resume and self.path.exists():
            raise LongMemError(f"{self.path} holds partial results of an interrupted run: add --resume to continue it, "
                               "or delete the file to start over")
        if resume and self.path.exists():
            self._read()
            self._file = self.path.open("a", encoding="utf-8")
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("w", encoding="utf-8")
            self._write({"header": self.header})

    def _read(self) -> None:
        lines = self.path.read_text(encoding="utf-8").splitlines()
        rows = []
        for i, line in enumerate(lines):
            try:
                rows.append(json.loads(line))
            except ValueError:
                if i == len(lines) - 1:  # torn by a crash while writing it
                    break
                raise LongMemError(f"{self.path} line {i + 1} is not JSON: delete the file to start over") from None
        if not rows or rows[0].get("header") != self.header:
            raise LongMemError(f"{self.path} holds partial results of another run (evaluation, config or model "
                               "differ): delete it or run without --resume")
        valid = "\n".join(lines[: len(rows)]) + "\n"
        if len(rows) < len(lines):  # drop the torn line before appending after it
            self.path.write_text(valid, encoding="utf-8")
        for row in rows[1:]:
            self.units.append(row["unit"])
            self.seconds += float(row.get("seconds", 0.0))

    def _write(self, row: dict) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def add(self, unit: dict, seconds: float) -> None:
        self._write({"unit": unit, "seconds": seconds})
        self.added += 1

    def finish(self) -> None:
        """The run is complete (its results JSON written): the partial file goes."""
        self._file.close()
        self.path.unlink(missing_ok=True)

    def close(self) -> None:
        """The run stopped early: keep the file for --resume, unless it holds no unit (a run refused
        before its first one leaves nothing behind)."""
        self._file.close()
        if not self.units and not self.added:
            self.path.unlink(missing_ok=True)
