"""Tokenize a prepared corpus (see :mod:`longmem.data.books`) into one flat id array.

The ids of all documents are concatenated into a single uint32 array with per-document
offsets. :func:`tokenize_corpus` caches that array under ``corpus_dir/tokens/<key>/``,
where ``key`` hashes the tokenizer and the manifest, so later runs memory-map it instead
of tokenizing again.
"""

from __future__ import annotations

import hashlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from longmem.errors import LongMemError
from longmem.files import atomic_write, load_json, sha256

logger = logging.getLogger(__name__)

_KEY_CHARS = 16
# Runtime state of a fast tokenizer's backend that each __call__ overwrites: not identity.
_BACKEND_RUNTIME_FIELDS = ("truncation", "padding")


@dataclass
class TokenizedCorpus:
    """Token ids of several documents, concatenated.

    Attributes:
        ids: uint32 [N] ids of all documents in order (a read-only ``np.memmap`` when
            loaded from the cache).
        doc_ids: Document ids, one per document.
        starts: int64 [D] offset of each document in ``ids``.
        lengths: int64 [D] number of tokens of each document.
    """

    ids: np.ndarray
    doc_ids: list[str]
    starts: np.ndarray
    lengths: np.ndarray

    def __post_init__(self) -> None:
        self.starts = np.asarray(self.starts, dtype=np.int64)
        self.lengths = np.asarray(self.lengths, dtype=np.int64)
        if not len(self.doc_ids) == len(self.starts) == len(self.lengths):
            raise LongMemError(f"tokenized corpus has {len(self.doc_ids)} doc_ids but "
                               f"{len(self.starts)} starts and {len(self.lengths)} lengths")
        if len(self.lengths) and (self.lengths.min() < 0 or self.starts.min() < 0
                                  or (self.starts + self.lengths).max() > len(self.ids)):
            raise LongMemError(f"tokenized corpus documents fall outside its {len(self.ids)} ids")

    def document(self, i: int) -> np.ndarray:
        """The ids of document ``i``: uint32 [lengths[i]] (a view, not a copy)."""
        if not 0 <= i < len(self):
            raise IndexError(f"document index {i} out of range for {len(self)} documents")
        start = int(self.starts[i])
        return self.ids[start: start + int(self.lengths[i])]

    def __len__(self) -> int:
        """Number of documents."""
        return len(self.doc_ids)

    @property
    def num_tokens(self) -> int:
        """Total number of tokens of all documents."""
        return int(self.lengths.sum())


def leading_bos(tokenizer: Any) -> int | None:
    """The <bos> id a tokenizer puts at the start of a text by default (Gemma's), or None (SmolLM2, GPT-2)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    ids = tokenizer("x")["input_ids"]
    return bos if ids and ids[0] == bos else None


def document_ids(tokenizer: Any, text: str, start: bool = True) -> list[int]:
    """Token ids of a document (or a prompt): its text without special tokens, after the tokenizer's
    <bos> where the model needs one (Gemma without it: 49.0 instead of 25.8 perplexity on Emma) and the
    text ``start``s a stream (not a text continuing what a memory has read)."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = leading_bos(tokenizer) if start else None
    return [bos, *ids] if bos is not None and ids[:1] != [bos] else ids


def document_spans(tokenizer: Any, text: str, start: bool = True) -> tuple[list[int], list[tuple[int, int]] | None]:
    """``document_ids`` and each token's character span (start, end) in ``text`` -- (0, 0) for a <bos> put
    ahead -- or None where the tokenizer cannot tell (not a fast tokenizer)."""
    ids = document_ids(tokenizer, text, start)
    try:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    except (NotImplementedError, ValueError, TypeError):
        return ids, None
    lead = len(ids) - len(enc["input_ids"])  # a <bos> put ahead, or none
    if lead not in (0, 1) or list(enc["input_ids"]) != ids[lead:]:
        return ids, None
    return ids, [(0, 0)] * lead + [(int(a), int(b)) for a, b in enc["offset_mapping"]]


def _encode(text: str, tokenizer: Any) -> np.ndarray:
    """Token ids of a document (``document_ids``): uint32 [n]."""
    ids = np.asarray(document_ids(tokenizer, text), dtype=np.int64)
    if ids.size and (ids.min() < 0 or ids.max() >= 2**32):
        raise LongMemError(f"tokenizer returned ids outside 0..2**32-1 (min {ids.min()}, max {ids.max()})")
    return ids.astype(np.uint32)


