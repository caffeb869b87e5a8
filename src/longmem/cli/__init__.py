"""The ``longmem`` command: a thin layer over the library, one module per verb group."""

from longmem.cli.main import main

__all__ = ["main"]
