"""RemoteArray: a NumPy-like array whose data lives on the server and whose
operations build a graph, computed only when a value is asked for."""

from __future__ import annotations

import operator
from collections.abc import Generator, Iterator, Sequence
from typing import Any

import numpy as np

from tensorwire.arrays.dispatch import (
    FUNCTIONS,
    HOOKS,
    REDUCES,
    UFUNCS,
    UnsupportedError,
    public_name,
)
from tensorwire.arrays.execute import Context, run_async, run_sync
from tensorwire.arrays.graph import Node, Use
from tensorwire.wire.dtypes import NAME_OF_DTYPE

_UFUNC_OPTIONS_REFUSED = ("out", "where", "casting", "order", "subok", "signature", "dtype")


def dtype_name(dtype: np.dtype[Any]) -> str:
    """The wire's name for ``dtype``; UnsupportedError if it cannot live on the server."""
    name = NAME_OF_DTYPE.get(np.dtype(dtype).newbyteorder("="))
    if name is None:
        raise UnsupportedError(f"dtype {dtype} is not supported by remote arrays")
    return name


def standin(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """A read-only array of ``shape`` that takes no memory: views of it give NumPy's
    own result shapes and index errors without computing anything."""
    return np.broadcast_to(np.empty((), dtype=dtype), tuple(shape))


def probe(shape: Sequence[int], dtype: Any) -> np.ndarray:
    """A tiny array with ``shape``'s number of dimensions (all of size 1), for asking
    NumPy what dtype a function returns."""
    return np.ones((1,) * len(shape), dtype=dtype)


class RemoteArray:
    """An array held (or to be computed) on the server, used like a NumPy array.

    NumPy functions and operators on it build a graph; a value is computed, in one
    program, when asked for: ``np.asarray``, ``numpy()``, ``float()``, ``bool()``,
    ``int()``, printing, or ``await array`` from an AsyncClient."""

    __array_priority__ = 1000

    def __init__(self, ctx: Context, use: Use, dtype: Any, shape: Sequence[int]) -> None:
        self._ctx = ctx
        self._use = use
        self._dtype: np.dtype[Any] = np.dtype(dtype)
        self._shape = tuple(int(d) for d in shape)
        ctx.liveness.track(self)  # what it needs stays kept on the server while it lives

    # ------------------------------------------------------------------ attributes

    @property
    def shape(self) -> tuple[int, ...]:
        """The shape, known on the client."""
        return self._shape

    @property
    def dtype(self) -> np.dtype[Any]:
        """The NumPy dtype, known on the client."""
        return self._dtype

    @property
    def ndim(self) -> int:
        """The number of dimensions."""
        return len(self._shape)

    @property
    def size(self) -> int:
        """The number of elements."""
        return int(np.prod(self._shape, dtype=np.int64))

    @property
    def nbytes(self) -> int:
        """The bytes of its data."""
        return self.size * self._dtype.itemsize

    @property
    def T(self) -> Any:
        """The transpose (dimensions reversed)."""
        return np.transpose(self)

    @property
    def mT(self) -> Any:
        """The transpose of the last two dimensions."""
        return np.swapaxes(self, -1, -2)

    @property
    def round_trips(self) -> int:
        """Round trips its client's remote arrays have made so far."""
        return self._ctx.round_trips

    def describe(self) -> str:
        """What it is, without computing it."""
        return f"RemoteArray(shape={self._shape}, dtype={self._dtype})"

    def astype(self, dtype: Any, copy: bool = True) -> RemoteArray:
        """The array as ``dtype`` (NumPy's unsafe casting)."""
        dtype = np.dtype(dtype)
        if dtype == self._dtype and not copy:
            return self
        node = Node("numpy.cast", (self._use, dtype_name(dtype)))
        return RemoteArray(self._ctx, Use(node), dtype, self._shape)

    def __getitem__(self, key: Any) -> RemoteArray:
        items = key if isinstance(key, tuple) else (key,)
        spec: list[Any] = []
        for item in items:
            if item is None:
                spec.append(None)
            elif item is Ellipsis:
                spec.append("...")
            elif isinstance(item, slice):
                spec.append([_index_or_none(v) for v in (item.start, item.stop, item.step)])
            elif isinstance(item, int | np.integer) and not isinstance(item, bool | np.bool_):
                spec.append(int(item))
            else:
                raise UnsupportedError(
                    f"index {shown(item)}: remote arrays take basic indexing only (ints, slices, "
                    "None, ...); advanced (array or boolean) indexing is not supported"
                )
        shape = standin(self._shape, self._dtype)[key].shape  # NumPy's own checks
        node = Node("numpy.index", (self._use, spec))
        return RemoteArray(self._ctx, Use(node), self._dtype, shape)

    def __setitem__(self, key: Any, value: Any) -> None:
        raise UnsupportedError("remote arrays are immutable: build a new array instead")

    def __len__(self) -> int:
        if not self._shape:
            raise TypeError("len() of unsized object")
        return self._shape[0]

    def __iter__(self) -> Iterator[RemoteArray]:
        if not self._shape:
            raise TypeError("iteration over a 0-d array")
        return (self[i] for i in range(self._shape[0]))

    # ------------------------------------------------------------------ values

    def numpy(self) -> np.ndarray:
        """Compute the array (one round trip for the pending graph) and return it."""
        self._ctx.check_sync("numpy()")
        if self._use.index in self._use.node.values:
            return self._use.node.values[self._use.index]
        (value,), _ = run_sync(self._ctx, [self._use])
        return value

    async def fetch(self) -> np.ndarray:
        """``numpy()`` for an AsyncClient's array: ``await array.fetch()`` (or ``await array``)."""
        self._ctx.check_async("fetch()")
        if self._use.index in self._use.node.values:
            return self._use.node.values[self._use.index]
        (value,), _ = await run_async(self._ctx, [self._use])
        return value

    def __await__(self) -> Generator[Any, None, np.ndarray]:
        return self.fetch().__await__()

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        value = self.numpy()
        if dtype is not None and np.dtype(dtype) != value.dtype:
            return value.astype(dtype)
        return np.array(value) if copy else value

    def _scalar(self, what: str) -> np.ndarray:
        if self.size != 1:
            raise TypeError(f"only arrays of one element can be converted to {what}")
        return self.numpy().reshape(())

    def __bool__(self) -> bool:
        if self.size != 1:
            raise ValueError(
                "The truth value of an array with more than one element is ambiguous. "
                "Use a.any() or a.all()"
            )
        return bool(self._scalar("bool"))

    def __float__(self) -> float:
        return float(self._scalar("Python scalars"))

    def __int__(self) -> int:
        return int(self._scalar("Python scalars"))

    def __complex__(self) -> complex:
        return complex(self._scalar("Python scalars"))

    def __index__(self) -> int:
        if self.ndim or self._dtype.kind not in "iu":
            raise TypeError("only integer scalar arrays can be converted to a scalar index")
        return int(self._scalar("an index"))

    def __repr__(self) -> str:
        return repr(self.numpy()).replace("array(", "RemoteArray(", 1)

    def __str__(self) -> str:
        return str(self.numpy())

    def __format__(self, spec: str) -> str:
        return format(self.numpy(), spec) if self.ndim == 0 else str(self)

    # ------------------------------------------------------------------ NumPy protocols

    def __array_ufunc__(self, ufunc: Any, method: str, *inputs: Any, **kwargs: Any) -> Any:
        if method == "reduce" and ufunc in REDUCES:
            return REDUCES[ufunc](*inputs, **kwargs)
        if method != "__call__" or (ufunc not in UFUNCS and ufunc is not np.matmul):
            what = f"numpy.{ufunc.__name__}" + ("" if method == "__call__" else f".{method}")
            raise UnsupportedError(f"{what} is not supported on remote arrays")
        refused = [k for k in kwargs if k in _UFUNC_OPTIONS_REFUSED and kwargs[k] is not None]
        if refused:
            raise UnsupportedError(
                f"numpy.{ufunc.__name__}: argument {refused[0]!r} is not supported on remote arrays"
            )
        return HOOKS["ufunc"](ufunc, inputs)

    def __array_function__(
        self, func: Any, types: Sequence[type], args: Sequence[Any], kwargs: dict[str, Any]
    ) -> Any:
        impl = FUNCTIONS.get(func)
        if impl is None:
            raise UnsupportedError(
                f"{public_name(func)} is not supported on remote arrays (see "
                "tensorwire.arrays.supported()); np.asarray(x) brings an array back to "
                "compute locally"
            )
        return impl(*args, **kwargs)

    def __array_namespace__(self, *, api_version: str | None = None) -> Any:
        return HOOKS["namespace"]

    # ------------------------------------------------------------------ operators

    def __add__(self, other: Any) -> Any:
        return np.add(self, other)

    def __radd__(self, other: Any) -> Any:
        return np.add(other, self)

    def __sub__(self, other: Any) -> Any:
        return np.subtract(self, other)

    def __rsub__(self, other: Any) -> Any:
        return np.subtract(other, self)

    def __mul__(self, other: Any) -> Any:
        return np.multiply(self, other)

    def __rmul__(self, other: Any) -> Any:
        return np.multiply(other, self)

    def __truediv__(self, other: Any) -> Any:
        return np.true_divide(self, other)

    def __rtruediv__(self, other: Any) -> Any:
        return np.true_divide(other, self)

    def __floordiv__(self, other: Any) -> Any:
        return np.floor_divide(self, other)

    def __rfloordiv__(self, other: Any) -> Any:
        return np.floor_divide(other, self)

    def __mod__(self, other: Any) -> Any:
        return np.remainder(self, other)

    def __rmod__(self, other: Any) -> Any:
        return np.remainder(other, self)

    def __pow__(self, other: Any) -> Any:
        return np.power(self, other)

    def __rpow__(self, other: Any) -> Any:
        return np.power(other, self)

    def __matmul__(self, other: Any) -> Any:
        return np.matmul(self, other)

    def __rmatmul__(self, other: Any) -> Any:
        return np.matmul(other, self)

    def __lt__(self, other: Any) -> Any:
        return np.less(self, other)

    def __le__(self, other: Any) -> Any:
        return np.less_equal(self, other)

    def __gt__(self, other: Any) -> Any:
        return np.greater(self, other)

    def __ge__(self, other: Any) -> Any:
        return np.greater_equal(self, other)

    def __eq__(self, other: Any) -> Any:
        return np.equal(self, other)

    def __ne__(self, other: Any) -> Any:
        return np.not_equal(self, other)

    def __and__(self, other: Any) -> Any:
        return np.logical_and(self, other) if self._is_bool(other) else _no_bitwise("&")

    def __or__(self, other: Any) -> Any:
        return np.logical_or(self, other) if self._is_bool(other) else _no_bitwise("|")

    def __xor__(self, other: Any) -> Any:
        return np.logical_xor(self, other) if self._is_bool(other) else _no_bitwise("^")

    def __invert__(self) -> Any:
        return np.logical_not(self) if self._dtype == np.bool_ else _no_bitwise("~")

    def __neg__(self) -> Any:
        return np.negative(self)

    def __pos__(self) -> Any:
        return np.positive(self)

    def __abs__(self) -> Any:
        return np.absolute(self)

    __hash__ = None  # type: ignore[assignment]

    def _is_bool(self, other: Any) -> bool:
        other_dtype = np.dtype(bool) if isinstance(other, bool) else getattr(other, "dtype", None)
        return self._dtype == np.bool_ and other_dtype == np.bool_


def shown(value: Any) -> str:
    """``value`` for an error message: a remote array described, never computed."""
    return value.describe() if isinstance(value, RemoteArray) else repr(value)


def _no_bitwise(op: str) -> Any:
    raise UnsupportedError(f"operator {op} is supported on boolean remote arrays only")


def _index_or_none(value: Any) -> int | None:
    return None if value is None else operator.index(value)
