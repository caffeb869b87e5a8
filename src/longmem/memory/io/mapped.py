"""Memory-mapped safetensors: tensors that stay on disk until their pages are read.

A safetensors file is an 8-byte little-endian header length, a JSON header (name ->
dtype, shape, byte offsets) and the raw tensor bytes. Parsing the header and mapping each
tensor with ``numpy.memmap`` needs no unpickling and reads no tensor data. Maps are
copy-on-write: writing to a tensor changes private pages in RAM, never the file.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import numpy as np
import torch

from longmem.errors import LongMemError
from longmem.files import sha256

MAX_HEADER = 100 << 20
NUMPY = {  # safetensors dtype -> (numpy dtype of the bytes, torch dtype to view them as)
    "F32": (np.float32, None), "F16": (np.float16, None), "BF16": (np.uint16, torch.bfloat16),
    "I64": (np.int64, None), "I32": (np.int32, None), "I16": (np.int16, None), "I8": (np.int8, None),
    "U8": (np.uint8, None), "BOOL": (np.bool_, None),
}


def map_checked_safetensors(path: Path, expected_sha256: str | None, what: str) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file whose checksum must match, memory-mapped (copy-on-write).

    The checksum reads the file once, in blocks; the tensors are not loaded.
    """
    if not path.is_file() or sha256(path) != expected_sha256:
        raise LongMemError(f"{what} {path} is missing, truncated or modified (checksum mismatch)")
    try:
        return map_safetensors(path)
    except (ValueError, KeyError, TypeError, struct.error, OSError) as exc:
        raise LongMemError(f"cannot map {what} {path}: {exc}") from None


def map_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file as a memory-mapped torch tensor."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        if length > min(MAX_HEADER, size - 8):
            raise ValueError(f"header of {length} bytes does not fit a file of {size}")
        header = json.loads(handle.read(length))
    base = 8 + length
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        raw, view = NUMPY[info["dtype"]]
        shape = tuple(int(x) for x in info["shape"])
        begin, end = (int(x) for x in info["data_offsets"])
        itemsize = np.dtype(raw).itemsize
        if end - begin != math.prod(shape) * itemsize or base + end > size:
            raise ValueError(f"tensor {name!r} does not fit its offsets")
        if (base + begin) % itemsize:
            raise ValueError(f"tensor {name!r} is not aligned to {itemsize} bytes")
        if math.prod(shape) == 0:
            tensor = torch.from_numpy(np.empty(shape, dtype=raw))
        else:
            tensor = torch.from_numpy(np.memmap(path, dtype=raw, mode="c", offset=base + begin, shape=shape))
        out[name] = tensor.view(view) if view is not None else tensor
    return out
