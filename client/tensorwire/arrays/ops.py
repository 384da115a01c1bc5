"""Building graph nodes: operands sorted into remote arrays, local data and weak
Python scalars, and one step that computes a NumPy function's result with exactly
NumPy's dtypes (``numpy.apply`` casts arguments and results on the server)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorwire.arrays.array import RemoteArray, dtype_name, shown
from tensorwire.arrays.dispatch import UnsupportedError
from tensorwire.arrays.execute import Context
from tensorwire.arrays.graph import Node, Use

#: Python scalars NumPy treats as weak (NEP 50): they take the array's dtype.
WEAK = (int, float, complex)


def is_weak(value: Any) -> bool:
    """A Python int, float or complex (not bool, not a NumPy scalar)."""
    return isinstance(value, WEAK) and not isinstance(value, bool | np.generic)


def context_of(what: str, *values: Any) -> Context:
    """The one client context the remote arrays among ``values`` share."""
    contexts = {id(v._ctx): v._ctx for v in _remote(values)}
    if not contexts:
        raise TypeError(f"{what}: no remote array among the arguments")
    if len(contexts) > 1:
        raise ValueError(f"{what}: the remote arrays belong to different clients")
    return next(iter(contexts.values()))


def _remote(values: Any) -> list[RemoteArray]:
    found: list[RemoteArray] = []
    for value in values:
        if isinstance(value, RemoteArray):
            found.append(value)
        elif isinstance(value, list | tuple):
            found += _remote(value)
    return found


def operand(value: Any) -> Any:
    """A remote array, a weak Python scalar, or anything else as a local NumPy array."""
    if isinstance(value, RemoteArray) or is_weak(value):
        return value
    arr = np.asarray(value)
    dtype_name(arr.dtype)  # refuses object, string and date arrays
    return arr


def dtype_of(value: Any) -> Any:
    """What NumPy's dtype resolution takes for an operand: a dtype, or a weak scalar's type."""
    return type(value) if is_weak(value) else value.dtype


def shape_of(value: Any) -> tuple[int, ...]:
    """An operand's shape (a scalar's is ())."""
    return () if is_weak(value) else tuple(value.shape)


def argument(value: Any, dtype: np.dtype[Any] | None) -> Any:
    """An operand as a step argument: its graph use, or local data (a weak scalar as a
    0-d array of the dtype NumPy computes in, where ``dtype`` is given)."""
    if isinstance(value, RemoteArray):
        return value._use
    if is_weak(value):
        return np.asarray(value, dtype=dtype) if dtype is not None else value
    return value


def cast_for(value: Any, dtype: np.dtype[Any] | None) -> str | None:
    """The dtype name to cast an operand to on the server, or None when it has it."""
    if dtype is None or is_weak(value) or not hasattr(value, "dtype"):
        return None
    return None if value.dtype == dtype else dtype_name(dtype)


def apply(
    ctx: Context,
    function: str,
    args: Sequence[Any],
    kwargs: dict[str, Any] | None = None,
    *,
    casts: Sequence[str | None] | None = None,
    dtypes: Sequence[Any],
    shapes: Sequence[Sequence[int]],
    tuple_result: bool = False,
) -> Any:
    """One step running the allowlisted ``function`` on ``args`` (operands already
    made arguments) with tensor arguments cast to ``casts`` and results cast to
    ``dtypes``; the remote array(s) of its result, shaped ``shapes``. ``tuple_result``:
    the function returns a tuple even for one dtype (sort's values, indices)."""
    names = [dtype_name(np.dtype(d)) for d in dtypes]
    several = len(names) > 1 or tuple_result
    options: dict[str, Any] = {"results": names if several else names[0]}
    if casts is not None and any(c is not None for c in casts):
        options["casts"] = list(casts)
    node = Node("numpy.apply", (function, *args), {**(kwargs or {}), **options})
    if len(names) > 1:
        node.outputs = len(names)
        return tuple(
            RemoteArray(ctx, Use(node, i), d, s)
            for i, (d, s) in enumerate(zip(dtypes, shapes, strict=True))
        )
    return RemoteArray(ctx, Use(node), dtypes[0], shapes[0])


def elementwise(
    ctx: Context, function: str, operands: Sequence[Any], dtype: Any, *, shape: Any = None
) -> Any:
    """``function`` on operands all cast to ``dtype`` first, with a result of ``dtype``."""
    dtype = np.dtype(dtype)
    shape = np.broadcast_shapes(*(shape_of(o) for o in operands)) if shape is None else shape
    return apply(
        ctx,
        function,
        [argument(o, dtype) for o in operands],
        casts=[cast_for(o, dtype) for o in operands],
        dtypes=[dtype],
        shapes=[shape],
    )


def unsupported(function: str, argument: str, value: Any) -> UnsupportedError:
    """The error for an argument value remote arrays do not implement."""
    return UnsupportedError(
        f"{function}: {argument}={shown(value)} is not supported on remote arrays"
    )
