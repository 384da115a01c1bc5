"""Arrays for tests: random values of every supported dtype, NaN payloads included."""

from __future__ import annotations

import numpy as np

RNG = np.random.default_rng(0)


def sample(dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """Random values of any supported dtype: random bit patterns, NaN payloads included."""
    if dtype.kind == "b":
        return RNG.integers(0, 2, shape).astype(bool)
    if dtype.kind == "c":
        parts = RNG.standard_normal((2, *shape))
        return (parts[0] + 1j * parts[1]).astype(dtype)
    raw = RNG.integers(0, 256, (*shape, dtype.itemsize), dtype=np.uint8)
    return raw.view(dtype).reshape(shape)
