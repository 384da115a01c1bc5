"""NumPy's ufuncs on remote arrays: each one torch function on the allowlist, run in
the dtypes NumPy's own type resolution picks (NEP 50: Python scalars are weak)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorwire.arrays.dispatch import HOOKS, UFUNCS, UnsupportedError
from tensorwire.arrays.ops import (
    apply,
    argument,
    cast_for,
    context_of,
    dtype_of,
    is_weak,
    operand,
    shape_of,
)
from tensorwire.arrays.shapes import matmul_shape

_FLOOR = {"rounding_mode": "floor"}
# torch functions without a bool kernel where NumPy has a bool loop: computed in int64
# (wide enough for matmul's sums), the result cast back to NumPy's bool.
_COMPARE = {"eq", "ne", "lt", "le", "gt", "ge"}
_NO_BOOL = {"abs", "floor", "ceil", "trunc", "round", "matmul", "pow", "remainder", "fmod"}

UFUNCS.update(
    {
        np.add: ("add", {}),
        np.subtract: ("sub", {}),
        np.multiply: ("mul", {}),
        np.true_divide: ("div", {}),
        np.floor_divide: ("div", _FLOOR),
        np.remainder: ("remainder", {}),
        np.fmod: ("fmod", {}),
        np.power: ("pow", {}),
        np.maximum: ("maximum", {}),
        np.minimum: ("minimum", {}),
        np.arctan2: ("atan2", {}),
        np.hypot: ("hypot", {}),
        np.logaddexp: ("logaddexp", {}),
        np.equal: ("eq", {}),
        np.not_equal: ("ne", {}),
        np.less: ("lt", {}),
        np.less_equal: ("le", {}),
        np.greater: ("gt", {}),
        np.greater_equal: ("ge", {}),
        np.logical_and: ("logical_and", {}),
        np.logical_or: ("logical_or", {}),
        np.logical_xor: ("logical_xor", {}),
        np.logical_not: ("logical_not", {}),
        np.negative: ("neg", {}),
        np.positive: ("", {}),  # the operand itself
        np.absolute: ("abs", {}),
        np.sign: ("sign", {}),
        np.square: ("square", {}),
        np.sqrt: ("sqrt", {}),
        np.reciprocal: ("reciprocal", {}),
        np.exp: ("exp", {}),
        np.expm1: ("expm1", {}),
        np.log: ("log", {}),
        np.log1p: ("log1p", {}),
        np.log2: ("log2", {}),
        np.log10: ("log10", {}),
        np.sin: ("sin", {}),
        np.cos: ("cos", {}),
        np.tan: ("tan", {}),
        np.arcsin: ("asin", {}),
        np.arccos: ("acos", {}),
        np.arctan: ("atan", {}),
        np.sinh: ("sinh", {}),
        np.cosh: ("cosh", {}),
        np.tanh: ("tanh", {}),
        np.arcsinh: ("asinh", {}),
        np.arccosh: ("acosh", {}),
        np.arctanh: ("atanh", {}),
        np.floor: ("floor", {}),
        np.ceil: ("ceil", {}),
        np.trunc: ("trunc", {}),
        np.rint: ("round", {}),
        np.isfinite: ("isfinite", {}),
        np.isnan: ("isnan", {}),
        np.isinf: ("isinf", {}),
        np.matmul: ("matmul", {}),
    }
)


def _out_of_range(value: Any, dtype: np.dtype[Any]) -> bool:
    """A weak Python int outside an integer dtype's range."""
    if not (is_weak(value) and isinstance(value, int) and dtype.kind in "iu"):
        return False
    info = np.iinfo(dtype)
    return not int(info.min) <= value <= int(info.max)


def _resolve(ufunc: Any, name: str, operands: Sequence[Any]) -> tuple[np.dtype[Any], ...]:
    """The dtypes NumPy computes ``ufunc`` in and returns, by NumPy's own resolution."""
    try:
        return tuple(
            ufunc.resolve_dtypes((*(dtype_of(o) for o in operands), *(None,) * ufunc.nout))
        )
    except TypeError as exc:  # NumPy has no loop for these dtypes: it refuses too
        raise UnsupportedError(f"{name}: {exc}") from None


def call_ufunc(ufunc: Any, inputs: Sequence[Any]) -> Any:
    """``ufunc(*inputs)`` on the server, with NumPy's result dtype and shape."""
    name = f"numpy.{ufunc.__name__}"
    if len(inputs) != ufunc.nin:
        raise TypeError(f"{name} takes {ufunc.nin} operands, not {len(inputs)}")
    ctx = context_of(name, *inputs)
    operands = [operand(v) for v in inputs]
    function, extra = UFUNCS[ufunc]
    loop = _resolve(ufunc, name, operands)
    ins, outs = loop[: ufunc.nin], loop[ufunc.nin :]
    if function in _COMPARE and any(
        _out_of_range(o, d) for o, d in zip(operands, ins, strict=True)
    ):
        ins = (np.dtype(np.int64),) * len(ins)  # NumPy compares such Python ints exactly
    if function in _NO_BOOL:
        ins = tuple(np.dtype(np.int64) if d == np.bool_ else d for d in ins)
    if ufunc is np.matmul:
        shape = matmul_shape(shape_of(operands[0]), shape_of(operands[1]))
    else:
        shape = np.broadcast_shapes(*(shape_of(o) for o in operands))
    if not function:  # positive: the array itself, as the computed dtype
        only = operands[0]
        return only.astype(outs[0], copy=False) if hasattr(only, "astype") else only
    return apply(
        ctx,
        function,
        [argument(o, d) for o, d in zip(operands, ins, strict=True)],
        dict(extra),
        casts=[cast_for(o, d) for o, d in zip(operands, ins, strict=True)],
        dtypes=list(outs),
        shapes=[shape] * len(outs),
    )


HOOKS["ufunc"] = call_ufunc
