"""Streaming safetensors reader and writer over numpy (bfloat16 via ml_dtypes), one tensor at a time.

The safetensors package's numpy backend cannot represent bfloat16, and it reports a truncated file
without naming it; this small reader memory-maps the file, validates the header against the file size
up front, and hands out one tensor at a time, so a checkpoint is never held twice in memory. The writer
streams tensors to a temporary file and renames it into place (atomic). The format: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then data.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from typing import Any
from pathlib import Path

import ml_dtypes
import numpy as np

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}


class SafetensorsFile:
    """A read-only, memory-mapped safetensors file; use as a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError(f"{self.path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if 8 + n > size:
                raise ValueError(f"{self.path}: truncated safetensors file (header of {n} bytes, file {size})")
            try:
                header = json.loads(f.read(n))
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}: corrupt safetensors header ({err})") from None
        self.metadata: dict[str, str] = header.pop("__metadata__", None) or {}
        self.header = header
        self._data_start = 8 + n
        for name, info in header.items():
            if info["dtype"] not in DTYPES:
                raise ValueError(f"{self.path}: tensor {name!r} has unsupported dtype {info['dtype']}")
            end = self._data_start + info["data_offsets"][1]
            if end > size:
                raise ValueError(f"{self.path}: truncated safetensors file: tensor {name!r} needs bytes up to "
                                 f"{end}, the file has {size}")
        self._file = open(self.path, "rb")
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, without reading it."""
        return tuple(self.header[name]["shape"])

    def get(self, name: str) -> np.ndarray:
        """A copy of one tensor as a numpy array."""
        if name not in self.header:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        info = self.header[name]
        begin, end = (self._data_start + o for o in info["data_offsets"])
        array = np.frombuffer(self._mmap, dtype=DTYPES[info["dtype"]], count=(end - begin) //
                              np.dtype(DTYPES[info["dtype"]]).itemsize, offset=begin)
        return array.reshape(info["shape"]).copy()

    def close(self):
        """Release the memory map."""
        if self._mmap is not None:
            self._mmap.close()
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def write_safetensors(path: str | Path, tensors: Iterable[tuple[str, Any]],
                      metadata: dict[str, str] | None = None) -> None:
    """Write (name, array) pairs to ``path`` atomically (a temporary file renamed into place).

    An array may be anything with ``.shape``, ``.dtype`` and ``__array__`` (numpy, jax, `LazyArray`); it is
    converted to numpy only when its bytes are written, so at most one tensor is materialised at a time.
    """
    items = list(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, array in items:
        dtype = np.dtype(array.dtype)
        if dtype not in DTYPE_NAMES:
            raise ValueError(f"tensor {name!r}: dtype {dtype} cannot be stored in safetensors")
        nbytes = int(np.prod(array.shape, dtype=np.int64)) * dtype.itemsize
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(array.shape),
                        "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, array in items:
            data = np.ascontiguousarray(np.asarray(array))
            if data.nbytes != header[name]["data_offsets"][1] - header[name]["data_offsets"][0]:
                raise ValueError(f"tensor {name!r}: produced {data.shape}, announced {array.shape}")
            f.write(data.tobytes())
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class LazyArray:
    """A tensor known by shape and dtype whose values are computed by ``fn`` only when written."""

    def __init__(self, shape, dtype, fn: Callable[[], Any]):
        self.shape, self.dtype, self._fn = tuple(shape), np.dtype(dtype), fn

    def __array__(self, dtype=None, copy=None):
        array = np.asarray(self._fn())
        return array if dtype is None else array.astype(dtype)
