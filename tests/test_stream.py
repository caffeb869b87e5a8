"""Offline tests for longmem.data.tokens and longmem.train.stream."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import byte_tokenizer

from longmem.data.books import Document, write_corpus
from longmem.train.stream import DocumentStream
from longmem.data.tokens import TokenizedCorpus, cache_key, tokenize_corpus, tokenize_texts
from longmem.errors import LongMemError

_LENGTHS = [5, 12, 1, 0, 30, 7, 16, 9, 3]  # documents 2 and 3 are too short to stream


def _corpus(lengths: list[int] = _LENGTHS) -> TokenizedCorpus:
    """Document i holds tokens 1000 * (i + 1) + position, so every token is unique."""
    parts = [np.arange(n, dtype=np.uint32) + 1000 * (i + 1) for i, n in enumerate(lengths)]
    starts = np.cumsum([0, *lengths[:-1]])
    return TokenizedCorpus(np.concatenate(parts), [f"doc{i}" for i in range(len(lengths))], starts,
                           np.array(lengths))


def _reads(stream: DocumentStream, num_batches: int) -> list[dict]:
    """Follow each row through ``num_batches`` batches, checking segment order, and return
    one record per document read, in the order the reads started."""
    lengths = stream.corpus.lengths
    reads, current = [], [None] * stream.batch_size
    for _ in range(num_batches):
        batch = next(stream)
        assert batch.input_ids.shape == batch.labels.shape == batch.positions.shape == (
            stream.batch_size, stream.segment_length)
        assert batch.input_ids.dtype == batch.labels.dtype == batch.positions.dtype == torch.long
        assert batch.reset.dtype == torch.bool
        for row in range(stream.batch_size):
            doc, positions = int(batch.doc_index[row]), batch.positions[row]
            if batch.reset[row]:
                assert current[row] is None or current[row]["end"] == lengths[current[row]["doc"]]
                current[row] = {"doc": doc, "end": 0, "inputs": [], "labels": []}
                reads.append(current[row])
            read = current[row]
            assert doc == read["doc"] and int(positions[0]) == read["end"] < lengths[doc]
            assert torch.equal(positions, torch.arange(read["end"], read["end"] + stream.segment_length))
            real = positions < int(lengths[doc])
            assert (batch.input_ids[row][~real] == 0).all() and (batch.labels[row][~real] == -100).all()
            read["inputs"] += batch.input_ids[row][real].tolist()
            read["labels"] += batch.labels[row][real].tolist()
            read["end"] = int(positions[real][-1]) + 1
    return reads


def _usable(lengths: list[int] = _LENGTHS, min_tokens: int = 2) -> set[int]:
    return {i for i, n in enumerate(lengths) if n >= min_tokens}


def test_tokenized_corpus_accessors() -> None:
    corpus = _corpus()
    assert len(corpus) == len(_LENGTHS) and corpus.num_tokens == sum(_LENGTHS)
    assert corpus.document(4).tolist() == list(range(5000, 5030))
    assert corpus.document(3).size == 0
    with pytest.raises(IndexError):
        corpus.document(len(_LENGTHS))
    with pytest.raises(LongMemError, match="doc_ids"):
        TokenizedCorpus(corpus.ids, ["a"], corpus.starts, corpus.lengths)


def test_tokenize_texts_matches_tokenizer() -> None:
    tokenizer = byte_tokenizer()
    corpus = tokenize_texts({"a": "Hello", "b": "", "c": "é!"}, tokenizer)
    assert corpus.doc_ids == ["a", "b", "c"] and corpus.ids.dtype == np.uint32
    assert corpus.lengths.tolist() == [5, 0, 3] and corpus.starts.tolist() == [0, 5, 5]
    assert corpus.document(0).tolist() == list(b"Hello") and corpus.document(2).tolist() == list("é!".encode())


@pytest.mark.parametrize("shuffle", [True, False])
def test_one_epoch_reads_every_token_once_with_next_token_labels(shuffle: bool) -> None:
    corpus = _corpus()
    stream = DocumentStream(corpus, batch_size=3, segment_length=4, seed=5, shuffle=shuffle)
    reads = _reads(stream, 60)
    usable = _usable()
    epoch0 = reads[: len(usable)]
    assert sorted(read["doc"] for read in epoch0) == sorted(usable)
    if not shuffle:
        assert [read["doc"] for read in epoch0] == sorted(usable)
    for read in epoch0:
        ids = corpus.document(read["doc"]).tolist()
        assert read["inputs"] == ids  # every token once, in order
        assert read["labels"] == ids[1:] + [-100]  # next token of the same document only
    epoch1 = [read["doc"] for read in reads[len(usable): 2 * len(usable)]]
    assert sorted(epoch1) == sorted(usable)
    assert (epoch1 != [read["doc"] for read in epoch0]) == shuffle
    assert stream.epoch >= 2


def test_stream_over_tokenized_text_never_crosses_documents() -> None:
    texts = {"a": "The first document.", "b": "Second!", "c": "x", "d": "A third, longer document here."}
    corpus = tokenize_texts(texts, byte_tokenizer())
    stream = DocumentStream(corpus, batch_size=2, segment_length=5, seed=1)
    reads = _reads(stream, 12)
    for read in reads[:3]:
        text = texts[corpus.doc_ids[read["doc"]]].encode()
        assert bytes(read["inputs"]) == text
        assert read["labels"] == list(text[1:]) + [-100]
    assert "c" not in {corpus.doc_ids[read["doc"]] for read in reads}  # 1 token < min_doc_tokens


def test_reset_marks_exactly_each_documents_first_segment() -> None:
    corpus = _corpus([8, 3, 9, 4])
    stream = DocumentStream(corpus, batch_size=2, segment_length=4, shuffle=False)
    resets = [next(stream).reset.tolist() for _ in range(6)]
    # row 0: doc0 [0:4] [4:8], doc3 [0:4], doc0 (epoch 1) [0:4] [4:8], doc2 [0:4]
    # row 1: doc1 [0:3], doc2 [0:4] [4:8] [8:9], doc1 (epoch 1) [0:3], doc3 [0:4]
    assert [r[0] for r in resets] == [True, False, True, True, False, True]
    assert [r[1] for r in resets] == [True, True, False, False, True, True]
    assert stream.epoch == 1
    _reads(DocumentStream(corpus, batch_size=2, segment_length=4, shuffle=False), 30)  # checks order


def test_ranks_stream_disjoint_documents_covering_the_corpus() -> None:
    corpus, world = _corpus(), 3
    usable = sorted(_usable())
    reads = [_reads(DocumentStream(corpus, 2, 4, seed=9, rank=r, world_size=world), 80) for r in range(world)]
    for epoch in range(2):
        per_rank = []
        for rank in range(world):
            count = len(range(rank, len(usable), world))
            per_rank.append({read["doc"] for read in reads[rank][epoch * count: (epoch + 1) * count]})
            assert len(per_rank[-1]) == count
        assert set().union(*per_rank) == set(usable)
        assert sum(len(docs) for docs in per_rank) == len(usable)


def _assert_same_batches(first: list, second: list) -> None:
    assert len(first) == len(second)
    for a, b in zip(first, second):
        for field in ("input_ids", "labels", "positions", "reset", "doc_index"):
            assert torch.equal(getattr(a, field), getattr(b, field)), field


def test_state_dict_resumes_exactly_after_json_round_trip() -> None:
    corpus = _corpus()
    stream = DocumentStream(corpus, batch_size=3, segment_length=4, seed=3)
    for _ in range(7):
        next(stream)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = [next(stream) for _ in range(5)]
    assert stream.epoch >= 1  # the 12 batches cross an epoch boundary
    resumed = DocumentStream(corpus, batch_size=3, segment_length=4, seed=3)
    resumed.load_state_dict(state)
    _assert_same_batches(expected, [next(resumed) for _ in range(5)])
    assert resumed.state_dict() == stream.state_dict()


def test_load_state_dict_rejects_other_settings() -> None:
    corpus = _corpus()
    state = DocumentStream(corpus, batch_size=3, segment_length=4).state_dict()
    with pytest.raises(LongMemError, match="batch_size 3 != 2"):
        DocumentStream(corpus, batch_size=2, segment_length=4).load_state_dict(state)
    with pytest.raises(LongMemError, match="lacks cursor"):
        DocumentStream(corpus, batch_size=3, segment_length=4).load_state_dict(
            {k: v for k, v in state.items() if k != "cursor"})


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 0}, "batch_size must be positive"),
    ({"segment_length": -1}, "segment_length must be positive"),
    ({"rank": 2, "world_size": 2}, "rank must be in"),
    ({"world_size": 8}, "fewer than world_size 8"),
    ({"min_doc_tokens": 31}, "fewer than world_size 1"),
])
def test_stream_errors(kwargs: dict, message: str) -> None:
    args = {"batch_size": 2, "segment_length": 4} | kwargs
    with pytest.raises(LongMemError, match=message):
        DocumentStream(_corpus(), **args)


class _Recording:
    """Wraps a tokenizer, counting calls; with ``allow = False`` a call fails the test."""

    def __init__(self, inner) -> None:
        self.inner, self.calls, self.allow = inner, 0, True

    def __call__(self, text: str, **kwargs):
        assert self.allow, "tokenizer called although the cache should have been used"
        self.calls += 1
        return self.inner(text, **kwargs)

    def __len__(self) -> int:
        return len(self.inner)

    @property
    def backend_tokenizer(self):
        return self.inner.backend_tokenizer


def _write(folder: Path, extra: str = "") -> Path:
    texts = {"alpha": "CHAPTER I\n\nAlpha text.\n", "beta": "Beta" + extra,
             "austen-emma": "Emma is a test-split document.\n"}
    docs = [Document(doc_id, doc_id, "test:src", text, []) for doc_id, text in texts.items()]
    write_corpus(docs, folder)
    return folder


def test_tokenize_corpus_caches_and_reloads_without_tokenizing(tmp_path: Path) -> None:
    folder = _write(tmp_path / "corpus")
    tokenizer = _Recording(byte_tokenizer())
    first = tokenize_corpus(folder, tokenizer, "train")
    assert first.doc_ids == ["alpha", "beta"] and tokenizer.calls == 2
    assert first.document(1).tolist() == list(b"Beta")
    key_dir = folder / "tokens" / cache_key(tokenizer, folder / "manifest.json")
    assert sorted(p.name for p in key_dir.iterdir()) == ["train.bin", "train.json"]
    tokenizer.allow = False
    second = tokenize_corpus(folder, tokenizer, "train")
    assert isinstance(second.ids, np.memmap) and not second.ids.flags.writeable
    assert second.doc_ids == first.doc_ids and np.array_equal(second.ids, first.ids)
    assert np.array_equal(second.starts, first.starts) and np.array_equal(second.lengths, first.lengths)
    tokenizer.allow = True
    everything = tokenize_corpus(folder, tokenizer, None, cache=False)
    assert everything.doc_ids == ["alpha", "beta", "austen-emma"]
    assert not (key_dir / "all.bin").exists()


def test_cache_key_changes_with_manifest_and_tokenizer(tmp_path: Path) -> None:
    folder = _write(tmp_path / "corpus")
    tokenizer = byte_tokenizer()
    key = cache_key(tokenizer, folder / "manifest.json")
    tokenize_corpus(folder, tokenizer, "train")
    assert cache_key(tokenizer, folder / "manifest.json") == key  # using it does not change it
    _write(folder, extra=" changed")
    assert cache_key(tokenizer, folder / "manifest.json") != key
    assert tokenize_corpus(folder, tokenizer, "train").document(1).tolist() == list(b"Beta changed")
    assert len(list((folder / "tokens").iterdir())) == 2
    other = byte_tokenizer()
    other.add_tokens(["<extra>"])
    assert cache_key(other, folder / "manifest.json") != cache_key(tokenizer, folder / "manifest.json")


def test_cache_key_ignores_truncation_state(tmp_path: Path) -> None:
    folder = _write(tmp_path / "corpus")
    tokenizer = byte_tokenizer()
    tokenizer.backend_tokenizer.enable_truncation(4)  # as loaded from some tokenizer.json files
    key = cache_key(tokenizer, folder / "manifest.json")
    tokenizer("some text", add_special_tokens=False)  # a call clears the backend's truncation
    assert cache_key(tokenizer, folder / "manifest.json") == key


def test_tokenize_corpus_errors(tmp_path: Path) -> None:
    tokenizer = byte_tokenizer()
    with pytest.raises(LongMemError, match="no corpus directory"):
        tokenize_corpus(tmp_path / "missing", tokenizer, "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LongMemError, match="no manifest.json"):
        tokenize_corpus(tmp_path / "empty", tokenizer, "train")
    folder = _write(tmp_path / "corpus")
    with pytest.raises(LongMemError, match="no documents in split 'dev'"):
        tokenize_corpus(folder, tokenizer, "dev")
    with pytest.raises(LongMemError, match="no documents in split 'validation'.*test, train"):
        tokenize_corpus(folder, tokenizer, "validation")
    (folder / "train" / "beta.txt").unlink()
    with pytest.raises(LongMemError, match="'beta' is missing its file"):
        tokenize_corpus(folder, tokenizer, "train", cache=False)


def test_fewer_documents_than_rows_warns(caplog: pytest.LogCaptureFixture) -> None:
    stream = DocumentStream(_corpus([5, 6]), batch_size=3, segment_length=2, shuffle=False)
    assert "same documents in different epochs" in caplog.text
    assert next(stream).doc_index.tolist() == [0, 1, 0] and stream.epoch == 1
