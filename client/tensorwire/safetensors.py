"""The safetensors file format, written and read with NumPy alone (no torch, no package).

A file is an 8-byte little-endian header length, a JSON header mapping each tensor's
name to its dtype, shape and ``[begin, end)`` byte range (and ``"__metadata__"`` to a
map of strings), padded with spaces to a multiple of 8 bytes, then the tensors' raw
little-endian bytes back to back in C order. Any safetensors reader loads it.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Mapping
from typing import Any, Final

import ml_dtypes
import numpy as np

from tensorwire.wire.codec import as_wire_array

#: safetensors dtype codes by NumPy dtype (little-endian).
CODES: Final[dict[np.dtype[Any], str]] = {
    np.dtype(np.bool_): "BOOL",
    np.dtype("<u1"): "U8",
    np.dtype("<i1"): "I8",
    np.dtype("<i2"): "I16",
    np.dtype("<u2"): "U16",
    np.dtype("<i4"): "I32",
    np.dtype("<u4"): "U32",
    np.dtype("<i8"): "I64",
    np.dtype("<u8"): "U64",
    np.dtype("<f2"): "F16",
    np.dtype(ml_dtypes.bfloat16): "BF16",
    np.dtype("<f4"): "F32",
    np.dtype("<f8"): "F64",
}
DTYPES: Final[dict[str, np.dtype[Any]]] = {code: dtype for dtype, code in CODES.items()}

# Readers refuse larger headers (100 MB in the reference implementation).
_MAX_HEADER: Final = 100_000_000


def save(
    path: str | os.PathLike[str],
    tensors: Mapping[str, np.ndarray],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``tensors`` (and string ``metadata``) to ``path`` as a safetensors file;
    ValueError for a dtype the format has no code for (complex)."""
    header: dict[str, Any] = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    arrays: list[np.ndarray] = []
    offset = 0
    for name, value in tensors.items():
        arr = as_wire_array(np.asarray(value))
        code = CODES.get(arr.dtype)
        if code is None:
            raise ValueError(f"{name!r}: safetensors has no dtype for {arr.dtype}")
        header[name] = {
            "dtype": code,
            "shape": list(arr.shape),
            "data_offsets": [offset, offset + arr.nbytes],
        }
        offset += arr.nbytes
        arrays.append(arr)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for arr in arrays:
            f.write(memoryview(arr.reshape(-1).view(np.uint8)))  # type: ignore[arg-type]


def load(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """The tensors and metadata of a safetensors file; ValueError if it is malformed."""
    with open(path, "rb") as f:
        data = f.read()
    if len(data) < 8:
        raise ValueError(f"{os.fspath(path)}: too short for a safetensors file")
    (size,) = struct.unpack("<Q", data[:8])
    if size > min(_MAX_HEADER, len(data) - 8):
        raise ValueError(f"{os.fspath(path)}: header length {size} is out of range")
    header = json.loads(data[8 : 8 + size])
    body = memoryview(data)[8 + size :]
    metadata = {str(k): str(v) for k, v in header.pop("__metadata__", {}).items()}
    tensors: dict[str, np.ndarray] = {}
    for name, entry in header.items():
        dtype = DTYPES.get(entry["dtype"])
        if dtype is None:
            raise ValueError(f"{name!r}: unsupported safetensors dtype {entry['dtype']}")
        begin, end = entry["data_offsets"]
        shape = tuple(int(d) for d in entry["shape"])
        if not 0 <= begin <= end <= body.nbytes or end - begin != (
            int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
        ):
            raise ValueError(f"{name!r}: data_offsets {[begin, end]} do not fit {shape}")
        tensors[name] = np.frombuffer(body[begin:end], dtype=dtype).reshape(shape).copy()
    return tensors, metadata
