import random
import re

import numpy as np
import torch

from conftest import byte_tokenizer
from longmem.train.facts import EXCLUDED, Fact, FactPlanter, FactWords
from longmem.train.stream import DocumentStream
from longmem.data.tokens import TokenizedCorpus


def corpus(lengths):
    ids = np.concatenate([np.full(n, 40 + i) for i, n in enumerate(lengths)]).astype(np.uint32)  # one byte per doc
    starts = np.cumsum([0] + list(lengths[:-1]))
    return TokenizedCorpus(ids, [f"d{i}" for i in range(len(lengths))], np.array(starts), np.array(lengths))


def test_a_fact_is_stated_then_asked_once_it_has_left_the_local_context():
    tok = byte_tokenizer()
    c = corpus([6000, 6000])
    stream = DocumentStream(c, batch_size=2, segment_length=256, shuffle=False)
    planter = FactPlanter(FactWords(tok), batch_size=2, prob=0.5, seed=0)
    stated: dict[tuple[int, int], str] = {}  # (row, absolute position) -> the statement text
    asked = 0
    for _ in range(20):
        batch = next(stream)
        new, answers, written = planter.plant(batch, near=512, reach=4096)
        for row, start, end in written:
            p0 = int(batch.positions[row, 0])
            text = tok.decode(new.input_ids[row, start - p0 : end - p0])
            real = new.labels[row] != -100
            assert (new.labels[row, :-1][real[:-1]] == new.input_ids[row, 1:][real[:-1]]).all()  # next-token labels
            if not answers[row, start - p0 - 1 : end - p0].any():
                stated[(row, start)] = text
                continue
            asked += 1
            answer = tok.decode(new.labels[row, start - p0 - 1 : end - p0][answers[row, start - p0 - 1 : end - p0]])
            earlier = [(pos, s) for (r, pos), s in stated.items() if r == row and answer + "." in s]
            assert earlier, (text, answer)
            pos, statement = earlier[-1]
            assert 512 <= p0 - pos and pos >= p0 - 4096  # out of the local context, still in the bank
            assert text.endswith(answer + ".")
            last = " ".join(text[: -len(answer) - 1].split(" ")[-2:])  # the question's last words ...
            assert last + answer + "." in statement  # ... are the statement's, right before the answer
    assert asked >= 3


def test_facts_restart_with_a_new_document_and_the_state_round_trips():
    tok = byte_tokenizer()
    c = corpus([600, 600])
    stream = DocumentStream(c, batch_size=1, segment_length=200, shuffle=False)
    planter = FactPlanter(FactWords(tok), batch_size=1, prob=1.0, seed=3)
    for _ in range(3):  # the first document: statements only (nothing is ever 10,000 tokens old)
        _, answers, _ = planter.plant(next(stream), near=10_000, reach=20_000)
        assert not answers.any()
    assert planter.waiting[0]
    state = planter.state_dict()
    other = FactPlanter(FactWords(tok), batch_size=1, prob=1.0, seed=99)
    other.load_state_dict(state)
    batch = next(stream)  # the second document resets the row: its waiting facts go
    a, b = planter.plant(batch, 10_000, 20_000), other.plant(batch, 10_000, 20_000)
    assert torch.equal(a[0].input_ids, b[0].input_ids)
    assert all(f.doc == int(batch.doc_index[0]) for f in planter.waiting[0])


def test_fact_words_avoid_the_passkey_wording():
    words = FactWords(byte_tokenizer())
    rng = random.Random(0)
    for _ in range(200):
        s, q, a = (words.tokenizer.decode(x) for x in words.fact(rng)[:3])
        assert not set(s.lower().replace(".", " ").split()) & EXCLUDED
        assert "pass key" not in q.lower()


def test_keyed_questions_name_the_subject_but_end_with_the_shared_words():
    words = FactWords(byte_tokenizer())
    rng = random.Random(1)
    for _ in range(100):
        s, q, a, subject = words.fact(rng, keyed=True)[:4]
        s, q, a = (words.tokenizer.decode(x) for x in (s, q, a))
        assert subject in q and not q.rstrip().endswith(subject.split()[-1] + " is")
        copula = q.split()[-1]
        assert q.split()[-2] != subject.split()[-1]  # the subject is not right before the answer
        assert f"{copula}{a}" in s  # the copula then the answer, as stated (a colon included)
    s, q, a, again = words.fact(rng, keyed=True, subject="the lamp of Mabel")[:4]
    assert again == "the lamp of Mabel" and "lamp of Mabel" in words.tokenizer.decode(s)


