"""Property tests: over dtypes, shapes (broadcasting included), Python scalars and axes,
a remote array gives NumPy's dtype and shape exactly and NumPy's values within the
dtype's tolerance, or refuses what NumPy refuses."""

from __future__ import annotations

from typing import Any

import hypothesis.extra.numpy as hnp
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import tensorwire.arrays as ta
from tensorwire import Client

DTYPES = [
    np.bool_,
    np.int8,
    np.int16,
    np.int32,
    np.int64,
    np.uint8,
    np.float16,
    np.float32,
    np.float64,
]
BINARY = [
    np.add,
    np.subtract,
    np.multiply,
    np.true_divide,
    np.floor_divide,
    np.remainder,
    np.maximum,
    np.minimum,
    np.less,
    np.greater_equal,
    np.equal,
    np.arctan2,
]
UNARY = [
    np.negative,
    np.absolute,
    np.exp,
    np.sin,
    np.tanh,
    np.sqrt,
    np.log1p,
    np.square,
    np.floor,
    np.sign,
    np.isfinite,
]

PROPERTY = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def _elements(dtype: Any, positive: bool = False) -> st.SearchStrategy[Any]:
    dtype = np.dtype(dtype)
    if dtype.kind == "b":
        return st.just(True) if positive else st.booleans()
    if dtype.kind in "iu":
        low = 1 if positive else max(-20, int(np.iinfo(dtype).min))
        return st.integers(low, 20)
    low = 0.5 if positive else -20.0
    return st.floats(low, 20.0, width=8 * dtype.itemsize, allow_subnormal=False)


@st.composite
def operands(draw: st.DrawFn, nonzero_second: bool = False) -> tuple[Any, Any]:
    shapes = draw(
        hnp.mutually_broadcastable_shapes(num_shapes=2, min_dims=0, max_dims=3, max_side=4)
    ).input_shapes
    values = []
    for i, shape in enumerate(shapes):
        kind = draw(st.sampled_from(["array", "array", "scalar"]))
        positive = nonzero_second and i == 1
        if kind == "scalar":
            values.append(
                draw(
                    st.integers(1, 5)
                    if positive
                    else st.integers(-5, 5) | st.floats(0.5 if positive else -5.0, 5.0)
                )
            )
        else:
            dtype = draw(st.sampled_from(DTYPES))
            values.append(draw(hnp.arrays(dtype, shape, elements=_elements(dtype, positive))))
    if not any(isinstance(v, np.ndarray) for v in values):
        values[0] = np.asarray(values[0])
    return values[0], values[1]


def _remote(client: Client, value: Any) -> Any:
    return ta.asarray(client, value) if isinstance(value, np.ndarray) else value


def _compare(got: np.ndarray, expected: Any, scale: float) -> None:
    expected = np.asarray(expected)
    assert got.dtype == expected.dtype, (got.dtype, expected.dtype)
    assert got.shape == expected.shape
    if expected.dtype.kind == "f":
        rtol = {2: 2e-2, 4: 1e-4}.get(expected.dtype.itemsize, 1e-9)
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol * scale, equal_nan=True)
    else:
        np.testing.assert_array_equal(got, expected)


def _same(client: Client, fn: Any, *values: Any) -> None:
    try:
        with np.errstate(all="ignore"):
            expected = fn(*values)
    except (TypeError, OverflowError, ValueError) as refused:
        family = next(e for e in (OverflowError, TypeError, ValueError) if isinstance(refused, e))
        try:
            fn(*(_remote(client, v) for v in values))
        except family:
            return
        raise AssertionError(f"NumPy refuses ({refused}); the remote array did not") from None
    got = fn(*(_remote(client, v) for v in values))
    assert got.dtype == np.asarray(expected).dtype  # known on the client already
    scale = max(
        [1.0] + [float(np.max(np.abs(np.asarray(v, np.float64)), initial=0)) for v in values]
    )
    _compare(np.asarray(got), expected, scale)


