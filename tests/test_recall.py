import numpy as np
import torch

from longmem.train.recall import insert_recall_spans
from longmem.train.stream import DocumentStream
from longmem.data.tokens import TokenizedCorpus


def corpus(lengths):
    ids = np.concatenate([np.arange(1000 * (i + 1), 1000 * (i + 1) + n) for i, n in enumerate(lengths)]).astype(np.uint32)
    starts = np.cumsum([0] + list(lengths[:-1]))
    return TokenizedCorpus(ids, [f"d{i}" for i in range(len(lengths))], np.array(starts), np.array(lengths))


def test_spans_copy_earlier_text_from_outside_the_local_segment():
    c = corpus([400, 300])
    stream = DocumentStream(c, batch_size=2, segment_length=32, shuffle=False)
    g = torch.Generator().manual_seed(0)
    seen = 0
    for _ in range(12):
        batch = next(stream)
        new, rec = insert_recall_spans(batch, c, prob=1.0, min_len=4, max_len=8, generator=g)
        spans = rec.mask
        for row in range(2):
            doc = c.document(int(batch.doc_index[row]))
            p0 = int(batch.positions[row, 0])
            changed = (new.input_ids[row] != batch.input_ids[row]).nonzero().flatten()
            if spans[row].any():
                seen += 1
                copied = new.input_ids[row, changed].numpy()
                start = int(np.where(doc == copied[0])[0][0])
                assert start + len(copied) <= p0 - 32  # source ends at least a segment back
                assert (doc[start : start + len(copied)] == copied).all()
            else:
                assert changed.numel() == 0
            real = new.labels[row] != -100
            ok = new.labels[row, :-1][real[:-1]] == new.input_ids[row, 1:][real[:-1]]
            assert ok.all()  # labels are always the next input token
    assert seen > 5


def test_no_spans_at_probability_zero_or_at_document_start():
    c = corpus([100])
    stream = DocumentStream(c, batch_size=1, segment_length=32, shuffle=False)
    batch = next(stream)
    new, rec = insert_recall_spans(batch, c, prob=1.0)
    spans = rec.mask
    assert not spans.any() and torch.equal(new.input_ids, batch.input_ids)


def test_sources_stay_within_reach_of_the_bank():
    c = corpus([2000])
    stream = DocumentStream(c, batch_size=1, segment_length=32, shuffle=False)
    g = torch.Generator().manual_seed(1)
    starts = []
    for _ in range(60):
        batch = next(stream)
        new, rec = insert_recall_spans(batch, c, prob=1.0, min_len=4, max_len=8, generator=g, near=64, reach=200)
        spans = rec.mask
        p0 = int(batch.positions[0, 0])
        if spans.any():
            copied = new.input_ids[0, spans[0].roll(1)].numpy()  # the span's tokens
            start = int(copied[0]) - 1000  # corpus ids are 1000 + position
            assert p0 - 200 <= start and start + len(copied) <= p0 - 64
            starts.append(p0 - start)
    assert len(starts) > 20 and max(starts) <= 200


def test_sources_name_the_position_each_copied_label_repeats_and_avoid_overwritten_text():
    c = corpus([3000])  # token id = 1000 + position
    stream = DocumentStream(c, batch_size=1, segment_length=32, shuffle=False)
    g = torch.Generator().manual_seed(2)
    avoid, checked = [[]], 0
    for _ in range(80):
        batch = next(stream)
        new, rec = insert_recall_spans(batch, c, prob=1.0, min_len=4, max_len=8, generator=g, near=64,
                                       avoid=avoid)
        has = rec.sources[0] >= 0
        if has.any():
            assert torch.equal(new.input_ids[0][has] - 1000, rec.sources[0][has])  # the token at its source
            assert torch.equal(new.labels[0][has] - 1000, rec.sources[0][has] + 1)  # the label follows it
            assert rec.mask[0][has].all()
            for a, e in avoid[0]:
                src = rec.sources[0][has]
                assert not ((src >= a) & (src < e)).any()  # never text that an earlier span overwrote
            checked += 1
        avoid[0] += [(start, end) for _, start, end in rec.written]
    assert checked > 20 and len(avoid[0]) > 20
