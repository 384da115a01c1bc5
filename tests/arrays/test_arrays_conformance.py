"""Every function remote arrays support, run as the same NumPy code on NumPy arrays and
on remote arrays of a real server: the dtype must be NumPy's exactly, the shape too,
and the values within tolerance. A case lists what it covers, and every supported name
is covered (test_every_supported_name_has_a_case)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import pytest

import tensorwire.arrays as ta
from tensorwire import Client

rng = np.random.default_rng(36)
A = rng.standard_normal((4, 5)).astype(np.float32)
B = rng.standard_normal((5, 3))  # float64
S = (rng.standard_normal((4, 4)) + 4 * np.eye(4)).astype(np.float32)  # well conditioned
P = rng.uniform(0.5, 2.0, (3, 4)).astype(np.float32)  # positive
U1 = rng.uniform(-0.9, 0.9, (6,))  # inside (-1, 1)
G = rng.uniform(1.5, 3.0, (6,))  # above 1
I32 = rng.integers(-20, 20, (3, 4)).astype(np.int32)
D32 = rng.integers(1, 7, (3, 4)).astype(np.int32) * rng.choice([-1, 1], (3, 4)).astype(np.int32)
I64 = rng.integers(-50, 50, (6,))
U8 = rng.integers(0, 200, (2, 3)).astype(np.uint8)
M = rng.random((3, 4)) > 0.5
H = rng.standard_normal((3, 4)).astype(np.float16)
C64 = (rng.standard_normal((4, 3)) + 1j * rng.standard_normal((4, 3))).astype(np.complex64)
V = rng.standard_normal(16).astype(np.float32)
T3 = rng.standard_normal((2, 3, 4)).astype(np.float32)

Fn = Callable[..., Any]
# (what it covers, inputs, the NumPy code)
CASES: list[tuple[tuple[str, ...], tuple[np.ndarray, ...], Fn]] = [
    # Operators and arithmetic ufuncs, NEP 50 scalars, int/float mixes.
    (("numpy.add",), (A, P[:, :1].T[:, :1]), lambda a, b: a + b),
    (("numpy.add",), (I32,), lambda a: a + 2.5),  # int with a Python float: float64
    (("numpy.add",), (A,), lambda a: 1.5 + a),  # float32 with a Python float: float32
    (("numpy.add",), (U8,), lambda a: a + 3),  # uint8 with a Python int: uint8
    (("numpy.add",), (I32, I64[:4]), lambda a, b: a + b),  # int32 + int64: int64
    (("numpy.add",), (A, B.T[:1]), lambda a, b: a + b),  # float32 + float64: float64
    (("numpy.add",), (M, M), lambda a, b: a + b),
    (("numpy.subtract",), (A,), lambda a: 1 - a),
    (("numpy.multiply",), (H,), lambda a: a * 3.0),
    (("numpy.multiply",), (C64,), lambda a: a * 2j),
    (("numpy.divide",), (I32, D32), lambda a, b: a / b),  # int / int: float64
    (("numpy.divide",), (A,), lambda a: a / 4),
    (("numpy.floor_divide",), (I32, D32), lambda a, b: a // b),  # sign of the divisor
    (("numpy.floor_divide",), (P,), lambda a: (a - 1.0) // -0.3),
    (("numpy.remainder",), (I32, D32), lambda a, b: a % b),
    (("numpy.remainder",), (P,), lambda a: (a - 1.0) % -0.7),
    (("numpy.fmod",), (I32, D32), lambda a, b: np.fmod(a, b)),
    (("numpy.power",), (P,), lambda a: a**2.5),
    (("numpy.power",), (I32,), lambda a: a**2),
    (("numpy.power",), (P,), lambda a: 2.0**a),
    (("numpy.negative",), (A,), lambda a: -a),
    (("numpy.positive",), (I32,), lambda a: +a),
    (("numpy.absolute",), (I32,), lambda a: abs(a)),
    (("numpy.absolute",), (C64,), lambda a: np.abs(a)),  # complex64: float32
    (("numpy.matmul",), (A, B), lambda a, b: a @ b),
    (("numpy.matmul",), (T3, V[:4]), lambda a, b: np.matmul(a, b)),
    (("numpy.matmul",), (B.T.copy(), A.T.copy()), lambda b, a: b @ a),
    (
        ("numpy.maximum", "numpy.minimum"),
        (A, A[::-1]),
        lambda a, b: np.maximum(a, np.minimum(b, 0.5)),
    ),
    (
        ("numpy.arctan2", "numpy.hypot"),
        (A, B[:, 0]),
        lambda a, b: np.arctan2(a, b) + np.hypot(a, b),
    ),
    (("numpy.logaddexp",), (A,), lambda a: np.logaddexp(a, 0.5)),
    # Comparisons and logic.
    (("numpy.less",), (A,), lambda a: a < 0.1),
    (("numpy.less",), (I32,), lambda a: a < 2.5),
    (
        ("numpy.less_equal", "numpy.greater", "numpy.greater_equal"),
        (I32, D32),
        lambda a, b: ((a <= b) & (a > -3)) | (b >= 4),
    ),
    (("numpy.equal", "numpy.not_equal"), (I32, D32), lambda a, b: (a == b) ^ (a != 3)),
    (
        ("numpy.logical_and", "numpy.logical_or", "numpy.logical_xor", "numpy.logical_not"),
        (M, M.T.copy().reshape(3, 4)),
        lambda a, b: np.logical_xor(np.logical_and(a, b), np.logical_or(~a, np.logical_not(b))),
    ),
    (
        ("numpy.isfinite", "numpy.isnan", "numpy.isinf"),
        (A,),
        lambda a: np.isfinite(a / (a > 0)) & ~np.isnan(a) & ~np.isinf(a),
    ),
    # Elementwise functions.
    (("numpy.exp", "numpy.expm1"), (A,), lambda a: np.exp(a) + np.expm1(a)),
    (
        ("numpy.log", "numpy.log1p", "numpy.log2", "numpy.log10"),
        (P,),
        lambda a: np.log(a) + np.log1p(a) + np.log2(a) + np.log10(a),
    ),
    (("numpy.log",), (I32,), lambda a: np.log(abs(a) + 1)),  # int: float64
    (
        ("numpy.sqrt", "numpy.square", "numpy.reciprocal"),
        (P,),
        lambda a: np.sqrt(a) + np.square(a) + np.reciprocal(a),
    ),
    (("numpy.sin", "numpy.cos", "numpy.tan"), (A,), lambda a: np.sin(a) + np.cos(a) + np.tan(a)),
    (
        ("numpy.arcsin", "numpy.arccos", "numpy.arctan", "numpy.arctanh"),
        (U1,),
        lambda a: np.arcsin(a) + np.arccos(a) + np.arctan(a) + np.arctanh(a),
    ),
    (
        ("numpy.sinh", "numpy.cosh", "numpy.tanh", "numpy.arcsinh"),
        (A,),
        lambda a: np.sinh(a) + np.cosh(a) + np.tanh(a) + np.arcsinh(a),
    ),
    (("numpy.arccosh",), (G,), lambda a: np.arccosh(a)),
    (
        ("numpy.sign", "numpy.floor", "numpy.ceil", "numpy.trunc", "numpy.rint"),
        (A,),
        lambda a: np.sign(a) + np.floor(3 * a) + np.ceil(3 * a) + np.trunc(3 * a) + np.rint(3 * a),
    ),
    (("numpy.where",), (A,), lambda a: np.where(a > 0, a, 0)),
    (("numpy.where",), (I32, A[:3, :4]), lambda i, a: np.where(i > 0, i, a)),
    (
        ("numpy.clip", "RemoteArray.clip"),
        (A, I32),
        lambda a, i: np.clip(a[:3, :4], -0.5, 0.5) + i.clip(-3, 3),
    ),
    (
        ("numpy.round", "numpy.around", "RemoteArray.round"),
        (A,),
        lambda a: np.round(a * 10) + np.around(a, 2) + a.round(1),
    ),
    # Reductions, with axis and keepdims, and their integer and bool dtypes.
    (("numpy.sum", "RemoteArray.sum"), (A,), lambda a: np.sum(a) + a.sum(axis=0, keepdims=True)),
    (("numpy.sum",), (I32,), lambda a: np.sum(a, axis=1)),  # int32: int64
    (("numpy.sum",), (U8,), lambda a: np.sum(a)),  # uint8: uint64
    (("numpy.sum",), (M,), lambda a: np.sum(a, axis=(0, 1))),  # bool: int64
    (("numpy.sum",), (A,), lambda a: np.sum(a, axis=-1, dtype=np.float64)),
    (("numpy.add.reduce",), (I32,), lambda a: np.add.reduce(a)),
    (
        ("numpy.prod", "RemoteArray.prod", "numpy.multiply.reduce"),
        (P,),
        lambda a: np.prod(a) + a.prod(axis=1).sum() + np.multiply.reduce(a).sum(),
    ),
    (("numpy.mean", "RemoteArray.mean"), (A,), lambda a: np.mean(a, axis=0) + a.mean()),
    (("numpy.mean",), (I32,), lambda a: np.mean(a, axis=1, keepdims=True)),  # int: float64
    (("numpy.std", "RemoteArray.std"), (A,), lambda a: np.std(a, axis=1) + a.std(ddof=1)),
    (("numpy.var", "RemoteArray.var"), (I32,), lambda a: np.var(a, axis=0) + a.var()),
    (
        ("numpy.max", "numpy.amax", "RemoteArray.max", "numpy.maximum.reduce"),
        (A,),
        lambda a: np.max(a, axis=1) + np.amax(a) + a.max(axis=-1) + np.maximum.reduce(a, axis=1),
    ),
    (
        ("numpy.min", "numpy.amin", "RemoteArray.min", "numpy.minimum.reduce"),
        (I32,),
        lambda a: np.min(a, axis=0) + np.amin(a) + a.min(axis=0) + np.minimum.reduce(a),
    ),
    (("numpy.argmax", "RemoteArray.argmax"), (A,), lambda a: np.argmax(a, axis=1) + a.argmax()),
    (("numpy.argmin", "RemoteArray.argmin"), (I64,), lambda a: np.argmin(a) + a.argmin(axis=0)),
    (
        (
            "numpy.all",
            "numpy.any",
            "RemoteArray.all",
            "RemoteArray.any",
            "numpy.logical_and.reduce",
            "numpy.logical_or.reduce",
        ),
        (M,),
        lambda a: (
            np.all(a, axis=0)
            ^ np.any(a, axis=0)
            ^ a.all(axis=0)
            ^ a.any(axis=0)
            ^ np.logical_and.reduce(a)
            ^ np.logical_or.reduce(a)
        ),
    ),
    # Products.
    (("numpy.dot", "RemoteArray.dot"), (A, B), lambda a, b: np.dot(a, b) + a.dot(b)),
    (("numpy.dot",), (V,), lambda v: np.dot(v, v)),
    (("numpy.einsum",), (A, B), lambda a, b: np.einsum("ij,jk->ik", a, b)),
    (("numpy.einsum",), (T3,), lambda t: np.einsum("bij->j", t)),
    # Shape and layout.
    (
        ("numpy.reshape", "RemoteArray.reshape"),
        (A,),
        lambda a: np.reshape(a, (2, -1)) + a.reshape(2, 10),
    ),
    (
        ("numpy.ravel", "RemoteArray.ravel", "RemoteArray.flatten"),
        (A,),
        lambda a: np.ravel(a) + a.ravel() + a.flatten(),
    ),
    (
        ("numpy.transpose", "RemoteArray.transpose", "RemoteArray.T"),
        (T3,),
        lambda t: np.transpose(t, (2, 0, 1)) + t.transpose(2, 0, 1) + t.T.transpose((0, 2, 1)),
    ),
    (
        ("numpy.swapaxes", "RemoteArray.swapaxes", "RemoteArray.mT"),
        (T3,),
        lambda t: np.swapaxes(t, 1, 2) + t.swapaxes(-1, -2) + t.mT,
    ),
    (
        ("numpy.expand_dims", "numpy.squeeze", "RemoteArray.squeeze"),
        (A,),
        lambda a: np.squeeze(np.expand_dims(a, 1)) + np.expand_dims(a, 0).squeeze(),
    ),
    (("numpy.concatenate",), (A, I32), lambda a, i: np.concatenate([a[:3], i], axis=1)),
    (("numpy.concatenate",), (A,), lambda a: np.concatenate([a, a], axis=None)),
    (("numpy.stack",), (A, P), lambda a, p: np.stack([a[:3, :4], p], axis=1)),
    (
        ("RemoteArray.astype", "numpy.astype"),
        (A,),
        lambda a: a.astype(np.int32) + np.astype(a, np.float64),
    ),
    (("RemoteArray.copy",), (A,), lambda a: a.copy()),
    # Sorting.
    (("numpy.sort",), (A,), lambda a: np.sort(a, axis=0)),
    (("numpy.sort",), (I32,), lambda a: np.sort(a, axis=None)),
    # Linear algebra.
    (("numpy.linalg.svd",), (A,), lambda a: np.linalg.svd(a)[1]),
    (
        ("numpy.linalg.svd",),
        (B,),
        lambda b: (lambda u, s, vh: (u * s) @ vh)(*np.linalg.svd(b, full_matrices=False)),
    ),
    (("numpy.linalg.svd",), (I32,), lambda a: np.linalg.svd(a, compute_uv=False)),
    (("numpy.linalg.solve",), (S, A), lambda s, a: np.linalg.solve(s, a)),
    (("numpy.linalg.solve",), (S,), lambda s: np.linalg.solve(s, s[0])),
    (("numpy.linalg.inv", "numpy.linalg.det"), (S,), lambda s: np.linalg.inv(s) * np.linalg.det(s)),
    (("numpy.linalg.norm",), (A,), lambda a: np.linalg.norm(a)),
    (("numpy.linalg.norm",), (A,), lambda a: np.linalg.norm(a, axis=1, keepdims=True)),
    (("numpy.linalg.norm",), (A,), lambda a: np.linalg.norm(a, ord=1, axis=0)),
    (("numpy.linalg.norm",), (B,), lambda b: np.linalg.norm(b, ord="fro", axis=(0, 1))),
    (("numpy.linalg.norm",), (I32,), lambda a: np.linalg.norm(a, axis=0)),  # int: float64
    # Fourier transforms.
    (("numpy.fft.rfft",), (V,), lambda v: np.fft.rfft(v)),  # float32: complex64
    (("numpy.fft.rfft",), (I64,), lambda v: np.fft.rfft(v, n=8)),  # int: complex128
    (("numpy.fft.irfft",), (V,), lambda v: np.fft.irfft(np.fft.rfft(v))),
    (("numpy.fft.irfft",), (A,), lambda a: np.fft.irfft(np.fft.rfft(a, axis=0), n=4, axis=0)),
    (
        ("numpy.fft.fft", "numpy.fft.ifft"),
        (C64,),
        lambda c: np.fft.ifft(np.fft.fft(c, axis=0) * 2, axis=0),
    ),
    # Indexing, and facts known on the client.
    (
        (
            "numpy.shape",
            "numpy.ndim",
            "numpy.size",
            "RemoteArray.shape",
            "RemoteArray.ndim",
            "RemoteArray.size",
            "RemoteArray.dtype",
            "RemoteArray.nbytes",
            "numpy.result_type",
        ),
        (T3,),
        lambda t: (
            t
            * (
                np.size(t)
                + np.ndim(t)
                + np.shape(t)[0]
                + t.size
                + t.ndim
                + t.shape[1]
                + t.nbytes
                + (np.result_type(t, 1.0) == t.dtype)
            )
        ),
    ),
]


def _both(fn: Fn, inputs: tuple[np.ndarray, ...], client: Client) -> tuple[Any, Any]:
    with np.errstate(all="ignore"):
        expected = fn(*inputs)
    remote = fn(*(ta.asarray(client, x) for x in inputs))
    return expected, remote


def assert_like_numpy(got: np.ndarray, expected: Any, where: str = "") -> None:
    """dtype and shape exactly NumPy's, values within the tolerance of the dtype."""
    expected = np.asarray(expected)
    assert got.dtype == expected.dtype, f"{where}: dtype {got.dtype} != NumPy's {expected.dtype}"
    assert got.shape == expected.shape, f"{where}: shape {got.shape} != NumPy's {expected.shape}"
    if expected.dtype.kind in "fc":
        rtol = {2: 2e-2, 4: 2e-4, 8: 1e-4, 16: 1e-9}.get(expected.dtype.itemsize, 1e-9)
        if expected.dtype == np.float64:
            rtol = 1e-9
        scale = float(np.max(np.abs(expected), initial=1.0))
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale, err_msg=where)
    else:
        np.testing.assert_array_equal(got, expected, err_msg=where)


