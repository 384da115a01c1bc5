"""NumPy functions on remote arrays besides ufuncs and reductions: products, shape
and layout, selection, sorting, clipping and rounding."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorwire.arrays.array import RemoteArray, dtype_name, standin
from tensorwire.arrays.dispatch import METHODS, UnsupportedError, implements
from tensorwire.arrays.ops import (
    apply,
    argument,
    cast_for,
    context_of,
    elementwise,
    is_weak,
    operand,
    shape_of,
    unsupported,
)
from tensorwire.arrays.shapes import axes, axis_index, einsum_shape, matmul_shape, reshaped


def _result_type(*operands: Any) -> np.dtype[Any]:
    """NumPy's result_type with weak Python scalars (NEP 50)."""
    return np.result_type(*(o if is_weak(o) else o.dtype for o in operands))


def _same_layout(a: RemoteArray, function: str, args: Sequence[Any], shape: Any) -> Any:
    """A step that only moves ``a``'s elements: same dtype, no casts."""
    return apply(a._ctx, function, [a._use, *args], dtypes=[a.dtype], shapes=[shape])


@implements(np.reshape)
def reshape(a: Any, shape: Any = None, order: str = "C", *, copy: Any = None) -> Any:
    """numpy.reshape (C order)."""
    if order != "C":
        raise unsupported("numpy.reshape", "order", order)
    new = reshaped(a.shape, shape)
    return _same_layout(a, "reshape", [list(new)], new)


def _reshape_method(self: RemoteArray, *shape: Any, order: str = "C") -> Any:
    return reshape(self, shape[0] if len(shape) == 1 else shape, order)


@implements(np.ravel)
def ravel(a: Any, order: str = "C") -> Any:
    """numpy.ravel (C order)."""
    return reshape(a, -1, order)


@implements(np.transpose)
def transpose(a: Any, axes_: Any = None, **kwargs: Any) -> Any:
    """numpy.transpose."""
    given = kwargs.pop("axes", axes_)
    dims = tuple(reversed(range(a.ndim))) if given is None else axes(given, a.ndim)
    if len(dims) != a.ndim:
        raise ValueError("axes don't match array")
    return _same_layout(a, "permute", [list(dims)], standin(a.shape, a.dtype).transpose(dims).shape)


def _transpose_method(self: RemoteArray, *order: Any) -> Any:
    given: Any = order
    if len(order) == 1 and (order[0] is None or not isinstance(order[0], int)):
        given = order[0]
    return transpose(self, given or None)


@implements(np.swapaxes)
def swapaxes(a: Any, axis1: int, axis2: int) -> Any:
    """numpy.swapaxes."""
    i, j = axis_index(axis1, a.ndim), axis_index(axis2, a.ndim)
    return _same_layout(a, "transpose", [i, j], standin(a.shape, a.dtype).swapaxes(i, j).shape)


@implements(np.expand_dims)
def expand_dims(a: Any, axis: Any) -> Any:
    """numpy.expand_dims."""
    return reshape(a, np.expand_dims(standin(a.shape, a.dtype), axis).shape)


@implements(np.squeeze)
def squeeze(a: Any, axis: Any = None) -> Any:
    """numpy.squeeze."""
    return reshape(a, np.squeeze(standin(a.shape, a.dtype), axis).shape)


@implements(np.concatenate)
def concatenate(
    arrays: Sequence[Any],
    axis: Any = 0,
    out: Any = None,
    *,
    dtype: Any = None,
    casting: str = "same_kind",
) -> Any:
    """numpy.concatenate."""
    if out is not None:
        raise unsupported("numpy.concatenate", "out", out)
    ctx = context_of("numpy.concatenate", *arrays)
    items = [operand(a) for a in arrays]
    if axis is None:
        items = [i.reshape(-1) for i in items]
        axis = 0
    result = np.dtype(dtype) if dtype is not None else _result_type(*items)
    shapes = [shape_of(i) for i in items]
    if any(is_weak(i) for i in items) or not shapes or not shapes[0]:
        raise ValueError("zero-dimensional arrays cannot be concatenated")
    dim = axis_index(axis, len(shapes[0]))
    total = list(shapes[0])
    for s in shapes[1:]:
        if len(s) != len(shapes[0]) or any(
            x != y for k, (x, y) in enumerate(zip(s, shapes[0], strict=True)) if k != dim
        ):
            raise ValueError(
                "all the input array dimensions except for the concatenation "
                f"axis must match exactly; got {shapes}"
            )
        total[dim] += s[dim]
    return _join(ctx, "cat", items, result, dim, tuple(total))


