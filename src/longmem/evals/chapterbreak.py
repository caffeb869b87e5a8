"""ChapterBreak-style suffix identification on books with chapter headings.

For a chapter boundary of a book, the *prefix* is the P tokens of text right before the
chapter's heading line; the 6 *candidates* are the first S tokens (heading lines left out)
of the true chapter and of 5 other chapters of the same book. Negatives are drawn only
from chapters whose opening lies outside the prefix, so no candidate was read before.
Each mode scores every candidate by its log-likelihood after the prefix (the last window
locally, the rest through memory, see :mod:`longmem.evals.scoring`); the example is
right when the true opening scores highest. Chance is 1/6. A second score (``pmi``) subtracts
each candidate's log-likelihood after a blank line alone (same mode, nothing read): raw
likelihood mostly ranks how predictable an opening is in itself, the difference ranks what
the prefix adds.

Books: the held-out novels of the corpus (chapters from its manifest), or any .txt files
or folders of them, chapters found by ``heading`` (a regex matched per line) or by
:func:`longmem.data.books.find_chapters`.
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from tqdm.auto import tqdm

from longmem.data.books import find_chapters
from longmem.errors import LongMemError
from longmem.files import read_text
from longmem.evals.results import wilson
from longmem.evals.scoring import Mode, Scorer, parse_modes, prepare, score, split_prefix

log = logging.getLogger(__name__)

TEST_BOOKS = ["data/books/test/austen-emma.txt", "data/books/test/austen-persuasion.txt"]


@dataclass
class ChapterBreakConfig:
    """Settings of one ChapterBreak-style evaluation."""

    books: list[str] = field(default_factory=lambda: list(TEST_BOOKS))
    """UTF-8 .txt files or folders of them (default: the held-out Austen novels)."""
    prefix_lengths: list[int] = field(default_factory=lambda: [4096, 8192, 16384])
    """P: prefix lengths in tokens (a boundary is used when the book has P tokens before it)."""
    suffix_tokens: int = 128
    """S: tokens of every candidate opening."""
    candidates: int = 6
    """Candidates per example: the true opening + candidates - 1 negatives."""
    max_examples: int | None = None
    """At most this many boundaries per book and prefix length (evenly spaced; None: all)."""
    modes: list[str] = field(default_factory=lambda: ["memory", "no-memory", "backbone", "window"])
    """Scoring modes: memory, no-memory, backbone, window-W, window (see scoring.parse_mode)."""
    heading: str | None = None
    """Regex of a chapter heading line, e.g. '^(CHAPTER|Chapter) [IVXLC0-9]+' (None: find_chapters)."""
    seed: int = 0
    """Seeds the choice of negatives."""
    pmi: bool = True
    """Also score each candidate after a blank line alone and pick by the difference (pointwise mutual
    information with the prefix): what the prefix adds, not how likely the opening is anyway."""

    def __post_init__(self) -> None:
        if not self.books:
            raise LongMemError("no books given")
        if not self.prefix_lengths or any(p <= 0 for p in self.prefix_lengths):
            raise LongMemError(f"prefix lengths must be positive, not {self.prefix_lengths}")
        if self.suffix_tokens <= 0 or self.candidates < 2:
            raise LongMemError(f"need suffix_tokens > 0 and candidates >= 2, not {self.suffix_tokens} / "
                               f"{self.candidates}")
        if self.max_examples is not None and self.max_examples <= 0:
            raise LongMemError(f"max_examples={self.max_examples} must be positive")
        if self.heading is not None:
            try:
                re.compile(self.heading)
            except re.error as exc:
                raise LongMemError(f"bad heading regex {self.heading!r}: {exc}") from None


@dataclass
class Book:
    """A tokenized book: ids [N], where each chapter's heading starts, each chapter's opening."""

    name: str
    ids: torch.Tensor  # [N]
    heading_at: list[int]  # token index of every chapter's heading line
    openings: list[torch.Tensor]  # [<=S] first tokens of every chapter's text after its heading


def book_files(paths: list[str]) -> list[Path]:
    """Expand folders to their sorted .txt files; every path must exist."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(p.glob("*.txt"))
            if not found:
                raise LongMemError(f"no .txt files in {p}")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise LongMemError(f"no such file or folder: {p}")
    return files


def chapter_starts(text: str, heading: str | None) -> list[int]:
    """Character offsets of chapter heading lines."""
    if heading is None:
        return find_chapters(text)
    return [m.start() for m in re.finditer(heading, text, re.MULTILINE)]


