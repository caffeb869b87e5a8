"""longmem: a frozen causal LM with a long-term key/value memory and a trainable SideNet."""

from .config import LongMemConfig
from .errors import LongMemError
from .memory import MemoryBank, load_memory, save_memory
from .model import LongMemModel, LongMemOutput

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
