"""Memories on disk: one-file save/load (store.py), memory-mapped safetensors (mapped.py) and crash-safe,
append-only named memories (named.py)."""
