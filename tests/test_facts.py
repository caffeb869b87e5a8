import random

import numpy as np
import torch

from conftest import byte_tokenizer
from longmem.train.facts import EXCLUDED, FactPlanter, FactWords
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
        s, q, a = (words.tokenizer.decode(x) for x in words.fact(rng))
        assert not set(s.lower().replace(".", " ").split()) & EXCLUDED
        assert "pass key" not in q.lower()
