"""Memory bank, chunk search and persistence."""

from .bank import MemoryBank, Retrieved
from .store import load_memory, read_manifest, save_memory

__all__ = ["MemoryBank", "Retrieved", "load_memory", "read_manifest", "save_memory"]