def load_book(path: Path, tokenizer, config: ChapterBreakConfig) -> Book:
    """Tokenize a book piece by piece so that chapter boundaries fall on token boundaries."""
    text = read_text(path)
    starts = chapter_starts(text, config.heading)

    def encode(s: str) -> list[int]:
        return tokenizer(s, add_special_tokens=False)["input_ids"] if s else []

    ids, heading_at, openings = encode(text[: starts[0]] if starts else text), [], []
    for a, b in zip(starts, [*starts[1:], len(text)]):
        line_end = text.find("\n", a)
        body_at = b if line_end < 0 or line_end > b else line_end
        heading_at.append(len(ids))
        ids += encode(text[a:body_at]) + encode(text[body_at:b])
        openings.append(torch.tensor(encode(text[body_at:b].lstrip()[: 40 * config.suffix_tokens])
                                     [: config.suffix_tokens], dtype=torch.long, device="cpu"))
    return Book(path.stem, torch.tensor(ids, dtype=torch.long, device="cpu"), heading_at, openings)


@dataclass
class Example:
    """One boundary: prefix ids, candidate chapters (index 0 of ``chapters`` is the truth)."""

    book: str
    chapter: int
    prefix_length: int
    prefix: torch.Tensor  # [P]
    chapters: list[int]  # candidate chapter indices, shuffled; ``gold`` is the true one's position
    gold: int


def examples(book: Book, p: int, config: ChapterBreakConfig) -> list[Example]:
    """Every usable boundary of ``book`` for prefix length p (evenly thinned to max_examples)."""
    s, k = config.suffix_tokens, config.candidates
    full = [i for i, o in enumerate(book.openings) if o.shape[0] == s]
    out = []
    for i in full:
        at = book.heading_at[i]
        if at < p:
            continue
        unseen = [j for j in full if j != i and not at - p - s <= book.heading_at[j] < at]  # not read
        if len(unseen) < k - 1:
            continue
        rng = random.Random(f"{config.seed}-{book.name}-{i}-{p}")
        chapters = [i, *rng.sample(unseen, k - 1)]
        rng.shuffle(chapters)
        out.append(Example(book.name, i, p, book.ids[at - p : at], chapters, chapters.index(i)))
    if config.max_examples and len(out) > config.max_examples:
        step = len(out) / config.max_examples
        out = [out[int(j * step)] for j in range(config.max_examples)]
    return out


@dataclass
class ChapterBreakItem:
    """One example scored in one mode."""

    mode: str
    book: str
    chapter: int
    prefix_length: int
    gold: int
    scores: list[float]  # log-likelihood of every candidate
    correct: bool
    unconditional: list[float] = field(default_factory=list)  # each candidate's log-likelihood after a blank line
    correct_pmi: bool | None = None  # the best scores - unconditional is the true one (None: not scored)


@dataclass
class ChapterBreakResult:
    """Every scored example; accuracy with a 95% Wilson interval per mode and prefix length."""

    config: ChapterBreakConfig
    items: list[ChapterBreakItem]

    def accuracy(self, mode: str, prefix_length: int | None = None, book: str | None = None,
                 pmi: bool = False) -> dict:
        rows = [r for r in self.items if r.mode == mode and (prefix_length is None or r.prefix_length == prefix_length)
                and (book is None or r.book == book) and (not pmi or r.correct_pmi is not None)]
        n, c = len(rows), sum(bool(r.correct_pmi if pmi else r.correct) for r in rows)
        low, high = wilson(c, n)
        return {"n": n, "correct": c, "accuracy": c / n if n else float("nan"), "ci95": [low, high]}

    def summary(self) -> dict:
        books = sorted({r.book for r in self.items})
        modes = {}
        for mode in dict.fromkeys(r.mode for r in self.items):
            modes[mode] = {"all": self.accuracy(mode),
                           "by_prefix": {str(p): self.accuracy(mode, p) for p in self.config.prefix_lengths},
                           "by_book": {b: self.accuracy(mode, book=b) for b in books}}
            if any(r.mode == mode and r.correct_pmi is not None for r in self.items):
                modes[mode]["pmi"] = {"all": self.accuracy(mode, pmi=True), "by_prefix": {
                    str(p): self.accuracy(mode, p, pmi=True) for p in self.config.prefix_lengths}}
        return {"chance": 1 / self.config.candidates, "modes": modes}

    def to_dict(self) -> dict:
        summary = self.summary()
        modes = summary["modes"]
        if "memory" in modes and "backbone" in modes:
            summary["memory_minus_backbone_points"] = 100 * (modes["memory"]["all"]["accuracy"]
                                                             - modes["backbone"]["all"]["accuracy"])
        return {"summary": summary, "items": [asdict(r) for r in self.items]}