def _join(ctx: Any, function: str, items: list[Any], dtype: Any, dim: int, shape: Any) -> Any:
    tensors = [argument(i, dtype) for i in items]
    casts = {cast_for(i, dtype) for i in items} - {None}
    return apply(
        ctx,
        function,
        [tensors, dim],
        casts=[dtype_name(dtype) if casts else None, None],
        dtypes=[dtype],
        shapes=[shape],
    )


@implements(np.stack)
def stack(
    arrays: Sequence[Any],
    axis: int = 0,
    out: Any = None,
    *,
    dtype: Any = None,
    casting: str = "same_kind",
) -> Any:
    """numpy.stack."""
    if out is not None:
        raise unsupported("numpy.stack", "out", out)
    ctx = context_of("numpy.stack", *arrays)
    items = [operand(a) for a in arrays]
    shapes = {shape_of(i) for i in items}
    if len(shapes) != 1:
        raise ValueError("all input arrays must have the same shape")
    (first,) = shapes
    dim = axis_index(axis, len(first) + 1)
    result = np.dtype(dtype) if dtype is not None else _result_type(*items)
    return _join(ctx, "stack", items, result, dim, (*first[:dim], len(items), *first[dim:]))


@implements(np.matmul)
def matmul(a: Any, b: Any, /, out: Any = None, **kwargs: Any) -> Any:
    """numpy.matmul."""
    if out is not None or kwargs:
        raise unsupported("numpy.matmul", "out", out)
    return np.matmul(a, b)


@implements(np.dot)
def dot(a: Any, b: Any, out: Any = None) -> Any:
    """numpy.dot for operands of at most two dimensions (scalars multiply)."""
    if out is not None:
        raise unsupported("numpy.dot", "out", out)
    a, b = operand(a), operand(b)
    if not shape_of(a) or not shape_of(b):
        return np.multiply(a, b)
    if len(shape_of(a)) > 2 or len(shape_of(b)) > 2:
        raise UnsupportedError("numpy.dot of arrays over 2-D: use numpy.matmul or numpy.einsum")
    ctx = context_of("numpy.dot", a, b)
    result = _result_type(a, b)
    shape = matmul_shape(shape_of(a), shape_of(b))
    return elementwise(ctx, "matmul", [a, b], result, shape=shape)


@implements(np.einsum)
def einsum(
    subscripts: str,
    *operands: Any,
    out: Any = None,
    dtype: Any = None,
    optimize: Any = False,
    **kwargs: Any,
) -> Any:
    """numpy.einsum with explicit or implicit output (no '...')."""
    if out is not None or kwargs:
        raise unsupported("numpy.einsum", "out", out)
    if not isinstance(subscripts, str):
        raise UnsupportedError("numpy.einsum: give the subscripts as a string")
    ctx = context_of("numpy.einsum", *operands)
    items = [operand(o) for o in operands]
    result = np.dtype(dtype) if dtype is not None else _result_type(*items)
    shape = einsum_shape(subscripts, [shape_of(i) for i in items])
    return apply(
        ctx,
        "einsum",
        [subscripts, *(argument(i, result) for i in items)],
        casts=[None, *(cast_for(i, result) for i in items)],
        dtypes=[result],
        shapes=[shape],
    )