def test_an_updated_subject_is_asked_for_its_latest_value():
    tok = byte_tokenizer()
    stream = DocumentStream(corpus([40000]), batch_size=1, segment_length=256, shuffle=False)
    planter = FactPlanter(FactWords(tok), batch_size=1, prob=1.0, seed=5, keyed=1.0, update=0.5)
    statements: list[str] = []
    asked = updated = 0
    for _ in range(120):
        batch = next(stream)
        before = list(planter.waiting[0])
        new, answers, written = planter.plant(batch, near=512, reach=16384)
        p0 = int(batch.positions[0, 0])
        for _, start, end in sorted(written, key=lambda w: w[1]):
            if not answers[0, start - p0 - 1 : end - p0].any():
                statements.append(tok.decode(new.input_ids[0, start - p0 : end - p0]).lower())
        subjects_now = [f.subject for f in planter.waiting[0]]
        assert len(subjects_now) == len(set(subjects_now))  # a subject waits once, with its newest value
        for fact in before:
            if fact in planter.waiting[0]:
                continue
            if fact.subject in subjects_now:  # restated with a new value
                updated += 1
                continue
            asked += 1
            said = [s for s in statements if fact.subject.lower() + " " in s]
            assert tok.decode(fact.answer).strip(" :.").lower() in said[-1]  # the latest value is asked for
    assert asked >= 5 and updated >= 3


def test_training_text_never_uses_an_evaluation_template():
    """The keyed-recall evaluation's wordings (RULER's and the project's own held-out ones) never occur in
    what the training generator writes: its literal pieces of three or more words are searched for."""
    import string

    from longmem.evals.recall import HELD_OUT_TEMPLATES, RecallTemplates
    from longmem.evals.passkey import INTRO, NEEDLE, QUESTION

    texts = [getattr(t, f) for t in (RecallTemplates(), HELD_OUT_TEMPLATES) for f in t.__dataclass_fields__]
    pieces = set()
    for text in texts + [INTRO, NEEDLE, QUESTION]:
        for literal, *_ in string.Formatter().parse(text):
            words = literal.split()
            pieces |= {" ".join(words[i : i + 3]).lower() for i in range(len(words) - 2)}
    words = FactWords(byte_tokenizer())
    rng = random.Random(0)
    out = []
    for i in range(3000):
        out += [words.tokenizer.decode(x) for x in words.fact(rng, keyed=i % 2 == 0)[:3]]
    for i in range(600):  # lists of one subject's values and pairs of two subjects
        first = words.fact(rng, keyed=True, number=True)
        facts = [Fact(0, 0, [], [], first.subject, first.value, first.copula, first.form, True, True)]
        other = words.fact(rng, keyed=True, like=facts[0]) if i % 2 else words.fact(rng, keyed=True, number=True)
        facts.append(Fact(0, 1, [], [], other.subject, other.value, other.copula, other.form, True, True))
        out += [words.tokenizer.decode(other.statement)] + [words.tokenizer.decode(x)
                                                            for x in words.list_question(rng, facts)]
    written = " ".join(" ".join(o.split()) for o in out).lower()
    assert len(pieces) > 40
    hits = sorted(p for p in pieces if p in written)
    assert not hits, hits


def test_lists_and_pairs_ask_for_every_value_the_latest_first():
    tok = byte_tokenizer()
    stream = DocumentStream(corpus([80000]), batch_size=1, segment_length=256, shuffle=False)
    planter = FactPlanter(FactWords(tok), batch_size=1, prob=1.0, seed=2, keyed=1.0, listed=0.3, pair=0.5)
    kinds = {"list": 0, "pair": 0, "one": 0}
    for _ in range(300):
        batch = next(stream)
        before = list(planter.waiting[0])
        new, answers, written = planter.plant(batch, near=512, reach=16384)
        gone = [f for f in before if f not in planter.waiting[0]]
        p0 = int(batch.positions[0, 0])
        for _, start, end in written:
            a, b = start - p0, end - p0
            if not answers[0, a - 1 : b].any():
                continue  # a statement
            mask = answers[0, a - 1 : b - 1]  # labels: the token after each position
            question = tok.decode(new.input_ids[0, a:b][~mask])
            said = re.split(r", | and ", tok.decode(new.input_ids[0, a:b][mask]).lstrip(": "))
            group = sorted((f for f in gone if f.subject in question), key=lambda f: -f.position)
            assert group and said == [f.value for f in group], (question, said)
            subjects = {f.subject for f in group}
            kinds["one" if len(group) == 1 else "list" if len(subjects) == 1 else "pair"] += 1
            if len(group) > 1:
                assert all(f.number and len(f.value) >= 3 for f in group)
    assert kinds["list"] >= 3 and kinds["pair"] >= 3 and kinds["one"] >= 5, kinds