def _concatenate(doc_ids: list[str], parts: list[np.ndarray]) -> TokenizedCorpus:
    """Build a corpus from per-document uint32 id arrays."""
    lengths = np.array([len(part) for part in parts], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
    ids = np.concatenate(parts) if parts else np.zeros(0, dtype=np.uint32)
    return TokenizedCorpus(ids, list(doc_ids), starts, lengths)


def tokenize_texts(texts: dict[str, str], tokenizer: Any) -> TokenizedCorpus:
    """Tokenize texts in memory (no cache).

    Args:
        texts: Document id -> text, in the order the documents should have.
        tokenizer: A Hugging Face tokenizer (through ``document_ids``).

    Returns:
        The concatenated corpus.
    """
    return _concatenate(list(texts), [_encode(text, tokenizer) for text in texts.values()])


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 of the tokenizer's definition: its backend JSON without the per-call
    truncation/padding state, else its vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        spec = json.loads(backend.to_str())
        for field in _BACKEND_RUNTIME_FIELDS:
            spec.pop(field, None)
        text = json.dumps(spec, sort_keys=True)
    else:
        text = str(sorted(tokenizer.get_vocab().items()))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def cache_key(tokenizer: Any, manifest: Path) -> str:
    """Short hash of tokenizer class, vocabulary size, tokenizer definition and manifest bytes."""
    parts = [type(tokenizer).__name__, len(tokenizer), _tokenizer_fingerprint(tokenizer), sha256(manifest)]
    return hashlib.sha256(json.dumps(parts).encode("utf-8")).hexdigest()[:_KEY_CHARS]


def _read_manifest(corpus_dir: Path) -> list[dict[str, Any]]:
    """The manifest entries of a prepared corpus, with clear errors."""
    if not corpus_dir.is_dir():
        raise LongMemError(f"no corpus directory at {corpus_dir} (prepare it with prepare_books)")
    path = corpus_dir / "manifest.json"
    if not path.is_file():
        raise LongMemError(f"no manifest.json in corpus directory {corpus_dir}")
    entries = load_json(path, list)
    if not all(
            isinstance(e, dict) and {"doc_id", "split", "file"} <= e.keys() for e in entries):
        raise LongMemError(f"{path} must be a list of entries with doc_id, split and file")
    return entries


def _select(entries: list[dict[str, Any]], split: str | None, corpus_dir: Path) -> list[dict[str, Any]]:
    """The manifest entries of one split (all when ``split`` is None), never empty."""
    chosen = [e for e in entries if split is None or e["split"] == split]
    if not chosen:
        splits = sorted({e["split"] for e in entries})
        what = "no documents" if split is None else f"no documents in split {split!r}"
        raise LongMemError(f"corpus {corpus_dir} has {what} (splits: {', '.join(splits) or 'none'})")
    return chosen


def _save(corpus: TokenizedCorpus, bin_path: Path, meta_path: Path) -> None:
    """Write the ids (raw uint32) and then the metadata that marks the cache complete."""
    bin_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(bin_path, np.ascontiguousarray(corpus.ids).tobytes())
    meta = {"doc_ids": corpus.doc_ids, "starts": corpus.starts.tolist(),
            "lengths": corpus.lengths.tolist(), "num_tokens": corpus.num_tokens}
    atomic_write(meta_path, json.dumps(meta).encode("utf-8"))


def _load(bin_path: Path, meta_path: Path) -> TokenizedCorpus | None:
    """The cached corpus, memory-mapped read-only; None if absent or inconsistent."""
    if not (meta_path.is_file() and bin_path.is_file()):
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        num_tokens = int(meta["num_tokens"])
        doc_ids, starts, lengths = meta["doc_ids"], meta["starts"], meta["lengths"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError):
        logger.warning("ignoring corrupt token cache %s", meta_path)
        return None
    if bin_path.stat().st_size != 4 * num_tokens:
        logger.warning("ignoring token cache %s: size does not match %d tokens", bin_path, num_tokens)
        return None
    ids = (np.memmap(bin_path, dtype=np.uint32, mode="r", shape=(num_tokens,)) if num_tokens
           else np.zeros(0, dtype=np.uint32))  # an empty file cannot be memory-mapped
    return TokenizedCorpus(ids, doc_ids, np.array(starts), np.array(lengths))


def tokenize_corpus(corpus_dir: Path, tokenizer: Any, split: str | None, cache: bool = True) -> TokenizedCorpus:
    """Tokenize the documents of a prepared corpus, in manifest order.

    With ``cache``, the result is stored as ``corpus_dir/tokens/<key>/<split|all>.bin``
    (raw uint32 ids) and ``.json`` (doc_ids, starts, lengths, num_tokens); a later call
    with the same tokenizer and manifest memory-maps it without tokenizing.

    Args:
        corpus_dir: Folder written by :func:`longmem.data.books.prepare_books`.
        tokenizer: A Hugging Face tokenizer (through ``document_ids``).
        split: ``"train"``, ``"validation"``, ``"test"``, or None for all documents.
        cache: Read and write the token cache.

    Raises:
        LongMemError: If the corpus folder, its manifest or a document file is missing,
            or the split has no documents.
    """
    corpus_dir = Path(corpus_dir)
    entries = _select(_read_manifest(corpus_dir), split, corpus_dir)
    name = split or "all"
    cache_dir = corpus_dir / "tokens" / cache_key(tokenizer, corpus_dir / "manifest.json")
    bin_path, meta_path = cache_dir / f"{name}.bin", cache_dir / f"{name}.json"
    if cache:
        cached = _load(bin_path, meta_path)
        if cached is not None:
            logger.info("loaded %d tokens of %d documents from %s", cached.num_tokens, len(cached), bin_path)
            return cached
    parts = []
    for entry in entries:
        path = corpus_dir / entry["file"]
        if not path.is_file():
            raise LongMemError(f"document {entry['doc_id']!r} is missing its file {path}")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise LongMemError(f"document file {path} is not UTF-8 (bad byte at offset {exc.start})") from None
        parts.append(_encode(text, tokenizer))
    corpus = _concatenate([entry["doc_id"] for entry in entries], parts)
    logger.info("tokenized %d documents of %s (%s): %d tokens", len(corpus), corpus_dir, name, corpus.num_tokens)
    if cache:
        _save(corpus, bin_path, meta_path)
    return corpus
