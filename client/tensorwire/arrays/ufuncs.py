"""NumPy's ufuncs on remote arrays: each one torch function on the allowlist, run in
the dtypes NumPy's own type resolution picks (NEP 50: Python scalars are weak)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from tensorwire.arrays.dispatch import UFUNCS, UnsupportedError
from tensorwire.arrays.ops import (
    apply,
    argument,
    cast_for,
    context_of,
    dtype_of,
    operand,
    shape_of,
)
from tensorwire.arrays.shapes import matmul_shape

_FLOOR = {"rounding_mode": "floor"}

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


def call_ufunc(ufunc: Any, inputs: Sequence[Any]) -> Any:
    """``ufunc(*inputs)`` on the server, with NumPy's result dtype and shape."""
    name = f"numpy.{ufunc.__name__}"
    if len(inputs) != ufunc.nin:
        raise TypeError(f"{name} takes {ufunc.nin} operands, not {len(inputs)}")
    ctx = context_of(name, *inputs)
    operands = [operand(v) for v in inputs]
    function, extra = UFUNCS[ufunc]
    try:  # NumPy's own type resolution: the dtypes it would compute in and return
        loop = ufunc.resolve_dtypes((*(dtype_of(o) for o in operands), *(None,) * ufunc.nout))
    except TypeError as exc:
        raise UnsupportedError(f"{name}: {exc}") from None
    ins, outs = loop[: ufunc.nin], loop[ufunc.nin :]
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
