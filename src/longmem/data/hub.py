"""Long documents from a Hugging Face dataset (for users with internet access)."""

from __future__ import annotations

import re

from longmem.errors import LongMemError
from longmem.data.books import Document, find_chapters


def load_hf_dataset(
    name: str, split: str = "train", text_field: str = "text", limit: int | None = None, config: str | None = None
) -> list[Document]:
    """Each record's ``text_field`` becomes one document (streamed; at most ``limit`` records)."""
    try:
        import datasets
    except ImportError:
        raise LongMemError("reading Hugging Face datasets needs the `datasets` package: pip install datasets") from None
    try:
        records = datasets.load_dataset(name, config, split=split, streaming=True)
    except Exception as exc:  # noqa: BLE001 - the hub raises many types; one clear line
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LongMemError(f"could not load dataset {name!r} ({split}): {first}") from None
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
    docs = []
    for i, record in enumerate(records):
        if limit is not None and i >= limit:
            break
        text = record.get(text_field)
        if not isinstance(text, str):
            raise LongMemError(f"record {i} of {name!r} has no text field {text_field!r} (fields: {', '.join(record)})")
        if text.strip():
            title = record.get("title") if isinstance(record.get("title"), str) else f"{name} #{i}"
            docs.append(Document(f"{slug}-{i:06d}", title, f"hf:{name}", text, find_chapters(text)))
    if not docs:
        raise LongMemError(f"dataset {name!r} ({split}) gave no non-empty {text_field!r} texts")
    return docs
