"""longmem: a frozen causal LM with a long-term key/value memory and a trainable SideNet."""

from longmem.config import LongMemConfig
from longmem.errors import LongMemError
from longmem.memory.bank import MemoryBank
from longmem.memory.io.store import load_memory, save_memory
from longmem.model.longmem import LongMemModel, LongMemOutput

__all__ = [
    "LongMemConfig",
    "LongMemError",
    "LongMemModel",
    "LongMemOutput",
    "MemoryBank",
    "load_memory",
    "save_memory",
]
__version__ = "0.1.0"