def _best(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


ItemHook = Callable[[ChapterBreakItem, float], None]
"""Called with every newly scored example in one mode and the seconds it took."""


@torch.no_grad()
def chapterbreak(model: Scorer, config: ChapterBreakConfig | None = None, progress: bool = False,
                 done: list[ChapterBreakItem] | None = None, on_item: ItemHook | None = None) -> ChapterBreakResult:
    """Build the examples of every book and prefix length and score them in every mode.

    ``done``: items of an interrupted run of the same config, kept instead of scored again.
    """
    config = config or ChapterBreakConfig()
    modes = parse_modes(model, config.modes)
    books = [load_book(f, model.tokenizer, config) for f in book_files(config.books)]
    todo = [(book, ex) for book in books for p in config.prefix_lengths for ex in examples(book, p, config)]
    if not todo:
        raise LongMemError(f"no usable chapter boundary: every book needs >= {config.candidates} chapters with "
                           f"{config.suffix_tokens}-token openings and a boundary after "
                           f"{min(config.prefix_lengths)} tokens")
    finished = {(d.book, d.chapter, d.prefix_length, d.mode): d for d in done or []}
    unconditional = Unconditional(model)
    items = []
    for book, ex in tqdm(todo, desc="chapterbreak", unit="example", disable=not progress, leave=False):
        for mode in modes:
            if (ex.book, ex.chapter, ex.prefix_length, mode.name) in finished:
                items.append(finished[ex.book, ex.chapter, ex.prefix_length, mode.name])
                continue
            start = time.perf_counter()
            head, local = split_prefix(ex.prefix, mode.window, config.suffix_tokens)
            ctx = prepare(model, mode, head)
            scores = [score(model, ctx, local, book.openings[j]).logprob for j in ex.chapters]
            item = ChapterBreakItem(mode.name, ex.book, ex.chapter, ex.prefix_length, ex.gold, scores,
                                    _best(scores) == ex.gold)
            items.append(with_pmi(item, unconditional(mode, book, ex.chapters)) if config.pmi else item)
            log.info("%s chapter %d P=%d %s: %s", ex.book, ex.chapter, ex.prefix_length, mode.name,
                     "right" if items[-1].correct else "wrong")
            if on_item is not None:
                on_item(items[-1], time.perf_counter() - start)
    return ChapterBreakResult(config, items)


class Unconditional:
    """Each candidate opening's log-likelihood after a blank line alone, per mode, computed once."""

    def __init__(self, model: Scorer):
        self.model = model
        ids = model.tokenizer("\n\n", add_special_tokens=False)["input_ids"][-1:]
        self.blank = torch.tensor(ids, dtype=torch.long, device="cpu")  # [1]
        self.cache: dict[tuple[str, str, int], float] = {}  # (mode, book, chapter) -> log-likelihood

    @torch.no_grad()
    def __call__(self, mode: Mode, book: Book, chapters: list[int]) -> list[float]:
        empty = None
        for j in chapters:
            if (mode.name, book.name, j) not in self.cache:
                empty = empty or prepare(self.model, mode, self.blank[:0])  # nothing read
                self.cache[mode.name, book.name, j] = score(self.model, empty, self.blank, book.openings[j]).logprob
        return [self.cache[mode.name, book.name, j] for j in chapters]


def with_pmi(item: ChapterBreakItem, unconditional: list[float]) -> ChapterBreakItem:
    """The item with its candidates' unconditional log-likelihoods and the PMI verdict."""
    pmi = [a - b for a, b in zip(item.scores, unconditional)]
    return dataclasses.replace(item, unconditional=unconditional, correct_pmi=_best(pmi) == item.gold)


def add_pmi(model: Scorer, config: ChapterBreakConfig, items: list[ChapterBreakItem]) -> list[ChapterBreakItem]:
    """Items of a run made without the second score, with it (the model must be the one that made them)."""
    books = {b.name: b for b in (load_book(f, model.tokenizer, config) for f in book_files(config.books))}
    modes = {m.name: m for m in parse_modes(model, list(dict.fromkeys(i.mode for i in items)))}
    unconditional = Unconditional(model)
    out = []
    for item in items:
        book = books[item.book]
        ex = next(e for e in examples(book, item.prefix_length, config) if e.chapter == item.chapter)
        out.append(with_pmi(item, unconditional(modes[item.mode], book, ex.chapters)))
    return out
