"""Reductions on remote arrays: sum, prod, mean, std, var, max, min, argmax, argmin,
all, any, as functions, methods and ufunc ``reduce``, with NumPy's result dtypes (the
dtype NumPy gives a one-element array of the same dtype and rank)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import numpy as np

from tensorwire.arrays.array import RemoteArray, probe
from tensorwire.arrays.dispatch import METHODS, REDUCES, UnsupportedError, implements
from tensorwire.arrays.ops import apply, unsupported
from tensorwire.arrays.shapes import axes, axis_index, reduced


def _check(name: str, out: Any, where: Any = True, initial: Any = None) -> None:
    if out is not None:
        raise unsupported(name, "out", out)
    if where is not True:
        raise unsupported(name, "where", where)
    if initial is not None:
        raise unsupported(name, "initial", initial)


def _reduction(
    a: RemoteArray,
    name: str,
    function: str,
    reference: Callable[..., Any],
    axis: Any,
    keepdims: bool,
    dtype: Any = None,
    *,
    compute_as_result: bool = False,
    **extra: Any,
) -> Any:
    """``function`` over ``axis`` (all dimensions for None)."""
    a = _remote(a, name)
    dims = axes(axis, a.ndim)
    if axis is not None and not dims and a.ndim:
        raise unsupported(name, "axis", axis)  # torch reads an empty dim list as "all"
    options = {"dtype": dtype} if dtype is not None else {}
    with warnings.catch_warnings(), np.errstate(all="ignore"):  # a probe of one element
        warnings.simplefilter("ignore")
        result = np.asarray(reference(probe(a.shape, a.dtype), axis=dims, **options, **extra)).dtype
    cast = None
    if compute_as_result and a.dtype != result:  # mean, std, var of ints: in NumPy's float
        cast = result
    elif dtype is not None and a.dtype != np.dtype(dtype):
        cast = np.dtype(dtype)
    torch_extra = {("correction" if k == "ddof" else k): v for k, v in extra.items()}
    return apply(
        a._ctx,
        function,
        [a._use],
        {"dim": list(dims), "keepdim": bool(keepdims), **torch_extra},
        casts=[None if cast is None else _name(cast)],
        dtypes=[result],
        shapes=[reduced(a.shape, dims, keepdims)],
    )


def _name(dtype: np.dtype[Any]) -> str:
    from tensorwire.arrays.array import dtype_name

    return dtype_name(dtype)


def _remote(a: Any, name: str) -> Any:
    if not isinstance(a, RemoteArray):
        raise UnsupportedError(f"{name}: the array must be a remote array")
    return a


@implements(np.sum)
def sum(
    a: Any,
    axis: Any = None,
    dtype: Any = None,
    out: Any = None,
    keepdims: Any = False,
    initial: Any = None,
    where: Any = True,
) -> Any:
    """numpy.sum."""
    _check("numpy.sum", out, where, initial)
    return _reduction(a, "numpy.sum", "sum", np.sum, axis, keepdims, dtype)


@implements(np.prod)
def prod(
    a: Any,
    axis: Any = None,
    dtype: Any = None,
    out: Any = None,
    keepdims: Any = False,
    initial: Any = None,
    where: Any = True,
) -> Any:
    """numpy.prod (over all dimensions or one)."""
    _check("numpy.prod", out, where, initial)
    a = _remote(a, "numpy.prod")
    dims = axes(axis, a.ndim)
    result = np.asarray(np.prod(probe(a.shape, a.dtype), axis=dims, dtype=dtype)).dtype
    cast = [None if dtype is None or np.dtype(dtype) == a.dtype else _name(np.dtype(dtype))]
    if axis is None or len(dims) == a.ndim <= 1:
        full = apply(a._ctx, "prod", [a._use], casts=cast, dtypes=[result], shapes=[()])
        return full.reshape((1,) * a.ndim) if keepdims else full
    if len(dims) != 1:
        raise unsupported("numpy.prod", "axis", axis)
    return apply(
        a._ctx,
        "prod",
        [a._use, dims[0]],
        {"keepdim": bool(keepdims)},
        casts=[*cast, None],
        dtypes=[result],
        shapes=[reduced(a.shape, dims, keepdims)],
    )


@implements(np.mean)
def mean(
    a: Any,
    axis: Any = None,
    dtype: Any = None,
    out: Any = None,
    keepdims: Any = False,
    *,
    where: Any = True,
) -> Any:
    """numpy.mean (ints computed in float64, as NumPy does)."""
    _check("numpy.mean", out, where)
    return _reduction(
        a, "numpy.mean", "mean", np.mean, axis, keepdims, dtype, compute_as_result=True
    )


@implements(np.std)
def std(
    a: Any,
    axis: Any = None,
    dtype: Any = None,
    out: Any = None,
    ddof: Any = 0,
    keepdims: Any = False,
    *,
    where: Any = True,
    mean: Any = None,
    correction: Any = None,
) -> Any:
    """numpy.std (ddof or correction)."""
    _check("numpy.std", out, where, mean)
    ddof = correction if correction is not None else ddof
    return _reduction(
        a, "numpy.std", "std", np.std, axis, keepdims, dtype, compute_as_result=True, ddof=ddof
    )


@implements(np.var)
def var(
    a: Any,
    axis: Any = None,
    dtype: Any = None,
    out: Any = None,
    ddof: Any = 0,
    keepdims: Any = False,
    *,
    where: Any = True,
    mean: Any = None,
    correction: Any = None,
) -> Any:
    """numpy.var (ddof or correction)."""
    _check("numpy.var", out, where, mean)
    ddof = correction if correction is not None else ddof
    return _reduction(
        a, "numpy.var", "var", np.var, axis, keepdims, dtype, compute_as_result=True, ddof=ddof
    )


@implements(np.max, np.amax)
def max(
    a: Any,
    axis: Any = None,
    out: Any = None,
    keepdims: Any = False,
    initial: Any = None,
    where: Any = True,
) -> Any:
    """numpy.max."""
    _check("numpy.max", out, where, initial)
    return _reduction(a, "numpy.max", "amax", np.max, axis, keepdims)


@implements(np.min, np.amin)
def min(
    a: Any,
    axis: Any = None,
    out: Any = None,
    keepdims: Any = False,
    initial: Any = None,
    where: Any = True,
) -> Any:
    """numpy.min."""
    _check("numpy.min", out, where, initial)
    return _reduction(a, "numpy.min", "amin", np.min, axis, keepdims)


@implements(np.all)
def all(
    a: Any, axis: Any = None, out: Any = None, keepdims: Any = False, *, where: Any = True
) -> Any:
    """numpy.all."""
    _check("numpy.all", out, where)
    return _reduction(a, "numpy.all", "all", np.all, axis, keepdims)


@implements(np.any)
def any(
    a: Any, axis: Any = None, out: Any = None, keepdims: Any = False, *, where: Any = True
) -> Any:
    """numpy.any."""
    _check("numpy.any", out, where)
    return _reduction(a, "numpy.any", "any", np.any, axis, keepdims)


def _arg(name: str, function: str, a: Any, axis: Any, out: Any, keepdims: bool) -> Any:
    _check(name, out)
    a = _remote(a, name)
    kwargs: dict[str, Any] = {"keepdim": bool(keepdims)}
    if axis is None:
        shape = (1,) * a.ndim if keepdims else ()
    else:
        dim = axis_index(axis, a.ndim)
        kwargs["dim"] = dim
        shape = reduced(a.shape, (dim,), keepdims)
    cast = "uint8" if a.dtype == np.bool_ else None  # torch has no argmax of bools
    return apply(a._ctx, function, [a._use], kwargs, casts=[cast], dtypes=[np.intp], shapes=[shape])


@implements(np.argmax)
def argmax(a: Any, axis: Any = None, out: Any = None, *, keepdims: Any = False) -> Any:
    """numpy.argmax."""
    return _arg("numpy.argmax", "argmax", a, axis, out, keepdims)


@implements(np.argmin)
def argmin(a: Any, axis: Any = None, out: Any = None, *, keepdims: Any = False) -> Any:
    """numpy.argmin."""
    return _arg("numpy.argmin", "argmin", a, axis, out, keepdims)


def _reduce_method(function: Callable[..., Any]) -> Callable[..., Any]:
    def reduce(
        a: Any,
        axis: Any = 0,
        dtype: Any = None,
        out: Any = None,
        keepdims: Any = False,
        initial: Any = None,
        where: Any = True,
    ) -> Any:
        _check("reduce", out, where, initial)
        if dtype is not None:
            return function(a, axis=axis, dtype=dtype, keepdims=keepdims)
        return function(a, axis=axis, keepdims=keepdims)

    return reduce


REDUCES.update(
    {
        np.add: _reduce_method(sum),
        np.multiply: _reduce_method(prod),
        np.maximum: _reduce_method(max),
        np.minimum: _reduce_method(min),
        np.logical_and: _reduce_method(all),
        np.logical_or: _reduce_method(any),
    }
)

_METHODS = {
    "sum": sum,
    "prod": prod,
    "mean": mean,
    "std": std,
    "var": var,
    "max": max,
    "min": min,
    "all": all,
    "any": any,
    "argmax": argmax,
    "argmin": argmin,
}
for _method, _impl in _METHODS.items():
    setattr(RemoteArray, _method, _impl)
    METHODS.append(_method)
