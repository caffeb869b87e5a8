"""Memory bank, chunk search and persistence."""

from longmem.memory.bank import MemoryBank, Retrieved
from longmem.memory.io.store import load_memory, read_manifest, save_memory

__all__ = ["MemoryBank", "Retrieved", "load_memory", "read_manifest", "save_memory"]