@PROPERTY
@given(ufunc=st.sampled_from(BINARY), pair=operands(nonzero_second=True))
def test_binary_ufuncs_like_numpy(client: Client, ufunc: Any, pair: tuple[Any, Any]) -> None:
    _same(client, ufunc, *pair)


@PROPERTY
@given(op=st.sampled_from(["+", "-", "*", "/", "<", "==", "@"]), pair=operands())
def test_operators_like_numpy(client: Client, op: str, pair: tuple[Any, Any]) -> None:
    a, b = pair
    if op == "@" and (np.ndim(a) == 0 or np.ndim(b) == 0):
        return
    _same(client, lambda x, y: eval(f"x {op} y"), a, b)


@PROPERTY
@given(
    ufunc=st.sampled_from(UNARY),
    x=st.sampled_from(DTYPES).flatmap(
        lambda d: hnp.arrays(
            d,
            hnp.array_shapes(min_dims=0, max_dims=3, max_side=4),
            elements=_elements(d, positive=True),
        )
    ),
)
def test_unary_ufuncs_like_numpy(client: Client, ufunc: Any, x: np.ndarray) -> None:
    _same(client, ufunc, x)


@PROPERTY
@given(
    function=st.sampled_from([np.sum, np.mean, np.max, np.min, np.argmax, np.std, np.prod, np.any]),
    x=st.sampled_from(DTYPES).flatmap(
        lambda d: hnp.arrays(
            d, hnp.array_shapes(min_dims=1, max_dims=3, max_side=4), elements=_elements(d)
        )
    ),
    data=st.data(),
)
def test_reductions_like_numpy(client: Client, function: Any, x: np.ndarray, data: Any) -> None:
    axis = data.draw(st.none() | st.integers(-x.ndim, x.ndim - 1))
    keepdims = data.draw(st.booleans())
    if function is np.argmax and x.dtype == np.float16:
        x = x.astype(np.float32)  # ties in float16 make the index a coin toss
    if function is np.prod:
        x = np.clip(x, -2, 2).astype(x.dtype)  # keep products inside every dtype's range

    def reduce(a: Any) -> Any:
        return function(a, axis=axis, keepdims=keepdims)

    with np.errstate(all="ignore"):
        expected = reduce(x)
    got = reduce(ta.asarray(client, x))
    assert got.dtype == np.asarray(expected).dtype and got.shape == np.shape(expected)
    # Sums may be accumulated in another order (or precision) than NumPy's.
    _compare(np.asarray(got), expected, float(np.sum(np.abs(x.astype(np.float64)))) + 1)


@PROPERTY
@given(data=st.data())
def test_basic_indexing_like_numpy(client: Client, data: Any) -> None:
    shape = data.draw(hnp.array_shapes(min_dims=0, max_dims=4, min_side=0, max_side=5))
    x = np.arange(int(np.prod(shape)), dtype=np.int32).reshape(shape)
    key = data.draw(hnp.basic_indices(shape, allow_newaxis=True, allow_ellipsis=True))
    remote = ta.asarray(client, x)[key]
    assert remote.shape == x[key].shape
    _compare(np.asarray(remote), x[key], 1.0)


@PROPERTY
@given(
    shapes=hnp.mutually_broadcastable_shapes(
        signature=np.matmul.signature,
        max_dims=2,
        max_side=4,  # type: ignore[arg-type]
    ),
    dtypes=st.tuples(st.sampled_from(DTYPES[1:]), st.sampled_from(DTYPES[1:])),
)
def test_matmul_shapes_and_dtypes_like_numpy(
    client: Client, shapes: Any, dtypes: tuple[Any, Any]
) -> None:
    a_shape, b_shape = shapes.input_shapes
    rng = np.random.default_rng(0)
    a = rng.integers(-3, 4, a_shape).astype(dtypes[0])
    b = rng.integers(-3, 4, b_shape).astype(dtypes[1])
    _same(client, np.matmul, a, b)
