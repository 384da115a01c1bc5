"""What the Call allowlist's example invocations are made of: the shape of a case, and
arrays made to suit each function (well-conditioned, positive, symmetric, ...).

The arrays come from one seeded generator, so the cases are the same on every run as
long as they are made in the same order: support.function_cases makes them family by
family, in a fixed order.
"""

from __future__ import annotations

from typing import Any

import numpy as np

#: An example invocation: (name, args, kwargs).
Case = tuple[str, tuple[Any, ...], dict[str, Any]]

_rng = np.random.default_rng(0)


def randn(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape)


def uniform(low: float, high: float, *shape: int) -> np.ndarray:
    return _rng.uniform(low, high, shape)


def pos(*shape: int) -> np.ndarray:
    """Positive, away from zero: safe for log, sqrt, division."""
    return uniform(0.5, 2.0, *shape)


def unit(*shape: int) -> np.ndarray:
    """Inside (-1, 1): safe for asin, acos, atanh, erfinv."""
    return uniform(-0.9, 0.9, *shape)


def ints(low: int, high: int, *shape: int) -> np.ndarray:
    return _rng.integers(low, high, shape, dtype=np.int64)


def bools(*shape: int) -> np.ndarray:
    return _rng.random(shape) < 0.5


def complexes(*shape: int) -> np.ndarray:
    return randn(*shape) + 1j * randn(*shape)


def well(n: int, *batch: int) -> np.ndarray:
    """A well-conditioned square matrix (or batch of them)."""
    return randn(*batch, n, n) + n * np.eye(n)


def spd(n: int) -> np.ndarray:
    """A symmetric positive-definite matrix."""
    a = randn(n, n)
    return a @ a.T + n * np.eye(n)


def sym(n: int) -> np.ndarray:
    """A symmetric matrix with distinct eigenvalues."""
    a = randn(n, n)
    return (a + a.T) / 2


def with_nans(*shape: int) -> np.ndarray:
    x = randn(*shape)
    x.reshape(-1)[[1, 7]] = np.nan
    return x


def probs(*shape: int) -> np.ndarray:
    e = np.exp(randn(*shape))
    return e / e.sum(axis=-1, keepdims=True)


def specials() -> np.ndarray:
    return np.array([1.0, -np.inf, 2.5, np.nan, np.inf, -0.0, 1e300])