@pytest.mark.parametrize(("covers", "inputs", "fn"), CASES, ids=[c[0][0] for c in CASES])
def test_same_numpy_code_gives_numpys_dtype_and_values(
    client: Client, covers: tuple[str, ...], inputs: tuple[np.ndarray, ...], fn: Fn
) -> None:
    expected, remote = _both(fn, inputs, client)
    assert isinstance(remote, ta.RemoteArray), type(remote)
    assert remote.dtype == np.asarray(expected).dtype  # known before anything runs
    assert remote.shape == np.shape(expected)
    assert_like_numpy(np.asarray(remote), expected, covers[0])


def test_every_supported_name_has_a_case() -> None:
    covered = {name for covers, _, _ in CASES for name in covers}
    assert sorted(set(ta.supported()) - covered) == []
    assert sorted(covered - set(ta.supported())) == []


def test_basic_indexing_and_slicing_like_numpy(client: Client) -> None:
    t = ta.asarray(client, T3)
    keys: list[Any] = [
        0,
        -1,
        (1, 2),
        (slice(None), 1),
        (Ellipsis, 0),
        (None, 0, slice(None, None, -1)),
        (slice(1, None), slice(None, None, 2), -2),
        (slice(None, None, -2), Ellipsis, None),
        (0, slice(5, 0, -2)),
        slice(3, 1),
        (1, 2, 3),
    ]
    got = ta.compute(*(t[k] for k in keys))
    for key, value in zip(keys, got, strict=True):
        assert_like_numpy(value, T3[key], f"[{key}]")


def test_the_array_api_namespace(client: Client) -> None:
    a = ta.asarray(client, A)
    xp = a.__array_namespace__()
    expected = np.concatenate([np.transpose(A), np.sqrt(np.abs(A)).T], axis=0)
    remote = xp.concat([xp.permute_dims(a, (1, 0)), xp.sqrt(xp.abs(a)).T], axis=0)
    assert_like_numpy(np.asarray(remote), expected)
    assert_like_numpy(np.asarray(xp.std(a, correction=1)), np.std(A, ddof=1))
    assert_like_numpy(np.asarray(xp.linalg.svd(a)[1]), np.linalg.svd(A)[1])
