"""numpy.linalg (svd, solve, norm, inv, det) and numpy.fft (rfft, irfft, fft, ifft)
on remote arrays, with the dtypes NumPy gives (asked of NumPy on tiny arrays)."""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from tensorwire.arrays.array import RemoteArray, dtype_name, probe
from tensorwire.arrays.dispatch import UnsupportedError, implements
from tensorwire.arrays.ops import apply, unsupported
from tensorwire.arrays.shapes import axes, axis_index, reduced


class SVDResult(NamedTuple):
    """What numpy.linalg.svd returns: U, S, Vh."""

    U: RemoteArray
    S: RemoteArray
    Vh: RemoteArray


def _square_probe(a: RemoteArray) -> np.ndarray:
    """A tiny well-conditioned matrix (batch) of ``a``'s dtype and rank."""
    return np.broadcast_to(np.eye(1, dtype=a.dtype), (1,) * a.ndim).copy()


def _float_cast(a: RemoteArray, computed: np.dtype[Any]) -> list[str | None]:
    """Cast integers (and bools) to the float NumPy computes in."""
    return [None if a.dtype.kind in "fc" else dtype_name(computed)]


def _matrix(a: Any, name: str) -> Any:
    if not isinstance(a, RemoteArray):
        raise UnsupportedError(f"{name}: the array must be a remote array")
    if a.ndim < 2:
        raise np.linalg.LinAlgError(
            f"{a.ndim}-dimensional array given. Array must be at least two-dimensional"
        )
    return a


@implements(np.linalg.svd)
def svd(
    a: Any, full_matrices: bool = True, compute_uv: bool = True, hermitian: bool = False
) -> Any:
    """numpy.linalg.svd."""
    a = _matrix(a, "numpy.linalg.svd")
    if hermitian:
        raise unsupported("numpy.linalg.svd", "hermitian", hermitian)
    m, n = a.shape[-2:]
    k, batch = min(m, n), a.shape[:-2]
    if not compute_uv:
        s_dtype = np.linalg.svd(_square_probe(a), compute_uv=False).dtype
        return apply(
            a._ctx,
            "linalg.svdvals",
            [a._use],
            casts=_float_cast(a, s_dtype),
            dtypes=[s_dtype],
            shapes=[(*batch, k)],
        )
    u, s, vh = np.linalg.svd(_square_probe(a))
    rows, cols = (m, n) if full_matrices else (k, k)
    out = apply(
        a._ctx,
        "linalg.svd",
        [a._use],
        {"full_matrices": bool(full_matrices)},
        casts=_float_cast(a, u.dtype),
        dtypes=[u.dtype, s.dtype, vh.dtype],
        shapes=[(*batch, m, rows), (*batch, k), (*batch, cols, n)],
    )
    return SVDResult(*out)


@implements(np.linalg.solve)
def solve(a: Any, b: Any) -> Any:
    """numpy.linalg.solve (b a vector when it is 1-D)."""
    a = _matrix(a, "numpy.linalg.solve")
    if not isinstance(b, RemoteArray):
        raise UnsupportedError("numpy.linalg.solve: b must be a remote array")
    computed = np.linalg.solve(
        _square_probe(a).astype(np.result_type(a.dtype, b.dtype)), probe((1,) * b.ndim, b.dtype)
    ).dtype
    if b.ndim == 1:
        shape = (*a.shape[:-2], a.shape[-1])
    else:
        shape = (*np.broadcast_shapes(a.shape[:-2], b.shape[:-2]), *b.shape[-2:])
    casts = [None if x.dtype == computed else dtype_name(computed) for x in (a, b)]
    return apply(
        a._ctx, "linalg.solve", [a._use, b._use], casts=casts, dtypes=[computed], shapes=[shape]
    )


@implements(np.linalg.inv)
def inv(a: Any) -> Any:
    """numpy.linalg.inv."""
    a = _matrix(a, "numpy.linalg.inv")
    computed = np.linalg.inv(_square_probe(a)).dtype
    return apply(
        a._ctx,
        "linalg.inv",
        [a._use],
        casts=_float_cast(a, computed),
        dtypes=[computed],
        shapes=[a.shape],
    )


@implements(np.linalg.det)
def det(a: Any) -> Any:
    """numpy.linalg.det."""
    a = _matrix(a, "numpy.linalg.det")
    computed = np.linalg.det(_square_probe(a)).dtype
    return apply(
        a._ctx,
        "linalg.det",
        [a._use],
        casts=_float_cast(a, computed),
        dtypes=[computed],
        shapes=[a.shape[:-2]],
    )


