"""Result shapes computed on the client, by NumPy's rules, without any data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.lib.array_utils import normalize_axis_index, normalize_axis_tuple

Shape = tuple[int, ...]


def axes(axis: Any, ndim: int) -> tuple[int, ...]:
    """The dimensions ``axis`` names (all for None), normalized and checked."""
    if axis is None:
        return tuple(range(ndim))
    return tuple(normalize_axis_tuple(axis, ndim))


def axis_index(axis: int, ndim: int) -> int:
    """One axis, normalized and checked."""
    return int(normalize_axis_index(axis, ndim))


def reduced(shape: Shape, dims: Sequence[int], keepdims: bool) -> Shape:
    """``shape`` after reducing ``dims``."""
    if keepdims:
        return tuple(1 if i in dims else d for i, d in enumerate(shape))
    return tuple(d for i, d in enumerate(shape) if i not in dims)


def matmul_shape(a: Shape, b: Shape) -> Shape:
    """The shape of ``a @ b`` (1-D operands promoted and their dimension removed)."""
    if not a or not b:
        raise ValueError("matmul: input operand does not have enough dimensions")
    a2 = (1, *a) if len(a) == 1 else a
    b2 = (*b, 1) if len(b) == 1 else b
    if a2[-1] != b2[-2]:
        raise ValueError(
            f"matmul: Input operand 1 has a mismatch in its core dimension 0 "
            f"(size {b2[-2]} is different from {a2[-1]})"
        )
    batch = np.broadcast_shapes(a2[:-2], b2[:-2])
    core = (a2[-2] if len(a) > 1 else None, b2[-1] if len(b) > 1 else None)
    return (*batch, *(d for d in core if d is not None))


def reshaped(shape: Shape, new: Any) -> Shape:
    """NumPy's reshape of ``shape`` to ``new`` (one -1 inferred)."""
    new = (new,) if isinstance(new, int | np.integer) else tuple(int(d) for d in new)
    size = int(np.prod(shape, dtype=np.int64))
    unknown = [i for i, d in enumerate(new) if d == -1]
    known = int(np.prod([d for d in new if d != -1], dtype=np.int64))
    if len(unknown) > 1 or any(d < -1 for d in new):
        raise ValueError(f"cannot reshape array of size {size} into shape {new}")
    if unknown:
        if known == 0 or size % known:
            raise ValueError(f"cannot reshape array of size {size} into shape {new}")
        new = tuple(size // known if d == -1 else d for d in new)
    if int(np.prod(new, dtype=np.int64)) != size:
        raise ValueError(f"cannot reshape array of size {size} into shape {new}")
    return tuple(new)


def einsum_shape(subscripts: str, shapes: Sequence[Shape]) -> Shape:
    """The shape of ``einsum(subscripts, ...)`` on operands of ``shapes``."""
    if "." in subscripts:
        raise ValueError("einsum on remote arrays: '...' in subscripts is not supported")
    spec = subscripts.replace(" ", "")
    inputs, arrow, output = spec.partition("->")
    terms = inputs.split(",")
    if len(terms) != len(shapes):
        raise ValueError(f"einsum: {len(terms)} terms in subscripts, {len(shapes)} operands")
    sizes: dict[str, int] = {}
    for term, shape in zip(terms, shapes, strict=True):
        if len(term) != len(shape):
            raise ValueError(f"einsum: term {term!r} for an operand of {len(shape)} dimensions")
        for letter, size in zip(term, shape, strict=True):
            if not letter.isalpha():
                raise ValueError(f"einsum: invalid subscript {letter!r}")
            known = sizes.setdefault(letter, size)
            if known != size and 1 not in (known, size):
                raise ValueError(f"einsum: dimension {letter!r} has sizes {known} and {size}")
            sizes[letter] = max(known, size)
    if not arrow:
        counts = {c: inputs.count(c) for c in sizes}
        output = "".join(sorted(c for c, n in counts.items() if n == 1))
    for letter in output:
        if letter not in sizes:
            raise ValueError(f"einsum: output subscript {letter!r} is in no input")
    return tuple(sizes[c] for c in output)
