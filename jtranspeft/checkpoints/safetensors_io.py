"""Streaming safetensors reader and writer over numpy (bfloat16 via ml_dtypes), one tensor at a time.

The safetensors package's numpy backend cannot represent bfloat16, and it reports a truncated file
without naming it; this small reader memory-maps the file, validates the whole header up front (dtypes,
shapes, byte ranges that fit the shape, lie inside the file and overlap no other tensor) and hands out one
tensor at a time, so a checkpoint is never held twice in memory. The writer
streams tensors to a temporary file and renames it into place (atomic). The format: an 8-byte little-endian
header length, a JSON header {name: {dtype, shape, data_offsets}, "__metadata__": {str: str}}, then data.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

from jtranspeft.utils.errors import FileFormatError

DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
          "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}
DTYPE_NAMES = {np.dtype(v): k for k, v in DTYPES.items()}
FLOAT_DTYPES = frozenset(np.dtype(DTYPES[k]) for k in ("F64", "F32", "F16", "BF16"))  # bfloat16 is no np.floating


def _header_of(path: Path, size: int) -> tuple[dict, dict, int]:
    """(tensor entries, metadata, offset of the data) of a safetensors file, every entry checked: a known
    dtype, a shape of non-negative integers, data offsets whose byte range fits the shape exactly, inside
    the file, overlapping no other tensor. Problems are `FileFormatError`s naming the file and tensor."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise FileFormatError(path, f"truncated safetensors file ({size} bytes, no header)")
        (n,) = struct.unpack("<Q", head)
        if 8 + n > size:
            raise FileFormatError(path, f"truncated safetensors file (header of {n} bytes, file {size})")
        raw = f.read(n)
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys(path))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as err:
        raise FileFormatError(path, f"corrupt safetensors header ({err})") from None
    if not isinstance(header, dict):
        raise FileFormatError(path, f"the safetensors header must be a JSON object, found {type(header).__name__}")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise FileFormatError(path, "must map strings to strings", "field '__metadata__'")
    data_size, spans = size - 8 - n, []
    for name, info in header.items():
        where = f"tensor {name!r}"
        if not isinstance(info, dict) or set(info) != {"dtype", "shape", "data_offsets"}:
            raise FileFormatError(path, f"must be {{dtype, shape, data_offsets}}, got {info!r:.80}", where)
        dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
        if dtype not in DTYPES:
            raise FileFormatError(path, f"has unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})", where)
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise FileFormatError(path, f"has shape {shape!r:.80}, not a list of non-negative integers", where)
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
                and offsets[0] <= offsets[1]):
            raise FileFormatError(path, f"has data_offsets {offsets!r:.80}, not [begin, end] with 0 <= begin <= end",
                                  where)
        nbytes = math.prod(shape) * np.dtype(DTYPES[dtype]).itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise FileFormatError(path, f"has shape {shape} of {dtype}, which needs {nbytes} bytes, but its "
                                        f"data_offsets {offsets} hold {offsets[1] - offsets[0]}", where)
        if offsets[1] > data_size:
            raise FileFormatError(path, f"truncated safetensors file: {where} needs bytes up to {8 + n + offsets[1]}, "
                                        f"the file has {size}")
        spans.append((offsets[0], offsets[1], name))
    previous = (0, 0, None)
    for span in sorted(s for s in spans if s[0] < s[1]):
        if span[0] < previous[1]:
            raise FileFormatError(path, f"tensors {previous[2]!r} and {span[2]!r} overlap (data_offsets "
                                        f"{list(previous[:2])} and {list(span[:2])})")
        previous = span
    return header, metadata, 8 + n


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _unique_keys(path):
    def hook(pairs):
        names = [k for k, _ in pairs]
        if len(set(names)) != len(names):
            twice = sorted({k for k in names if names.count(k) > 1})
            raise FileFormatError(path, f"the header names a key twice: {twice}")
        return dict(pairs)

    return hook


class SafetensorsFile:
    """A read-only, memory-mapped safetensors file whose header was checked (`_header_of`); a context manager."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such safetensors file")
        size = self.path.stat().st_size
        self.header, self.metadata, self._data_start = _header_of(self.path, size)
        self._file = open(self.path, "rb")
        self._mmap = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ) if size else None

    def keys(self) -> list[str]:
        """Tensor names in the file."""
        return list(self.header)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape of one tensor, without reading it."""
        return tuple(self.header[name]["shape"])

    def get(self, name: str, copy: bool = True) -> np.ndarray:
        """One tensor as a numpy array: a copy, or with ``copy=False`` a read-only view of the memory map
        (valid while the file is open; loading copies it once, into its final buffer)."""
        if name not in self.header:
            raise KeyError(f"{self.path}: no tensor {name!r}")
        info = self.header[name]
        begin, end = (self._data_start + o for o in info["data_offsets"])
        if begin == end:
            return np.zeros(info["shape"], DTYPES[info["dtype"]])
        array = np.frombuffer(self._mmap, dtype=DTYPES[info["dtype"]], count=(end - begin) //
                              np.dtype(DTYPES[info["dtype"]]).itemsize, offset=begin).reshape(info["shape"])
        return array.copy() if copy else array

    def close(self):
        """Release the memory map."""
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:  # an array viewing the map lives on (e.g. in a traceback); it keeps the map alive
                pass
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
