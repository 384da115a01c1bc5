"""Example invocations of the Call allowlist:
Distances and statistics, reductions, scans and differences."""

from __future__ import annotations

import numpy as np

from support.function_cases.arrays import Case, bools, ints, pos, randn, uniform, with_nans


def cases() -> list[Case]:
    """The cases, made when called: the arrays come from one shared generator, drawn in
    the order support.function_cases calls the families."""
    return [
        # Distances and statistics.
        ("cdist", (randn(4, 3), randn(5, 3)), {}),
        ("cdist", (randn(2, 4, 3), randn(2, 5, 3)), {"p": 1.0}),
        ("cosine_similarity", (randn(3, 4), randn(3, 4)), {}),
        ("cosine_similarity", (randn(3, 4), randn(3, 4)), {"dim": 0}),
        ("dist", (randn(3, 4), randn(3, 4)), {"p": 3}),
        ("cov", (randn(3, 10),), {}),
        ("cov", (randn(3, 10),), {"correction": 0, "aweights": pos(10)}),
        ("corrcoef", (randn(3, 10),), {}),
        # Reductions.
        ("sum", (randn(3, 4),), {}),
        ("sum", (randn(3, 4),), {"dim": 1, "keepdim": True}),
        ("sum", (randn(2, 3, 4), (0, 2)), {}),
        ("sum", (ints(-5, 5, 3, 4),), {"dtype": "float64"}),
        ("nansum", (with_nans(3, 4),), {}),
        ("prod", (uniform(0.5, 1.5, 3, 4), 1), {}),
        ("mean", (randn(3, 4),), {}),
        ("mean", (randn(3, 4),), {"dim": (0,)}),
        ("nanmean", (with_nans(3, 4),), {"dim": 1}),
        ("std", (randn(3, 4),), {"dim": 1, "correction": 0}),
        ("var", (randn(3, 4),), {}),
        ("std_mean", (randn(3, 4),), {"dim": 0}),
        ("var_mean", (randn(3, 4), 1), {}),
        ("amax", (randn(3, 4),), {"dim": (0, 1)}),
        ("amin", (randn(3, 4), 1), {}),
        ("aminmax", (randn(3, 4),), {"dim": 0}),
        ("max", (randn(3, 4),), {}),
        ("max", (randn(3, 4), 1), {}),
        ("max", (randn(3, 4), randn(3, 4)), {}),
        ("min", (randn(3, 4),), {}),
        ("min", (randn(3, 4),), {"dim": 0, "keepdim": True}),
        ("argmax", (randn(3, 4),), {}),
        ("argmax", (randn(3, 4),), {"dim": 1}),
        ("argmin", (randn(3, 4), 0), {}),
        ("logsumexp", (randn(3, 4), 1), {}),
        ("median", (randn(7),), {}),
        ("median", (randn(3, 5), 1), {}),
        ("nanmedian", (with_nans(3, 5),), {}),
        ("nanmedian", (with_nans(3, 5), 1), {}),
        ("quantile", (randn(10), 0.3), {}),
        ("quantile", (randn(3, 10), np.array([0.1, 0.5, 0.9])), {"dim": 1}),
        ("quantile", (randn(10), 0.25), {"interpolation": "midpoint"}),
        ("nanquantile", (with_nans(3, 5), 0.5), {"dim": 1}),
        ("mode", (np.array([[1, 2, 2, 3, 2], [0, 5, 4, 1, 5]]), 1), {}),
        ("kthvalue", (randn(3, 6), 2, 1), {}),
        ("all", (bools(3, 4),), {}),
        ("all", (bools(3, 4), 1), {}),
        ("any", (bools(3, 4),), {"dim": 0}),
        ("count_nonzero", (ints(0, 2, 3, 4),), {"dim": 1}),
        # Scans and differences.
        ("cumsum", (randn(3, 4), 1), {}),
        ("cumsum", (ints(-5, 5, 3, 4),), {"dim": 0, "dtype": "float64"}),
        ("cumprod", (uniform(0.5, 1.5, 3, 4), 0), {}),
        ("cummax", (randn(3, 5), 1), {}),
        ("cummin", (randn(3, 5),), {"dim": 0}),
        ("logcumsumexp", (randn(3, 5), 1), {}),
        ("diff", (randn(3, 5),), {"n": 2, "dim": 1}),
        ("trapezoid", (randn(10),), {"dx": 0.5}),
        ("trapezoid", (randn(10), np.sort(randn(10))), {}),
        ("cumulative_trapezoid", (randn(3, 10),), {}),
    ]