@implements(np.where)
def where(condition: Any, x: Any = None, y: Any = None, /) -> Any:
    """numpy.where with three arguments."""
    if x is None or y is None:
        raise UnsupportedError("numpy.where with one argument (nonzero) is not supported")
    ctx = context_of("numpy.where", condition, x, y)
    cond, a, b = operand(condition), operand(x), operand(y)
    result = _result_type(a, b)
    shape = np.broadcast_shapes(shape_of(cond), shape_of(a), shape_of(b))
    return apply(
        ctx,
        "where",
        [argument(cond, np.dtype(bool)), argument(a, result), argument(b, result)],
        casts=[cast_for(cond, np.dtype(bool)), cast_for(a, result), cast_for(b, result)],
        dtypes=[result],
        shapes=[shape],
    )


@implements(np.clip)
def clip(
    a: Any,
    a_min: Any = None,
    a_max: Any = None,
    out: Any = None,
    *,
    min: Any = None,
    max: Any = None,
    **kwargs: Any,
) -> Any:
    """numpy.clip."""
    if out is not None or kwargs:
        raise unsupported("numpy.clip", "out", out)
    low = a_min if a_min is not None else min
    high = a_max if a_max is not None else max
    ctx = context_of("numpy.clip", a, low, high)
    items = [operand(v) for v in (a, low, high) if v is not None]
    result = _result_type(*items)
    shape = np.broadcast_shapes(*(shape_of(i) for i in items))
    args = [argument(operand(v), result) if v is not None else None for v in (a, low, high)]
    casts = [cast_for(operand(v), result) if v is not None else None for v in (a, low, high)]
    return apply(ctx, "clamp", args, casts=casts, dtypes=[result], shapes=[shape])


@implements(np.sort)
def sort(a: Any, axis: Any = -1, kind: Any = None, order: Any = None, *, stable: Any = None) -> Any:
    """numpy.sort (values; axis None sorts the flattened array)."""
    if order is not None:
        raise unsupported("numpy.sort", "order", order)
    if axis is None:
        a, axis = ravel(a), 0
    dim = axis_index(axis, a.ndim)
    cast = "uint8" if a.dtype == np.bool_ else None
    return apply(
        a._ctx,
        "sort",
        [a._use, dim],
        casts=[cast, None],
        dtypes=[a.dtype],
        shapes=[a.shape],
        tuple_result=True,
    )


@implements(np.round, np.around)
def round_(a: Any, decimals: int = 0, out: Any = None) -> Any:
    """numpy.round (half to even)."""
    if out is not None:
        raise unsupported("numpy.round", "out", out)
    kwargs = {"decimals": int(decimals)} if decimals else {}
    if a.dtype.kind in "biu" and decimals >= 0:
        return a
    return apply(a._ctx, "round", [a._use], kwargs, dtypes=[a.dtype], shapes=[a.shape])


@implements(np.astype)
def astype(x: Any, dtype: Any, /, *, copy: bool = True, device: Any = None) -> Any:
    """numpy.astype."""
    return x.astype(dtype, copy=copy)


@implements(np.shape)
def shape(a: Any) -> tuple[int, ...]:
    """numpy.shape, known on the client."""
    return tuple(a.shape)


@implements(np.ndim)
def ndim(a: Any) -> int:
    """numpy.ndim, known on the client."""
    return int(a.ndim)


@implements(np.size)
def size(a: Any, axis: Any = None) -> int:
    """numpy.size, known on the client."""
    return int(a.size if axis is None else a.shape[axis_index(axis, a.ndim)])


@implements(np.result_type)
def result_type(*arrays_and_dtypes: Any) -> np.dtype[Any]:
    """numpy.result_type, from the dtypes (known on the client)."""
    return np.result_type(*(getattr(a, "dtype", a) for a in arrays_and_dtypes))


def _copy(self: RemoteArray) -> Any:
    return self  # remote arrays are immutable: a copy could not differ


_METHODS = {
    "reshape": _reshape_method,
    "ravel": ravel,
    "flatten": ravel,
    "transpose": _transpose_method,
    "swapaxes": swapaxes,
    "squeeze": squeeze,
    "clip": clip,
    "round": round_,
    "dot": dot,
    "copy": _copy,
}
for _method, _impl in _METHODS.items():
    setattr(RemoteArray, _method, _impl)
    METHODS.append(_method)
for _name in ("astype", "T", "mT", "shape", "dtype", "ndim", "size", "nbytes"):
    METHODS.append(_name)
