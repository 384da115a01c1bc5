"""Example invocations of the Call allowlist:
Matrix and tensor products and linear algebra."""

from __future__ import annotations

import numpy as np

from support.function_cases.arrays import Case, complexes, randn, spd, sym, well


def cases() -> list[Case]:
    """The cases, made when called: the arrays come from one shared generator, drawn in
    the order support.function_cases calls the families."""
    return [
        # Matrix and tensor products.
        ("matmul", (randn(3, 4), randn(4, 5)), {}),
        ("matmul", (randn(2, 3, 4), randn(4)), {}),
        ("mm", (randn(3, 4), randn(4, 2)), {}),
        ("bmm", (randn(2, 3, 4), randn(2, 4, 5)), {}),
        ("mv", (randn(3, 4), randn(4)), {}),
        ("dot", (randn(5), randn(5)), {}),
        ("vdot", (complexes(5), complexes(5)), {}),
        ("inner", (randn(2, 3), randn(4, 3)), {}),
        ("outer", (randn(3), randn(4)), {}),
        ("kron", (randn(2, 3), randn(3, 2)), {}),
        ("einsum", ("bij,bjk->bik", randn(2, 3, 4), randn(2, 4, 5)), {}),
        ("einsum", ("ii->i", randn(4, 4)), {}),
        ("tensordot", (randn(3, 4, 5), randn(4, 5, 6)), {"dims": 2}),
        ("tensordot", (randn(3, 4), randn(3, 5)), {"dims": ([0], [0])}),
        ("addmm", (randn(3, 5), randn(3, 4), randn(4, 5)), {"beta": 0.5, "alpha": 2.0}),
        ("baddbmm", (randn(2, 3, 5), randn(2, 3, 4), randn(2, 4, 5)), {}),
        ("linalg.multi_dot", ([randn(3, 4), randn(4, 5), randn(5, 2)],), {}),
        ("linalg.vecdot", (randn(3, 4), randn(3, 4)), {"dim": -1}),
        ("linalg.cross", (randn(4, 3), randn(4, 3)), {}),
        # Linear algebra.
        ("linalg.solve", (well(4), randn(4, 2)), {}),
        ("linalg.solve", (well(3, 2), randn(2, 3, 1)), {}),
        ("linalg.solve_triangular", (np.triu(well(4)), randn(4, 2)), {"upper": True}),
        ("linalg.lstsq", (randn(6, 3), randn(6, 2)), {}),
        ("linalg.inv", (well(4),), {}),
        ("linalg.pinv", (randn(5, 3),), {}),
        ("linalg.det", (well(4),), {}),
        ("linalg.slogdet", (well(4),), {}),
        ("linalg.svd", (randn(5, 3),), {}),
        ("linalg.svd", (randn(3, 5),), {"full_matrices": False}),
        ("linalg.svdvals", (randn(5, 3),), {}),
        ("linalg.eigh", (sym(4),), {}),
        ("linalg.eigvalsh", (sym(4),), {"UPLO": "U"}),
        ("linalg.eig", (well(4),), {}),
        ("linalg.eigvals", (well(4),), {}),
        ("linalg.qr", (randn(5, 3),), {}),
        ("linalg.cholesky", (spd(4),), {}),
        ("linalg.lu", (well(4),), {}),
        ("linalg.lu_factor", (well(4),), {}),
        ("linalg.norm", (randn(3, 4),), {}),
        ("linalg.norm", (randn(3, 4),), {"ord": "nuc"}),
        ("linalg.norm", (randn(5),), {"ord": 3}),
        ("linalg.vector_norm", (randn(3, 4),), {"ord": 1, "dim": 1}),
        ("linalg.matrix_norm", (randn(2, 3, 4),), {"ord": "fro"}),
        ("linalg.matrix_norm", (randn(3, 4),), {"ord": 2}),
        ("linalg.cond", (well(4),), {}),
        ("linalg.matrix_rank", (randn(5, 3) @ randn(3, 4),), {}),
        ("linalg.matrix_exp", (0.5 * randn(3, 3),), {}),
        ("linalg.matrix_power", (well(3) / 3, 3), {}),
        ("linalg.matrix_power", (well(3), -2), {}),
        ("trace", (randn(4, 4),), {}),
        ("diag", (randn(4),), {}),
        ("diag", (randn(3, 4),), {"diagonal": 1}),
        ("diagonal", (randn(2, 3, 4),), {"dim1": 1, "dim2": 2}),
        ("diag_embed", (randn(2, 3),), {}),
        ("block_diag", (randn(2, 2), randn(1, 3)), {}),
        ("tril", (randn(4, 4),), {}),
        ("tril", (randn(4, 4), -1), {}),
        ("triu", (randn(4, 4),), {"diagonal": 1}),
    ]
