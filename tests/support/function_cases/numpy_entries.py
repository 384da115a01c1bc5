"""Example invocations of the Call allowlist: the numpy.* entries remote arrays use,
with reference implementations written independently of the server's (through NumPy
where NumPy defines the meaning)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from support.function_cases.arrays import Case

_rng = np.random.default_rng(36)  # its own generator: the other families' draws stay put


def _index(input: torch.Tensor, items: list[Any]) -> torch.Tensor:
    key = tuple(Ellipsis if i == "..." else slice(*i) if isinstance(i, list) else i for i in items)
    return torch.from_numpy(np.ascontiguousarray(input.numpy()[key]))


def _apply(function: str, *args: Any, casts: Any = None, results: Any = None) -> Any:
    if casts is not None:
        args = tuple(
            a.to(getattr(torch, c)) if c is not None and isinstance(a, torch.Tensor) else a
            for a, c in zip(args, casts, strict=True)
        )
    fn: Any = torch
    for part in function.split("."):
        fn = getattr(fn, part)
    out = fn(*args)
    if isinstance(results, list):
        return tuple(o.to(getattr(torch, r)) for o, r in zip(out, results, strict=False))
    return out.to(getattr(torch, results))


#: Entry name -> what it computes, for tests/engine/test_functions.py.
REFERENCES: dict[str, Callable[..., Any]] = {
    "numpy.cast": lambda x, dtype: x.to(
        dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)
    ),
    "numpy.index": _index,
    "numpy.apply": _apply,
}


def cases() -> list[Case]:
    """The cases, made when called."""
    x = _rng.standard_normal((4, 5, 6))
    n = _rng.integers(-9, 9, (3, 4))
    d = _rng.integers(1, 5, (3, 4))
    return [
        ("numpy.cast", (x, "float32"), {}),
        ("numpy.cast", (n, "float64"), {}),
        ("numpy.cast", (x,), {"dtype": "int64"}),  # by keyword
        ("numpy.index", (x, [1, [None, None, -2], None, "..."]), {}),
        ("numpy.index", (x, ["...", [4, 0, -1]]), {}),
        ("numpy.index", (x, [-1, [1, 3, None], 2]), {}),
        ("numpy.apply", ("div", n, d), {"casts": ["float64", "float64"], "results": "float64"}),
        ("numpy.apply", ("sum", n), {"casts": [None], "results": "int32"}),
        ("numpy.apply", ("max", x, 1), {"results": ["float32", "int64"]}),
        ("numpy.apply", ("sort", x[0, 0]), {"results": ["float32", "int32"]}),
    ]
