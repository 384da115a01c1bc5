"""The KServe v2 tests' arrays and tritonclient helpers, shared with the shared-memory tests."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import tritonclient.grpc as triton

# Every datatype tensorwire takes, with a NumPy array of it holding awkward values.
ARRAYS: dict[str, np.ndarray] = {
    "BOOL": np.array([[True, False, True], [False, False, True]]),
    "UINT8": np.array([0, 1, 255], np.uint8),
    "UINT16": np.array([0, 65535], np.uint16),
    "UINT32": np.array([[0], [2**32 - 1]], np.uint32),
    "UINT64": np.array([0, 2**64 - 1], np.uint64),
    "INT8": np.array([-128, 0, 127], np.int8),
    "INT16": np.array([-(2**15), 2**15 - 1], np.int16),
    "INT32": np.array([-(2**31), 2**31 - 1], np.int32),
    "INT64": np.array([[-(2**63)], [2**63 - 1]], np.int64),
    "FP16": np.array([-65504, 1e-7, np.inf, 0.5], np.float16),
    "BF16": np.array([[1.5, -3.0e38], [np.nan, 1e-30]], ml_dtypes.bfloat16),
    "FP32": np.arange(24, dtype=np.float32).reshape(2, 3, 4) / 7,
    "FP64": np.array([np.pi, -0.0, 1e-300], np.float64),
}


X = np.random.default_rng(0).standard_normal((8, 16)).astype(np.float32)


def infer_input(name: str, arr: np.ndarray, datatype: str | None = None) -> triton.InferInput:
    tensor = triton.InferInput(name, list(arr.shape), datatype or triton_dtype(arr))
    tensor.set_data_from_numpy(arr)
    return tensor


def triton_dtype(arr: np.ndarray) -> str:
    from tritonclient.utils import np_to_triton_dtype

    return str(np_to_triton_dtype(arr.dtype))


def same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit: dtype, shape and bytes (NaN included)."""
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
