"""The dtype table: wire DType <-> NumPy dtype <-> name, in one place."""

from __future__ import annotations

from typing import Final

import ml_dtypes
import numpy as np

from tensorwire.v1 import tensorwire_pb2 as pb

# (wire enum, NumPy dtype as stored on the wire: little-endian, name users see)
_TABLE: Final = (
    (pb.DTYPE_BOOL, np.dtype(np.bool_), "bool"),
    (pb.DTYPE_UINT8, np.dtype("<u1"), "uint8"),
    (pb.DTYPE_INT8, np.dtype("<i1"), "int8"),
    (pb.DTYPE_INT16, np.dtype("<i2"), "int16"),
    (pb.DTYPE_INT32, np.dtype("<i4"), "int32"),
    (pb.DTYPE_INT64, np.dtype("<i8"), "int64"),
    (pb.DTYPE_UINT16, np.dtype("<u2"), "uint16"),
    (pb.DTYPE_UINT32, np.dtype("<u4"), "uint32"),
    (pb.DTYPE_UINT64, np.dtype("<u8"), "uint64"),
    (pb.DTYPE_FLOAT16, np.dtype("<f2"), "float16"),
    (pb.DTYPE_BFLOAT16, np.dtype(ml_dtypes.bfloat16), "bfloat16"),
    (pb.DTYPE_FLOAT32, np.dtype("<f4"), "float32"),
    (pb.DTYPE_FLOAT64, np.dtype("<f8"), "float64"),
    (pb.DTYPE_COMPLEX64, np.dtype("<c8"), "complex64"),
    (pb.DTYPE_COMPLEX128, np.dtype("<c16"), "complex128"),
)

NUMPY_BY_WIRE: Final[dict[int, np.dtype]] = {w: d for w, d, _ in _TABLE}
NAME_BY_WIRE: Final[dict[int, str]] = {w: n for w, _, n in _TABLE}
WIRE_BY_NAME: Final[dict[str, int]] = {n: w for w, _, n in _TABLE}
#: The name of each NumPy dtype in the table (NumPy computes ``dtype.name`` anew each time).
NAME_OF_DTYPE: Final[dict[np.dtype, str]] = {d: n for _, d, n in _TABLE}
# Keyed by (kind, itemsize, name) so that byte order does not matter for lookup.
_WIRE_BY_KEY: Final[dict[tuple[str, int, str], int]] = {
    (d.kind, d.itemsize, d.name): w for w, d, _ in _TABLE
}

_WIRE_BY_DTYPE: Final[dict[np.dtype, int]] = {d: w for w, d, _ in _TABLE}

NAMES: Final[tuple[str, ...]] = tuple(n for _, _, n in _TABLE)


def wire_dtype(dtype: np.dtype) -> int:
    """The wire DType for a NumPy dtype of either byte order; ValueError if none."""
    # The common case first: a native dtype from the table, without building a key
    # (a dtype's name is computed on each access, a few microseconds per tensor).
    wire = _WIRE_BY_DTYPE.get(dtype)
    if wire is not None:
        return wire
    key = (dtype.kind, dtype.itemsize, dtype.newbyteorder("=").name)
    try:
        return _WIRE_BY_KEY[key]
    except KeyError:
        raise ValueError(f"dtype {dtype} cannot travel; supported: {', '.join(NAMES)}") from None


def dtype_name(wire: int) -> str:
    """A wire DType's user-facing name, or a description of an unknown value."""
    return NAME_BY_WIRE.get(wire, f"unknown dtype {wire}")
