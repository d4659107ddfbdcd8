"""Read one gzipped IDX file (the MNIST family's format) into a numpy array.

IDX: two zero bytes, a type byte (0x08 = uint8), the number of dimensions, one big-endian uint32
per dimension, then the values. Every problem is a one-line `ValueError` naming the file, so a
truncated download or a swapped file is reported where it is, not as a shape error later.
"""

from __future__ import annotations

import gzip
import zlib

import numpy as np

UINT8 = 0x08


def read_idx(path: str, ndim: int) -> np.ndarray:
    """The uint8 array of `path` (a .gz IDX file), which must have `ndim` dimensions."""
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"{path}: not a complete gzip file ({err})") from None
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, expected at least {header})")
    zeros, kind, dims = raw[:2], raw[2], raw[3]
    if zeros != b"\0\0" or kind != UINT8 or dims != ndim:
        magic = int.from_bytes(raw[:4], "big")
        expected = (UINT8 << 8) | ndim
        raise ValueError(
            f"{path}: wrong IDX magic number 0x{magic:08x} (expected 0x{expected:08x}: uint8, {ndim} dimensions)"
        )
    shape = tuple(int(d) for d in np.frombuffer(raw, ">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(
            f"{path}: IDX header says shape {shape} ({size} bytes of data) but the file holds {len(raw) - header}"
        )
    return np.frombuffer(raw, np.uint8, offset=header).reshape(shape)
