"""The allowlist's ``numpy.*`` entries: what remote NumPy arrays (the client's
``tensorwire.arrays``) need beyond torch's own functions, with NumPy's meaning.

- ``numpy.cast``: ``astype``, to a dtype given by name;
- ``numpy.index``: NumPy's basic indexing (integers, slices with any step, None,
  one Ellipsis), from a plain list that names no code;
- ``numpy.apply``: an allowlisted torch function with its tensor arguments cast to
  NumPy's computation dtype first and its results cast to NumPy's result dtype after,
  so that one program step gives exactly NumPy's dtype.

Every argument is validated here, with ValueError, TypeError or IndexError naming what
was wrong (the engine reports them as INVALID_ARGUMENT).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import torch

from tensorwire.wire.dtypes import WIRE_BY_NAME

#: Dtypes the entries cast to, by the names NumPy and the wire use (the wire's table).
DTYPES: Final[Mapping[str, torch.dtype]] = {name: getattr(torch, name) for name in WIRE_BY_NAME}
#: The most items an index may have (NumPy allows at most 64 dimensions).
MAX_INDEX_ITEMS: Final = 64
#: The most outputs ``numpy.apply`` casts.
MAX_RESULTS: Final = 8


def torch_dtype(name: Any, what: str) -> torch.dtype:
    """The torch dtype a NumPy dtype name names; ValueError if it is not one. A torch
    dtype among them passes as it is: the engine turns a ``dtype=`` keyword's name into
    one before the entry sees it."""
    if isinstance(name, torch.dtype) and name in DTYPES.values():
        return name
    if not isinstance(name, str) or name not in DTYPES:
        raise ValueError(f"{what}: {name!r} is not a dtype name; one of {', '.join(DTYPES)}")
    return DTYPES[name]


def cast(input: torch.Tensor, dtype: str) -> torch.Tensor:
    """``input`` as ``dtype`` (NumPy's ``astype`` with unsafe casting)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError("numpy.cast: input must be a tensor")
    return input.to(torch_dtype(dtype, "numpy.cast: dtype"))


def _index_item(item: Any, position: int) -> Any:
    """One item of an index as the wire carries it, checked: an int, None, "..." or a
    [start, stop, step] list of ints or None."""
    where = f"numpy.index: item {position}"
    if item is None or (isinstance(item, int) and not isinstance(item, bool)):
        return item
    if item == "...":
        return Ellipsis
    if isinstance(item, list) and len(item) == 3:
        if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in item):
            raise TypeError(f"{where}: a slice is [start, stop, step] of ints or None")
        if item[2] == 0:
            raise ValueError(f"{where}: slice step cannot be zero")
        return slice(*item)
    raise TypeError(f"{where}: an index item is an int, None, '...' or [start, stop, step]")


def index(input: torch.Tensor, items: list[Any]) -> torch.Tensor:
    """``input[items]`` with NumPy's basic-indexing meaning (negative steps too)."""
    if not isinstance(input, torch.Tensor):
        raise TypeError("numpy.index: input must be a tensor")
    if not isinstance(items, list) or len(items) > MAX_INDEX_ITEMS:
        raise TypeError(f"numpy.index: the index is a list of at most {MAX_INDEX_ITEMS} items")
    checked = [_index_item(item, i) for i, item in enumerate(items)]
    ellipses = sum(1 for item in checked if item is Ellipsis)
    if ellipses > 1:
        raise IndexError("numpy.index: an index can only have a single ellipsis")
    consumed = sum(1 for item in checked if item is not None and item is not Ellipsis)
    if consumed > input.dim():
        raise IndexError(
            f"numpy.index: too many indices: the array is {input.dim()}-dimensional, "
            f"but {consumed} were indexed"
        )
    fill = [slice(None)] * (input.dim() - consumed)
    if ellipses:
        at = next(i for i, item in enumerate(checked) if item is Ellipsis)
        checked[at : at + 1] = fill
    else:
        checked += fill
    out: list[Any] = []
    flips: list[int] = []
    dim = out_dim = 0
    for item in checked:
        if item is None:
            out.append(None)
            out_dim += 1
            continue
        size = input.shape[dim]
        if isinstance(item, int):
            if not -size <= item < size:
                raise IndexError(
                    f"numpy.index: index {item} is out of bounds for axis {dim} with size {size}"
                )
            out.append(item)
        else:
            span = range(*item.indices(size))
            if span.step > 0:
                out.append(slice(span.start, span.stop, span.step))
            elif not span:
                out.append(slice(0, 0))
            else:  # torch slices step forward only: take the same elements, then flip
                out.append(slice(span[-1], span[0] + 1, -span.step))
                flips.append(out_dim)
            out_dim += 1
        dim += 1
    result = input[tuple(out)]
    return torch.flip(result, flips) if flips else result


def _cast_argument(value: Any, dtype: torch.dtype | None) -> Any:
    if dtype is None:
        return value
    if isinstance(value, torch.Tensor):
        return value.to(dtype)
    if isinstance(value, list):
        return [_cast_argument(v, dtype) for v in value]
    return value  # Python scalars stay weak, as NumPy treats them


def make_apply(functions: Mapping[str, Callable[..., Any]]) -> Callable[..., Any]:
    """``numpy.apply`` over ``functions`` (the rest of the allowlist)."""

    def apply(
        function: str,
        *args: Any,
        casts: list[Any] | None = None,
        results: Any = None,
        **kwargs: Any,
    ) -> Any:
        """``function(*args, **kwargs)`` with args cast to ``casts`` (a dtype name or
        None per positional argument) and the result(s) cast to ``results`` (a dtype
        name, or a list of them for a tuple result)."""
        if not isinstance(function, str) or function not in functions:
            raise ValueError(f"numpy.apply: {function!r} is not an allowlisted function")
        if casts is not None:
            if not isinstance(casts, list) or len(casts) != len(args):
                raise ValueError("numpy.apply: casts has one entry (a dtype name or None) per arg")
            args = tuple(
                _cast_argument(a, None if c is None else torch_dtype(c, "numpy.apply: casts"))
                for a, c in zip(args, casts, strict=True)
            )
        result = functions[function](*args, **kwargs)
        if results is None:
            return result
        if isinstance(results, list):
            if len(results) > MAX_RESULTS or not isinstance(result, tuple | list):
                raise ValueError(f"numpy.apply: {function} does not return {len(results)} results")
            if len(results) > len(result):
                raise ValueError(f"numpy.apply: {function} returned {len(result)} results")
            return tuple(
                r if d is None else torch.as_tensor(r).to(torch_dtype(d, "numpy.apply: results"))
                for r, d in zip(result, results, strict=False)
            )
        return torch.as_tensor(result).to(torch_dtype(results, "numpy.apply: results"))

    return apply


#: (wire name, description) of the entries above, for the allowlist.
DESCRIPTIONS: Final[tuple[tuple[str, str], ...]] = (
    ("numpy.cast", "A tensor as another dtype, given by NumPy name (NumPy's astype)."),
    ("numpy.index", "NumPy basic indexing: ints, [start, stop, step] slices, None, '...'."),
    ("numpy.apply", "An allowlisted function with arguments and results cast to given dtypes."),
)