@implements(np.linalg.norm)
def norm(x: Any, ord: Any = None, axis: Any = None, keepdims: bool = False) -> Any:
    """numpy.linalg.norm: vector norms over one axis (or the flattened array when ord
    is None), matrix norms over two."""
    if not isinstance(x, RemoteArray):
        raise UnsupportedError("numpy.linalg.norm: the array must be a remote array")
    dims = axes(axis, x.ndim)
    computed = np.dtype(
        np.linalg.norm(probe(x.shape, x.dtype), ord=ord, axis=axis, keepdims=keepdims).dtype
    )
    kwargs: dict[str, Any] = {"keepdim": bool(keepdims)}
    if axis is None and ord is None:
        function = "linalg.vector_norm"
        shape = (1,) * x.ndim if keepdims else ()
    elif len(dims) == 1:
        function = "linalg.vector_norm"
        kwargs |= {"ord": 2 if ord is None else ord, "dim": dims[0]}
        shape = reduced(x.shape, dims, keepdims)
    elif len(dims) == 2:
        if ord not in (None, "fro", "nuc", 1, -1, 2, -2, np.inf, -np.inf):
            raise unsupported("numpy.linalg.norm", "ord", ord)
        function = "linalg.matrix_norm"
        kwargs |= {"ord": "fro" if ord is None else ord, "dim": list(dims)}
        shape = reduced(x.shape, dims, keepdims)
    else:
        raise unsupported("numpy.linalg.norm", "axis", axis)
    if isinstance(kwargs.get("ord"), float) and np.isinf(kwargs["ord"]):
        kwargs["ord"] = float(kwargs["ord"])
    return apply(
        x._ctx,
        function,
        [x._use],
        kwargs,
        casts=_float_cast(x, computed),
        dtypes=[computed],
        shapes=[shape],
    )


def _fft(
    name: str, function: str, reference: Any, a: Any, n: Any, axis: int, norm: Any, size: Any
) -> Any:
    if not isinstance(a, RemoteArray):
        raise UnsupportedError(f"{name}: the array must be a remote array")
    dim = axis_index(axis, a.ndim)
    length = a.shape[dim] if n is None else int(n)
    if length < 1:
        raise ValueError(f"Invalid number of FFT data points ({length}) specified.")
    out = size(length, a.shape[dim], n)
    computed_out = reference(np.ones(2, dtype=a.dtype)).dtype
    computed_in = {  # what NumPy transforms: rfft a real signal, irfft a spectrum
        "numpy.fft.rfft": np.ones(1, dtype=computed_out).real.dtype,
        "numpy.fft.irfft": np.result_type(computed_out, np.complex64),
    }.get(name, computed_out)
    kwargs: dict[str, Any] = {"dim": dim}
    if n is not None:
        kwargs["n"] = int(n)
    if norm is not None:
        kwargs["norm"] = norm
    shape = (*a.shape[:dim], out, *a.shape[dim + 1 :])
    cast = None if a.dtype == computed_in else dtype_name(computed_in)
    return apply(
        a._ctx, function, [a._use], kwargs, casts=[cast], dtypes=[computed_out], shapes=[shape]
    )


@implements(np.fft.rfft)
def rfft(a: Any, n: Any = None, axis: int = -1, norm: Any = None, out: Any = None) -> Any:
    """numpy.fft.rfft."""
    if out is not None:
        raise unsupported("numpy.fft.rfft", "out", out)
    return _fft(
        "numpy.fft.rfft", "fft.rfft", np.fft.rfft, a, n, axis, norm, lambda m, _, __: m // 2 + 1
    )


@implements(np.fft.irfft)
def irfft(a: Any, n: Any = None, axis: int = -1, norm: Any = None, out: Any = None) -> Any:
    """numpy.fft.irfft."""
    if out is not None:
        raise unsupported("numpy.fft.irfft", "out", out)
    dim = axis_index(axis, a.ndim)
    length = 2 * (a.shape[dim] - 1) if n is None else int(n)
    return _fft(
        "numpy.fft.irfft", "fft.irfft", np.fft.irfft, a, length, dim, norm, lambda m, _, __: m
    )


@implements(np.fft.fft)
def fft(a: Any, n: Any = None, axis: int = -1, norm: Any = None, out: Any = None) -> Any:
    """numpy.fft.fft."""
    if out is not None:
        raise unsupported("numpy.fft.fft", "out", out)
    return _fft("numpy.fft.fft", "fft.fft", np.fft.fft, a, n, axis, norm, lambda m, _, __: m)


@implements(np.fft.ifft)
def ifft(a: Any, n: Any = None, axis: int = -1, norm: Any = None, out: Any = None) -> Any:
    """numpy.fft.ifft."""
    if out is not None:
        raise unsupported("numpy.fft.ifft", "out", out)
    return _fft("numpy.fft.ifft", "fft.ifft", np.fft.ifft, a, n, axis, norm, lambda m, _, __: m)
