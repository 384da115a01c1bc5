"""The array API standard's namespace for remote arrays, where it is cheap: each name
is the NumPy function, which dispatches to the remote implementation
(``x.__array_namespace__()`` returns this module)."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import numpy as np

from tensorwire.arrays import linalg_fft
from tensorwire.arrays.dispatch import HOOKS

add, subtract, multiply, divide = np.add, np.subtract, np.multiply, np.true_divide
floor_divide, remainder, pow, negative = np.floor_divide, np.remainder, np.power, np.negative
positive, abs, sign, sqrt, square = np.positive, np.absolute, np.sign, np.sqrt, np.square
exp, expm1, log, log1p, log2, log10 = np.exp, np.expm1, np.log, np.log1p, np.log2, np.log10
sin, cos, tan, asin, acos, atan = np.sin, np.cos, np.tan, np.arcsin, np.arccos, np.arctan
atan2, sinh, cosh, tanh = np.arctan2, np.sinh, np.cosh, np.tanh
asinh, acosh, atanh = np.arcsinh, np.arccosh, np.arctanh
floor, ceil, trunc, round = np.floor, np.ceil, np.trunc, np.round
equal, not_equal, less, less_equal = np.equal, np.not_equal, np.less, np.less_equal
greater, greater_equal = np.greater, np.greater_equal
logical_and, logical_or, logical_xor, logical_not = (
    np.logical_and,
    np.logical_or,
    np.logical_xor,
    np.logical_not,
)
isfinite, isnan, isinf = np.isfinite, np.isnan, np.isinf
maximum, minimum, hypot, logaddexp = np.maximum, np.minimum, np.hypot, np.logaddexp
matmul = np.matmul
sum, prod, mean, std, var = np.sum, np.prod, np.mean, np.std, np.var
max, min, argmax, argmin, all, any = np.max, np.min, np.argmax, np.argmin, np.all, np.any
reshape, permute_dims, concat, stack = np.reshape, np.transpose, np.concatenate, np.stack
expand_dims, squeeze, where, clip, sort = np.expand_dims, np.squeeze, np.where, np.clip, np.sort
astype = np.astype
linalg = SimpleNamespace(
    svd=linalg_fft.svd,
    solve=linalg_fft.solve,
    inv=linalg_fft.inv,
    det=linalg_fft.det,
    matmul=np.matmul,
)
fft = SimpleNamespace(
    fft=linalg_fft.fft, ifft=linalg_fft.ifft, rfft=linalg_fft.rfft, irfft=linalg_fft.irfft
)

HOOKS["namespace"] = sys.modules[__name__]
