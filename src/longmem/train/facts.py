"""Synthetic facts: a statement in one segment, a question about it segments later.

Recall spans (``recall.py``) teach copying a passage that restarts verbatim; they do not teach
answering a *question about a stated fact*, whose wording differs from the statement's and
whose answer is the one token no book would predict (a number, a made-up name). On book
text a 3-token exact match predicts the next token only ~20% of the time, so a copy head
trained on books alone learns to trust such a match at ~0.15 and the answer loses to the
model's own " a" / " the".

A :class:`FactPlanter` writes, with probability ``prob`` per row and segment, a statement such
as "The lantern of Wilkins was 40213." over the book text, remembers it, and once the statement
is older than the local segment and the short-term tier (``near`` tokens back) and still held
by the bank (``reach``), writes a question whose last words restate the subject ("Tell me about
the lantern of Wilkins. The lantern of Wilkins was") followed by the answer. Only the memory
can supply the answer. Subjects are random words of the tokenizer's vocabulary, values random
numbers (1-7 digits) or words; the wordings are drawn from a few templates each. Words used by
the passkey evaluation's needle and question ("pass", "key", "remember") are never drawn, and
no template uses the passkey's wording.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch

from longmem.train.stream import IGNORE_INDEX, Batch

COPULAS = ("is", "was")
STATEMENTS = ("{X} {c} {v}.", "It is known that {x} {c} {v}.", "Note this: {x} {c} {v}.",
              "They all agreed that {x} {c} {v}.", "In the letter, {x} {c} {v}.")
KEYED_STATEMENTS = STATEMENTS + ("The record for {x} {c}: {v}.", "Write it down: for {x} the figure {c}: {v}.")
"""The statements of facts asked by key (some with a colon before the value: the answer starts with it)."""
QUESTIONS = ("Tell me about {x}. {X} {c}", "And {x}? {X} {c}", "Now, as to {x}: {x} {c}",
             "Which one? Recall that {x} {c}", "I asked again. {X} {c}", "Q: {x}? A: {X} {c}")
KEYED_QUESTIONS = ("Tell me about {x}. It {c}", "And what of {x}? Its value {c}", "Think back to {x}. That one {c}",
                   "Q: {x}? A: the answer {c}", "Of all of them, I mean {x}. It {c}",
                   "Which value went with {x}? The value {c}")
"""Questions that name the subject but do not end by restating it: the words right before the answer are
shared by every statement of the form, and only the subject's words, further back, tell which one is meant
(``memory/keyed.py``)."""
LIST_QUESTIONS = ("List each figure noted for {x}, newest first. They {C}", "Every value ever given to {x}? Latest first, they {C}",
                  "Go over {x} once more. Its values {C}", "Name them all for {x}, the last one first. They {C}")
"""Questions for every value a subject was given (statements of one form each time): the answer lists them,
the latest first, each copied from its own statement (``memory/keyed.py``'s *said* mark moves a list on)."""
PAIR_QUESTIONS = ("Now {x}, and also {y}. Latest first, they {C}", "Two of them: {x} and {y}. Their values {C}",
                  "Recall both {x} and {y}; in turn they {C}", "Back to {y} and to {x}. Newest first, they {C}")
"""Questions for the values of two subjects at once (the one stated last first)."""
PLURAL = {"is": "are", "was": "were"}
LIST_MAX = 4  # values one subject is given at most
SUBJECTS = ("the {a} {b}", "the {a} of {N}", "{N}'s {a}", "the {a} of the {b}", "the {a} {b} of {N}")
FALLBACK_WORDS = ("lamp", "river", "coat", "garden", "window", "letter", "horse", "silver", "candle", "bridge",
                  "orchard", "ribbon", "kettle", "harbour", "meadow", "lantern", "basket", "violin", "chapel", "mirror")
FALLBACK_NAMES = ("Wilkins", "Harriet", "Tobias", "Mabel", "Crawley", "Ingram", "Lucasta", "Pemberton", "Odile",
                  "Quill")
EXCLUDED = frozenset({"pass", "key", "keys", "remember", "passkey"})  # the passkey evaluation's words


@dataclass
class Fact:
    """A planted statement waiting for its question: the row's document and where it was written."""

    doc: int  # the row's document index
    position: int  # absolute position of the statement's first token
    question: list[int]  # the question's ids, ending right before the answer
    answer: list[int]  # the answer's ids, its closing "." included (the book text follows it)
    subject: str = ""  # what the statement is about (an update restates it with a new value)
    value: str = ""  # the stated value as text
    copula: str = "is"  # the statement's copula ("is" / "was")
    form: int = -1  # which of KEYED_STATEMENTS it used (-1: a plain fact)
    listed: bool = False  # one of several values of its subject: asked for with all of them, as a list
    number: bool = False  # the value is a number of 3 or more digits (lists and pairs are made of these)

    def to_list(self) -> list:
        return [self.doc, self.position, self.question, self.answer, self.subject, self.value, self.copula,
                self.form, self.listed, self.number]


class Stated(NamedTuple):
    """A fact as ids, with what a later restatement or list needs to know of it."""

    statement: list[int]
    question: list[int]  # ends right before the answer
    answer: list[int]
    subject: str
    value: str
    copula: str
    form: int  # index into KEYED_STATEMENTS (plain facts: into STATEMENTS, which it starts with)
    number: bool


class FactWords:
    """The words and names facts are made of: the tokenizer's single-token words (a short built-in
    list for tokenizers with few, e.g. byte-level ones)."""

    def __init__(self, tokenizer: Any):
        words, names = [], []
        for i in range(len(tokenizer)):
            text = tokenizer.decode([i])
            if re.fullmatch(r" [a-z]{3,12}", text) and text[1:] not in EXCLUDED:
                words.append(text[1:])
            elif re.fullmatch(r" [A-Z][a-z]{2,12}", text) and text[1:].lower() not in EXCLUDED:
                names.append(text[1:])
        if len(words) < 50 or len(names) < 10:
            words, names = list(FALLBACK_WORDS), list(FALLBACK_NAMES)
        self.tokenizer, self.words, self.names = tokenizer, words, names

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def fact(self, rng: random.Random, keyed: bool = False, subject: str | None = None,
             avoid: frozenset[str] = frozenset(), like: Fact | None = None, number: bool = False) -> Stated:
        """A new fact. ``keyed``: the question does not restate the subject at its end; ``subject``: state a
        new value of it; else a new subject, not one of ``avoid`` (the subjects still waiting: a question must
        name one fact). ``like``: another value of that fact's subject, in its form and copula; ``number``:
        the value is a number of 3-7 digits."""
        if like is not None:
            subject = like.subject
        x = subject
        while x is None or (subject is None and x in avoid):
            a, b = rng.choice(self.words), rng.choice(self.words)
            x = rng.choice(SUBJECTS).format(a=a, b=b, N=rng.choice(self.names))
        cap = x[0].upper() + x[1:]
        cop = like.copula if like is not None else rng.choice(COPULAS)
        number = number or like is not None
        digits = rng.randint(3 if number else 1, 7)
        if number or rng.random() < 0.5:
            value = str(rng.randrange(10 ** (digits - 1) if digits > 1 else 0, 10**digits))
        else:
            value = rng.choice(self.words if rng.random() < 0.5 else self.names)
        forms = KEYED_STATEMENTS if keyed else STATEMENTS
        form = like.form if like is not None and like.form >= 0 else rng.randrange(len(forms))
        statement = "\n" + forms[form].format(X=cap, x=x, c=cop, v=value) + "\n"
        question = "\n" + rng.choice(KEYED_QUESTIONS if keyed else QUESTIONS).format(X=cap, x=x, c=cop)
        answer = _colon(form) + " " + value + "."  # what follows the copula in the statement
        return Stated(self.encode(statement), self.encode(question), self.encode(answer), x, value, cop,
                      form, value.isdigit() and len(value) >= 3)

    def list_question(self, rng: random.Random, facts: list[Fact]) -> tuple[list[int], list[int]]:
        """Every value of one subject, or the values of two subjects -> (question ids, answer ids): the
        values the latest stated first, after the plural of the latest one's copula (and its colon)."""
        facts = sorted(facts, key=lambda f: -f.position)
        subjects = list(dict.fromkeys(f.subject for f in facts))
        plural = PLURAL[facts[0].copula]
        if len(subjects) == 1:
            question = rng.choice(LIST_QUESTIONS).format(x=subjects[0], C=plural)
        else:
            x, y = rng.sample(subjects, 2)
            question = rng.choice(PAIR_QUESTIONS).format(x=x, y=y, C=plural)
        values = [f.value for f in facts]
        last = " and " if rng.random() < 0.5 else ", "
        listed = ", ".join(values[:-1]) + last + values[-1] if len(values) > 1 else values[0]
        return self.encode("\n" + question), self.encode(_colon(facts[0].form) + " " + listed + ".")


def _colon(form: int) -> str:
    """What a statement of form ``form`` puts between its copula and its value: ":" or nothing (plain facts:
    -1; STATEMENTS, which KEYED_STATEMENTS starts with, have no colon)."""
    return ":" if form >= 0 and "{c}:" in KEYED_STATEMENTS[form] else ""


class FactPlanter:
    """Plants facts in training batches and asks about them later (state: the waiting facts)."""

    def __init__(self, words: FactWords, batch_size: int, prob: float, seed: int = 0, keyed: float = 0.0,
                 update: float = 0.0, listed: float = 0.0, pair: float = 0.0):
        for name, p in (("fact", prob), ("keyed question", keyed), ("update", update), ("list", listed),
                        ("pair", pair)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} probability {p} must be in [0, 1]")
        self.words, self.prob, self.keyed, self.update = words, prob, keyed, update
        self.listed, self.pair = listed, pair
        self.rng = random.Random(seed)
        self.waiting: list[list[Fact]] = [[] for _ in range(batch_size)]

    def state_dict(self) -> dict:
        version, internal, _ = self.rng.getstate()
        return {"waiting": [[f.to_list() for f in row] for row in self.waiting], "rng": list(internal),
                "rng_version": version}

    def load_state_dict(self, state: dict) -> None:
        self.waiting = [[Fact(*f) for f in row] for row in state["waiting"]]
        self.rng.setstate((state["rng_version"], tuple(state["rng"]), None))

    def plant(self, batch: Batch, near: int, reach: int, questions: int = 2
              ) -> tuple[Batch, torch.Tensor, list[tuple[int, int, int]]]:
        """-> (batch with questions and statements written in, answer mask [B,T] (labels that are
        an answer's tokens), written (row, start, end) absolute ranges). Per row and segment: each
        fact old enough is asked with probability 1/2 (oldest first, at most ``questions``), and a
        new statement is planted with probability ``prob``; writes never overlap."""
        ids, labels = batch.input_ids.clone(), batch.labels.clone()
        b, t = ids.shape
        dev = ids.device  # the batch is prepared on the host
        answers = torch.zeros(b, t, dtype=torch.bool, device=dev)
        written = []
        for row in range(b):
            p0, doc = int(batch.positions[row, 0]), int(batch.doc_index[row])
            if bool(batch.reset[row]):
                self.waiting[row] = []
            self.waiting[row] = [f for f in self.waiting[row] if f.doc == doc and f.position >= p0 - reach]
            items = self._questions(self.waiting[row], p0 - near, questions)  # (ids, facts asked, answer length)
            asked = [f for _, fs, _ in items for f in fs]
            new, old, like = None, None, None
            if self.rng.random() < self.prob:
                keyed = self.keyed > 0 and self.rng.random() < self.keyed
                others = [f for f in self.waiting[row] if f not in asked]
                lists = [f for f in others if keyed and f.number and f.form >= 0
                         and sum(g.subject == f.subject for g in others) < LIST_MAX]
                if self.listed > 0 and lists and self.rng.random() < self.listed:  # one more value of a subject
                    like = self.rng.choice(lists)
                elif self.update > 0 and others and self.rng.random() < self.update:  # a new value for an old one
                    old = self.rng.choice([f for f in others if not f.listed] or [None])
                number = keyed and (self.listed > 0 or self.pair > 0) and self.rng.random() < 0.5
                new = self.words.fact(self.rng, keyed, old.subject if old is not None else None,
                                      frozenset(f.subject for f in self.waiting[row]), like, number)
                items.append((new.statement, [], 0))  # a statement
            valid = int((batch.labels[row] != IGNORE_INDEX).sum())  # labelled tokens: room to write in
            while items and sum(len(seq) + 1 for seq, _, _ in items) + 1 > valid:
                items.pop()
            if not items:
                continue
            self.rng.shuffle(items)
            room = valid - sum(len(seq) + 1 for seq, _, _ in items) - 1
            gaps = sorted(self.rng.randint(0, room) for _ in items)
            o, used = 1, 0
            for (seq, facts, answer), gap in zip(items, gaps):
                o += gap - used  # the offsets keep their order and one free token after each write
                used = gap
                ids[row, o : o + len(seq)] = torch.tensor(seq, device=dev)
                labels[row, o - 1 : o + len(seq) - 1] = torch.tensor(seq, device=dev)
                labels[row, o + len(seq) - 1] = ids[row, o + len(seq)]  # the book text resumes
                written.append((row, p0 + o, p0 + o + len(seq)))
                if not facts:
                    if old is not None:  # the latest statement of a subject is the one asked about
                        self.waiting[row].remove(old)
                    if like is not None:  # several values of one subject: asked for all at once
                        for f in self.waiting[row]:
                            f.listed = f.listed or f.subject == like.subject
                    self.waiting[row].append(Fact(doc, p0 + o, new.question, new.answer, new.subject, new.value,
                                                  new.copula, new.form if keyed else -1, like is not None,
                                                  new.number))
                else:
                    q = len(seq) - answer
                    answers[row, o + q - 1 : o + len(seq) - 2] = True  # the answer's tokens (its "." aside)
                    for f in facts:
                        self.waiting[row].remove(f)
                o += len(seq) + 1
        return Batch(ids, labels, batch.positions, batch.reset, batch.doc_index), answers, written

    def _questions(self, waiting: list[Fact], before: int, most: int) -> list[tuple[list[int], list[Fact], int]]:
        """Questions to write: each fact stated before ``before`` asked with probability 1/2 (oldest first,
        at most ``most``); a subject with several values asked once all are that old, for all of them; with
        probability ``pair`` two number facts asked together -> [(question and answer ids, facts asked,
        answer length)]."""
        out: list[tuple[list[int], list[Fact], int]] = []
        taken: list[Fact] = []
        for f in waiting:
            if len(out) >= most or f in taken or f.position > before or self.rng.random() >= 0.5:
                continue
            group = [g for g in waiting if g.subject == f.subject] if f.listed else [f]
            if any(g.position > before for g in group):
                continue
            if not f.listed and f.number and f.form >= 0 and self.pair > 0 and self.rng.random() < self.pair:
                mates = [g for g in waiting if g not in taken and g is not f and not g.listed and g.number
                         and g.form >= 0 and g.position <= before]
                if mates:
                    group = [f, self.rng.choice(mates)]
            taken += group
            if len(group) == 1 and not f.listed:
                out.append((f.question + f.answer, group, len(f.answer)))
                continue
            question, answer = self.words.list_question(self.rng, group)
            out.append((question + answer, group, len(answer)))
        return out
