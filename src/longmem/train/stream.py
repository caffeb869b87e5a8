"""Document-streaming batches for memory-augmented training.

Training keeps global causality at segment level: each batch row reads one document's
consecutive ``T``-token segments in order, so the row's memory only ever holds earlier
text of the same document. When a row's document ends it takes the next document of its
rank's queue (and its memory must be reset); the queue is a seeded permutation of the
documents, redrawn for every epoch, split across data-parallel ranks.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from longmem.errors import LongMemError
from longmem.data.tokens import TokenizedCorpus

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
_NO_DOCUMENT = -1
_STATE_KEYS = ("epoch", "cursor", "docs", "positions")


@dataclass
class Batch:
    """One training step's segments.

    Attributes:
        input_ids: long [B,T] token ids, 0 past a document's end.
        labels: long [B,T] the next token of the same document; -100 where there is none
            (padding, the last token of a document).
        positions: long [B,T] absolute position of each token in its document (padding
            continues the count past the document's end).
        reset: bool [B] True when the row starts a new document in this batch: its memory
            must be reset before the forward pass.
        doc_index: long [B] index of the row's document in the corpus.
    """

    input_ids: torch.Tensor
    labels: torch.Tensor
    positions: torch.Tensor
    reset: torch.Tensor
    doc_index: torch.Tensor

    def to(self, device: torch.device) -> "Batch":
        """The same batch with every tensor on ``device``."""
        return Batch(*(t.to(device) for t in (self.input_ids, self.labels, self.positions, self.reset, self.doc_index)))


def _require(condition: bool, message: str) -> None:
    """Raise LongMemError(message) unless ``condition``."""
    if not condition:
        raise LongMemError(message)


class DocumentStream:
    """Infinite iterator of :class:`Batch` reading documents segment by segment.

    Per epoch, the documents with at least ``min_doc_tokens`` tokens are ordered by a
    permutation seeded by ``(seed, epoch)`` (identity if not ``shuffle``); rank ``r`` of
    ``world_size`` takes every ``world_size``-th of them starting at ``r``. Each of the B
    rows holds a current document and a position; a row that finished its document takes
    the next one from the queue (rows in order), and an exhausted queue starts the next epoch.

    Args:
        corpus: Tokenized documents.
        batch_size: Rows B per batch.
        segment_length: Tokens T per row and batch.
        seed: Non-negative seed of the per-epoch permutations.
        rank: This process's data-parallel rank, in ``[0, world_size)``.
        world_size: Number of data-parallel ranks.
        shuffle: Permute documents each epoch (else manifest order every epoch).
        min_doc_tokens: Skip documents shorter than this (at least 1).

    Raises:
        LongMemError: On a non-positive size, a bad rank or seed, or fewer usable
            documents than ranks.
    """

    def __init__(self, corpus: TokenizedCorpus, batch_size: int, segment_length: int, seed: int = 0,
                 rank: int = 0, world_size: int = 1, shuffle: bool = True, min_doc_tokens: int = 2) -> None:
        _require(batch_size > 0, f"batch_size must be positive, got {batch_size}")
        _require(segment_length > 0, f"segment_length must be positive, got {segment_length}")
        _require(seed >= 0, f"seed must be non-negative, got {seed}")
        _require(world_size > 0, f"world_size must be positive, got {world_size}")
        _require(0 <= rank < world_size, f"rank must be in [0, {world_size}), got {rank}")
        _require(min_doc_tokens > 0, f"min_doc_tokens must be positive, got {min_doc_tokens}")
        self.corpus = corpus
        self.batch_size = batch_size
        self.segment_length = segment_length
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.shuffle = shuffle
        self.min_doc_tokens = min_doc_tokens
        self._usable = np.flatnonzero(corpus.lengths >= min_doc_tokens)
        _require(len(self._usable) >= world_size,
                 f"only {len(self._usable)} of {len(corpus)} documents have at least {min_doc_tokens} "
                 f"tokens, fewer than world_size {world_size}")
        if len(self._usable) < len(corpus):
            logger.info("skipping %d documents shorter than %d tokens",
                        len(corpus) - len(self._usable), min_doc_tokens)
        self._epoch = 0
        self._queue = self._epoch_queue(0)
        if len(self._queue) < batch_size:
            logger.warning("rank %d has %d documents per epoch for %d rows: rows of a batch will read the "
                           "same documents in different epochs", rank, len(self._queue), batch_size)
        self._cursor = 0
        self._docs = [_NO_DOCUMENT] * batch_size
        self._positions = [0] * batch_size

    @property
    def epoch(self) -> int:
        """The epoch whose queue the next new document is taken from."""
        return self._epoch

    def _epoch_queue(self, epoch: int) -> np.ndarray:
        """This rank's document indices for ``epoch``, in reading order: int64 [n]."""
        order = self._usable
        if self.shuffle:
            order = order[np.random.default_rng([self.seed, epoch]).permutation(len(order))]
        return order[self.rank::self.world_size]

    def _take_document(self) -> int:
        """The next document of the queue, starting a new epoch when it is exhausted."""
        if self._cursor == len(self._queue):
            self._epoch += 1
            self._queue = self._epoch_queue(self._epoch)
            self._cursor = 0
        self._cursor += 1
        return int(self._queue[self._cursor - 1])

    def __iter__(self) -> DocumentStream:
        return self

    def __next__(self) -> Batch:
        """The next segment of every row: see :class:`Batch` for shapes."""
        rows, length = self.batch_size, self.segment_length
        input_ids = np.zeros((rows, length), dtype=np.int64)
        labels = np.full((rows, length), IGNORE_INDEX, dtype=np.int64)
        positions = np.zeros((rows, length), dtype=np.int64)
        reset = np.zeros(rows, dtype=bool)
        doc_index = np.zeros(rows, dtype=np.int64)
        for row in range(rows):
            doc, start = self._docs[row], self._positions[row]
            if doc == _NO_DOCUMENT or start >= self.corpus.lengths[doc]:
                doc, start, reset[row] = self._take_document(), 0, True
            ids = self.corpus.document(doc)
            segment, following = ids[start: start + length], ids[start + 1: start + length + 1]
            input_ids[row, : len(segment)] = segment
            labels[row, : len(following)] = following
            positions[row] = np.arange(start, start + length)
            doc_index[row] = doc
            self._docs[row], self._positions[row] = doc, start + len(segment)
        return Batch(torch.from_numpy(input_ids), torch.from_numpy(labels), torch.from_numpy(positions),
                     torch.from_numpy(reset), torch.from_numpy(doc_index))

    def _config(self) -> dict[str, int]:
        """The settings a saved state is only valid for."""
        return {"batch_size": self.batch_size, "segment_length": self.segment_length, "seed": self.seed,
                "rank": self.rank, "world_size": self.world_size, "shuffle": int(self.shuffle),
                "min_doc_tokens": self.min_doc_tokens, "num_documents": len(self.corpus),
                "num_tokens": self.corpus.num_tokens}

    def state_dict(self) -> dict[str, Any]:
        """The position of the stream, JSON-serialisable (ints and lists of ints)."""
        return self._config() | {"epoch": self._epoch, "cursor": self._cursor,
                                 "docs": list(self._docs), "positions": list(self._positions)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a stream with the same settings and corpus.

        Raises:
            LongMemError: If the state is incomplete or was saved with other settings.
        """
        config = self._config()
        missing = [key for key in (*config, *_STATE_KEYS) if key not in state]
        _require(not missing, f"stream state lacks {', '.join(missing)}")
        changed = [f"{key} {state[key]} != {value}" for key, value in config.items() if state[key] != value]
        _require(not changed, f"stream state was saved with other settings: {'; '.join(changed)}")
        docs, positions = [int(d) for d in state["docs"]], [int(p) for p in state["positions"]]
        _require(len(docs) == len(positions) == self.batch_size,
                 f"stream state has {len(docs)} docs and {len(positions)} positions for batch_size {self.batch_size}")
        _require(all(_NO_DOCUMENT <= d < len(self.corpus) for d in docs) and min(positions) >= 0,
                 "stream state has a document index or position out of range")
        _require(int(state["epoch"]) >= 0, f"stream state epoch {state['epoch']} is negative")
        queue = self._epoch_queue(int(state["epoch"]))
        _require(0 <= int(state["cursor"]) <= len(queue),
                 f"stream state cursor {state['cursor']} is outside the epoch's {len(queue)} documents")
        self._epoch, self._queue, self._cursor = int(state["epoch"]), queue, int(state["cursor"])
        self._docs, self._positions = docs, positions
