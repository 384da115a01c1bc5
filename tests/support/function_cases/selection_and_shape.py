"""Example invocations of the Call allowlist:
Sorting, searching and selection, shape and layout."""

from __future__ import annotations

import numpy as np

from support.function_cases.arrays import Case, bools, ints, randn


def cases() -> list[Case]:
    """The cases, made when called: the arrays come from one shared generator, drawn in
    the order support.function_cases calls the families."""
    return [
        # Sorting, searching and selection.
        ("sort", (randn(3, 5),), {"dim": 1, "descending": True}),
        ("sort", (ints(0, 4, 12),), {"stable": True}),
        ("argsort", (randn(3, 5),), {"dim": 0}),
        ("topk", (randn(3, 6), 2), {}),
        ("topk", (randn(10), 3), {"largest": False}),
        ("unique", (ints(0, 5, 20),), {}),
        ("unique", (ints(0, 5, 20),), {"return_inverse": True, "return_counts": True}),
        ("nonzero", (ints(0, 2, 3, 4),), {}),
        ("nonzero", (ints(0, 2, 3, 4),), {"as_tuple": True}),
        ("argwhere", (ints(0, 2, 3, 4),), {}),
        ("searchsorted", (np.sort(randn(10)), randn(5)), {}),
        ("searchsorted", (np.sort(randn(10)), randn(2, 3)), {"right": True}),
        ("bucketize", (randn(6), np.sort(randn(4))), {}),
        ("histc", (randn(100),), {"bins": 10, "min": -3.0, "max": 3.0}),
        ("bincount", (ints(0, 6, 30),), {}),
        ("bincount", (ints(0, 6, 30),), {"weights": randn(30), "minlength": 8}),
        ("masked_select", (randn(3, 4), bools(3, 4)), {}),
        ("gather", (randn(3, 4), 1, ints(0, 4, 3, 2)), {}),
        ("index_select", (randn(4, 3), 0, ints(0, 4, 5)), {}),
        ("where", (bools(3, 4), randn(3, 4), randn(3, 4)), {}),
        ("where", (bools(3, 4), randn(3, 4), 0.0), {}),
        ("where", (bools(3, 4),), {}),
        # Shape and layout.
        ("cat", ([randn(2, 3), randn(4, 3)],), {}),
        ("cat", ([randn(2, 3), randn(2, 1)], 1), {}),
        ("stack", ([randn(2, 3), randn(2, 3)],), {"dim": 1}),
        ("hstack", ([randn(2, 3), randn(2, 1)],), {}),
        ("vstack", ([randn(2, 3), randn(1, 3)],), {}),
        ("transpose", (randn(2, 3, 4), 0, 2), {}),
        ("permute", (randn(2, 3, 4), (2, 0, 1)), {}),
        ("movedim", (randn(2, 3, 4), 0, -1), {}),
        ("reshape", (randn(2, 3, 4), (4, -1)), {}),
        ("flatten", (randn(2, 3, 4),), {"start_dim": 1}),
        ("squeeze", (randn(2, 1, 3),), {}),
        ("squeeze", (randn(2, 1, 3), 1), {}),
        ("unsqueeze", (randn(2, 3), 1), {}),
        ("flip", (randn(2, 3), (0, 1)), {}),
        ("roll", (randn(2, 5), 2, 1), {}),
        ("roll", (randn(2, 5), (1, -1), (0, 1)), {}),
        ("narrow", (randn(4, 5), 1, 1, 3), {}),
    ]
