"""The Call allowlist: every entry resolves, is documented, is safe, and computes what torch
computes, both called directly and, through the ``client`` fixture, over gRPC."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from typing import Any

import numpy as np
import pytest
import torch

from tensorwire_server.functions import FUNCTIONS, Function

Case = tuple[str, tuple[Any, ...], dict[str, Any]]

_rng = np.random.default_rng(0)


def _randn(*shape: int) -> np.ndarray:
    return _rng.standard_normal(shape)


def _uniform(low: float, high: float, *shape: int) -> np.ndarray:
    return _rng.uniform(low, high, shape)


def _pos(*shape: int) -> np.ndarray:
    """Positive, away from zero: safe for log, sqrt, division."""
    return _uniform(0.5, 2.0, *shape)


def _unit(*shape: int) -> np.ndarray:
    """Inside (-1, 1): safe for asin, acos, atanh, erfinv."""
    return _uniform(-0.9, 0.9, *shape)


def _ints(low: int, high: int, *shape: int) -> np.ndarray:
    return _rng.integers(low, high, shape, dtype=np.int64)


def _bools(*shape: int) -> np.ndarray:
    return _rng.random(shape) < 0.5


def _complex(*shape: int) -> np.ndarray:
    return _randn(*shape) + 1j * _randn(*shape)


def _well(n: int, *batch: int) -> np.ndarray:
    """A well-conditioned square matrix (or batch of them)."""
    return _randn(*batch, n, n) + n * np.eye(n)


def _spd(n: int) -> np.ndarray:
    """A symmetric positive-definite matrix."""
    a = _randn(n, n)
    return a @ a.T + n * np.eye(n)


def _sym(n: int) -> np.ndarray:
    """A symmetric matrix with distinct eigenvalues."""
    a = _randn(n, n)
    return (a + a.T) / 2


def _with_nans(*shape: int) -> np.ndarray:
    x = _randn(*shape)
    x.reshape(-1)[[1, 7]] = np.nan
    return x


def _probs(*shape: int) -> np.ndarray:
    e = np.exp(_randn(*shape))
    return e / e.sum(axis=-1, keepdims=True)


def _specials() -> np.ndarray:
    return np.array([1.0, -np.inf, 2.5, np.nan, np.inf, -0.0, 1e300])


# Example invocations: (name, args, kwargs). Arrays are float64 (complex128) wherever the
# function allows so that comparisons are tight; tuples travel as lists; a "dtype" keyword is
# given by name. Every registry entry has at least one case (test_every_function_has_a_case).
CASES: list[Case] = [
    # Matrix and tensor products.
    ("matmul", (_randn(3, 4), _randn(4, 5)), {}),
    ("matmul", (_randn(2, 3, 4), _randn(4)), {}),
    ("mm", (_randn(3, 4), _randn(4, 2)), {}),
    ("bmm", (_randn(2, 3, 4), _randn(2, 4, 5)), {}),
    ("mv", (_randn(3, 4), _randn(4)), {}),
    ("dot", (_randn(5), _randn(5)), {}),
    ("vdot", (_complex(5), _complex(5)), {}),
    ("inner", (_randn(2, 3), _randn(4, 3)), {}),
    ("outer", (_randn(3), _randn(4)), {}),
    ("kron", (_randn(2, 3), _randn(3, 2)), {}),
    ("einsum", ("bij,bjk->bik", _randn(2, 3, 4), _randn(2, 4, 5)), {}),
    ("einsum", ("ii->i", _randn(4, 4)), {}),
    ("tensordot", (_randn(3, 4, 5), _randn(4, 5, 6)), {"dims": 2}),
    ("tensordot", (_randn(3, 4), _randn(3, 5)), {"dims": ([0], [0])}),
    ("addmm", (_randn(3, 5), _randn(3, 4), _randn(4, 5)), {"beta": 0.5, "alpha": 2.0}),
    ("baddbmm", (_randn(2, 3, 5), _randn(2, 3, 4), _randn(2, 4, 5)), {}),
    ("linalg.multi_dot", ([_randn(3, 4), _randn(4, 5), _randn(5, 2)],), {}),
    ("linalg.vecdot", (_randn(3, 4), _randn(3, 4)), {"dim": -1}),
    ("linalg.cross", (_randn(4, 3), _randn(4, 3)), {}),
    # Linear algebra.
    ("linalg.solve", (_well(4), _randn(4, 2)), {}),
    ("linalg.solve", (_well(3, 2), _randn(2, 3, 1)), {}),
    ("linalg.solve_triangular", (np.triu(_well(4)), _randn(4, 2)), {"upper": True}),
    ("linalg.lstsq", (_randn(6, 3), _randn(6, 2)), {}),
    ("linalg.inv", (_well(4),), {}),
    ("linalg.pinv", (_randn(5, 3),), {}),
    ("linalg.det", (_well(4),), {}),
    ("linalg.slogdet", (_well(4),), {}),
    ("linalg.svd", (_randn(5, 3),), {}),
    ("linalg.svd", (_randn(3, 5),), {"full_matrices": False}),
    ("linalg.svdvals", (_randn(5, 3),), {}),
    ("linalg.eigh", (_sym(4),), {}),
    ("linalg.eigvalsh", (_sym(4),), {"UPLO": "U"}),
    ("linalg.eig", (_well(4),), {}),
    ("linalg.eigvals", (_well(4),), {}),
    ("linalg.qr", (_randn(5, 3),), {}),
    ("linalg.cholesky", (_spd(4),), {}),
    ("linalg.lu", (_well(4),), {}),
    ("linalg.lu_factor", (_well(4),), {}),
    ("linalg.norm", (_randn(3, 4),), {}),
    ("linalg.norm", (_randn(3, 4),), {"ord": "nuc"}),
    ("linalg.norm", (_randn(5),), {"ord": 3}),
    ("linalg.vector_norm", (_randn(3, 4),), {"ord": 1, "dim": 1}),
    ("linalg.matrix_norm", (_randn(2, 3, 4),), {"ord": "fro"}),
    ("linalg.matrix_norm", (_randn(3, 4),), {"ord": 2}),
    ("linalg.cond", (_well(4),), {}),
    ("linalg.matrix_rank", (_randn(5, 3) @ _randn(3, 4),), {}),
    ("linalg.matrix_exp", (0.5 * _randn(3, 3),), {}),
    ("linalg.matrix_power", (_well(3) / 3, 3), {}),
    ("linalg.matrix_power", (_well(3), -2), {}),
    ("trace", (_randn(4, 4),), {}),
    ("diag", (_randn(4),), {}),
    ("diag", (_randn(3, 4),), {"diagonal": 1}),
    ("diagonal", (_randn(2, 3, 4),), {"dim1": 1, "dim2": 2}),
    ("diag_embed", (_randn(2, 3),), {}),
    ("block_diag", (_randn(2, 2), _randn(1, 3)), {}),
    ("tril", (_randn(4, 4),), {}),
    ("tril", (_randn(4, 4), -1), {}),
    ("triu", (_randn(4, 4),), {"diagonal": 1}),
    # Fourier transforms.
    ("fft.fft", (_randn(8),), {}),
    ("fft.fft", (_complex(2, 8),), {"n": 16, "norm": "ortho"}),
    ("fft.ifft", (_complex(8),), {}),
    ("fft.rfft", (_randn(3, 8),), {"dim": -1}),
    ("fft.irfft", (_complex(5),), {"n": 8}),
    ("fft.hfft", (_complex(5),), {"n": 8}),
    ("fft.ihfft", (_randn(8),), {}),
    ("fft.fft2", (_randn(4, 6),), {}),
    ("fft.ifft2", (_complex(4, 6),), {}),
    ("fft.rfft2", (_randn(4, 6),), {}),
    ("fft.irfft2", (_complex(4, 4),), {"s": (4, 6)}),
    ("fft.fftn", (_randn(2, 4, 6),), {"dim": (1, 2)}),
    ("fft.ifftn", (_complex(2, 4, 6),), {}),
    ("fft.rfftn", (_randn(2, 4, 6),), {}),
    ("fft.irfftn", (_complex(2, 4, 4),), {"s": (2, 4, 6)}),
    ("fft.fftshift", (_randn(8),), {}),
    ("fft.fftshift", (_randn(3, 5),), {"dim": (0, 1)}),
    ("fft.ifftshift", (_randn(3, 5),), {"dim": 1}),
    # Convolutions, pooling and resampling.
    ("conv1d", (_randn(2, 3, 10), _randn(4, 3, 3)), {"padding": 1}),
    ("conv1d", (_randn(2, 3, 10), _randn(4, 3, 3), _randn(4)), {"stride": 2}),
    ("conv2d", (_randn(2, 3, 8, 8), _randn(4, 3, 3, 3), _randn(4)), {"padding": 1}),
    ("conv2d", (_randn(1, 4, 6, 6), _randn(4, 2, 3, 3)), {"padding": "same", "groups": 2}),
    ("conv3d", (_randn(1, 2, 5, 5, 5), _randn(3, 2, 3, 3, 3)), {}),
    ("conv_transpose1d", (_randn(2, 3, 6), _randn(3, 4, 3)), {"stride": 2}),
    (
        "conv_transpose2d",
        (_randn(1, 3, 4, 4), _randn(3, 2, 3, 3), _randn(2)),
        {"stride": 2, "padding": 1, "output_padding": 1},
    ),
    ("conv_transpose3d", (_randn(1, 2, 3, 3, 3), _randn(2, 2, 2, 2, 2)), {}),
    ("nn.functional.max_pool1d", (_randn(2, 3, 10), 2), {}),
    ("nn.functional.max_pool2d", (_randn(1, 2, 6, 6), 2), {}),
    ("nn.functional.max_pool2d", (_randn(1, 2, 6, 6), 3), {"stride": 2, "return_indices": True}),
    ("nn.functional.avg_pool1d", (_randn(2, 3, 10),), {"kernel_size": 3, "stride": 2}),
    ("nn.functional.avg_pool2d", (_randn(1, 2, 6, 6), 3), {"stride": 1, "padding": 1}),
    (
        "nn.functional.interpolate",
        (_randn(1, 2, 4, 4),),
        {"scale_factor": 2.0, "mode": "bilinear", "align_corners": False},
    ),
    ("nn.functional.interpolate", (_randn(1, 2, 5),), {"size": 8, "mode": "linear"}),
    ("nn.functional.interpolate", (_randn(1, 1, 3, 3),), {"size": (4, 5)}),
    ("nn.functional.pad", (_randn(1, 2, 3, 3), (1, 1, 2, 0)), {}),
    ("nn.functional.pad", (_randn(1, 2, 3, 3), (1, 2)), {"value": 0.5}),
    ("nn.functional.pad", (_randn(1, 2, 4, 4), (1, 1, 1, 1)), {"mode": "reflect"}),
    # Neural-network layers, activations and losses.
    ("softmax", (_randn(3, 5), 1), {}),
    ("softmax", (_randn(3, 5).astype(np.float32),), {"dim": 0, "dtype": "float64"}),
    ("log_softmax", (_randn(3, 5),), {"dim": -1}),
    ("nn.functional.relu", (_randn(3, 4),), {}),
    ("nn.functional.leaky_relu", (_randn(3, 4), 0.2), {}),
    ("nn.functional.elu", (_randn(3, 4),), {"alpha": 0.5}),
    ("nn.functional.gelu", (_randn(3, 4),), {}),
    ("nn.functional.gelu", (_randn(3, 4),), {"approximate": "tanh"}),
    ("nn.functional.silu", (_randn(3, 4),), {}),
    ("nn.functional.softplus", (_randn(3, 4),), {"beta": 2.0}),
    ("nn.functional.logsigmoid", (_randn(3, 4),), {}),
    ("nn.functional.glu", (_randn(3, 6),), {"dim": -1}),
    ("nn.functional.linear", (_randn(3, 4), _randn(5, 4), _randn(5)), {}),
    ("nn.functional.layer_norm", (_randn(2, 3, 4), (4,), _randn(4), _randn(4)), {}),
    ("nn.functional.group_norm", (_randn(2, 4, 3), 2), {}),
    ("nn.functional.normalize", (_randn(3, 4),), {"dim": 1}),
    (
        "nn.functional.scaled_dot_product_attention",
        (_randn(2, 3, 4, 8), _randn(2, 3, 5, 8), _randn(2, 3, 5, 8)),
        {},
    ),
    (
        "nn.functional.scaled_dot_product_attention",
        (_randn(1, 2, 4, 8), _randn(1, 2, 4, 8), _randn(1, 2, 4, 8)),
        {"is_causal": True, "scale": 0.5},
    ),
    (
        "nn.functional.scaled_dot_product_attention",
        (
            _randn(1, 2, 4, 8),
            _randn(1, 2, 5, 8),
            _randn(1, 2, 5, 8),
            _bools(4, 5) | np.eye(4, 5, dtype=bool),
        ),
        {},
    ),
    ("nn.functional.mse_loss", (_randn(3, 4), _randn(3, 4)), {}),
    ("nn.functional.mse_loss", (_randn(3, 4), _randn(3, 4)), {"reduction": "none"}),
    ("nn.functional.l1_loss", (_randn(3, 4), _randn(3, 4)), {"reduction": "sum"}),
    ("nn.functional.smooth_l1_loss", (_randn(3, 4), _randn(3, 4)), {"beta": 0.5}),
    ("nn.functional.huber_loss", (_randn(3, 4), _randn(3, 4)), {"delta": 0.5}),
    ("nn.functional.cross_entropy", (_randn(4, 5), _ints(0, 5, 4)), {}),
    (
        "nn.functional.cross_entropy",
        (_randn(4, 5), np.array([0, -100, 4, 2])),
        {"weight": _pos(5), "label_smoothing": 0.1},
    ),
    ("nn.functional.cross_entropy", (_randn(2, 5, 3), _ints(0, 5, 2, 3)), {"reduction": "none"}),
    ("nn.functional.cross_entropy", (_randn(4, 5), _probs(4, 5)), {}),
    ("nn.functional.nll_loss", (_randn(4, 5), _ints(0, 5, 4)), {}),
    ("nn.functional.nll_loss", (_randn(4, 5), np.array([1, 3, 3, 0])), {"ignore_index": 3}),
    ("nn.functional.binary_cross_entropy_with_logits", (_randn(6), _uniform(0, 1, 6)), {}),
    ("nn.functional.kl_div", (np.log(_probs(3, 4)), _probs(3, 4)), {"reduction": "batchmean"}),
    ("nn.functional.pairwise_distance", (_randn(3, 4), _randn(3, 4)), {}),
    # Distances and statistics.
    ("cdist", (_randn(4, 3), _randn(5, 3)), {}),
    ("cdist", (_randn(2, 4, 3), _randn(2, 5, 3)), {"p": 1.0}),
    ("cosine_similarity", (_randn(3, 4), _randn(3, 4)), {}),
    ("cosine_similarity", (_randn(3, 4), _randn(3, 4)), {"dim": 0}),
    ("dist", (_randn(3, 4), _randn(3, 4)), {"p": 3}),
    ("cov", (_randn(3, 10),), {}),
    ("cov", (_randn(3, 10),), {"correction": 0, "aweights": _pos(10)}),
    ("corrcoef", (_randn(3, 10),), {}),
    # Reductions.
    ("sum", (_randn(3, 4),), {}),
    ("sum", (_randn(3, 4),), {"dim": 1, "keepdim": True}),
    ("sum", (_randn(2, 3, 4), (0, 2)), {}),
    ("sum", (_ints(-5, 5, 3, 4),), {"dtype": "float64"}),
    ("nansum", (_with_nans(3, 4),), {}),
    ("prod", (_uniform(0.5, 1.5, 3, 4), 1), {}),
    ("mean", (_randn(3, 4),), {}),
    ("mean", (_randn(3, 4),), {"dim": (0,)}),
    ("nanmean", (_with_nans(3, 4),), {"dim": 1}),
    ("std", (_randn(3, 4),), {"dim": 1, "correction": 0}),
    ("var", (_randn(3, 4),), {}),
    ("std_mean", (_randn(3, 4),), {"dim": 0}),
    ("var_mean", (_randn(3, 4), 1), {}),
    ("amax", (_randn(3, 4),), {"dim": (0, 1)}),
    ("amin", (_randn(3, 4), 1), {}),
    ("aminmax", (_randn(3, 4),), {"dim": 0}),
    ("max", (_randn(3, 4),), {}),
    ("max", (_randn(3, 4), 1), {}),
    ("max", (_randn(3, 4), _randn(3, 4)), {}),
    ("min", (_randn(3, 4),), {}),
    ("min", (_randn(3, 4),), {"dim": 0, "keepdim": True}),
    ("argmax", (_randn(3, 4),), {}),
    ("argmax", (_randn(3, 4),), {"dim": 1}),
    ("argmin", (_randn(3, 4), 0), {}),
    ("logsumexp", (_randn(3, 4), 1), {}),
    ("median", (_randn(7),), {}),
    ("median", (_randn(3, 5), 1), {}),
    ("nanmedian", (_with_nans(3, 5),), {}),
    ("nanmedian", (_with_nans(3, 5), 1), {}),
    ("quantile", (_randn(10), 0.3), {}),
    ("quantile", (_randn(3, 10), np.array([0.1, 0.5, 0.9])), {"dim": 1}),
    ("quantile", (_randn(10), 0.25), {"interpolation": "midpoint"}),
    ("nanquantile", (_with_nans(3, 5), 0.5), {"dim": 1}),
    ("mode", (np.array([[1, 2, 2, 3, 2], [0, 5, 4, 1, 5]]), 1), {}),
    ("kthvalue", (_randn(3, 6), 2, 1), {}),
    ("all", (_bools(3, 4),), {}),
    ("all", (_bools(3, 4), 1), {}),
    ("any", (_bools(3, 4),), {"dim": 0}),
    ("count_nonzero", (_ints(0, 2, 3, 4),), {"dim": 1}),
    # Scans and differences.
    ("cumsum", (_randn(3, 4), 1), {}),
    ("cumsum", (_ints(-5, 5, 3, 4),), {"dim": 0, "dtype": "float64"}),
    ("cumprod", (_uniform(0.5, 1.5, 3, 4), 0), {}),
    ("cummax", (_randn(3, 5), 1), {}),
    ("cummin", (_randn(3, 5),), {"dim": 0}),
    ("logcumsumexp", (_randn(3, 5), 1), {}),
    ("diff", (_randn(3, 5),), {"n": 2, "dim": 1}),
    ("trapezoid", (_randn(10),), {"dx": 0.5}),
    ("trapezoid", (_randn(10), np.sort(_randn(10))), {}),
    ("cumulative_trapezoid", (_randn(3, 10),), {}),
    # Sorting, searching and selection.
    ("sort", (_randn(3, 5),), {"dim": 1, "descending": True}),
    ("sort", (_ints(0, 4, 12),), {"stable": True}),
    ("argsort", (_randn(3, 5),), {"dim": 0}),
    ("topk", (_randn(3, 6), 2), {}),
    ("topk", (_randn(10), 3), {"largest": False}),
    ("unique", (_ints(0, 5, 20),), {}),
    ("unique", (_ints(0, 5, 20),), {"return_inverse": True, "return_counts": True}),
    ("nonzero", (_ints(0, 2, 3, 4),), {}),
    ("nonzero", (_ints(0, 2, 3, 4),), {"as_tuple": True}),
    ("argwhere", (_ints(0, 2, 3, 4),), {}),
    ("searchsorted", (np.sort(_randn(10)), _randn(5)), {}),
    ("searchsorted", (np.sort(_randn(10)), _randn(2, 3)), {"right": True}),
    ("bucketize", (_randn(6), np.sort(_randn(4))), {}),
    ("histc", (_randn(100),), {"bins": 10, "min": -3.0, "max": 3.0}),
    ("bincount", (_ints(0, 6, 30),), {}),
    ("bincount", (_ints(0, 6, 30),), {"weights": _randn(30), "minlength": 8}),
    ("masked_select", (_randn(3, 4), _bools(3, 4)), {}),
    ("gather", (_randn(3, 4), 1, _ints(0, 4, 3, 2)), {}),
    ("index_select", (_randn(4, 3), 0, _ints(0, 4, 5)), {}),
    ("where", (_bools(3, 4), _randn(3, 4), _randn(3, 4)), {}),
    ("where", (_bools(3, 4), _randn(3, 4), 0.0), {}),
    ("where", (_bools(3, 4),), {}),
    # Shape and layout.
    ("cat", ([_randn(2, 3), _randn(4, 3)],), {}),
    ("cat", ([_randn(2, 3), _randn(2, 1)], 1), {}),
    ("stack", ([_randn(2, 3), _randn(2, 3)],), {"dim": 1}),
    ("hstack", ([_randn(2, 3), _randn(2, 1)],), {}),
    ("vstack", ([_randn(2, 3), _randn(1, 3)],), {}),
    ("transpose", (_randn(2, 3, 4), 0, 2), {}),
    ("permute", (_randn(2, 3, 4), (2, 0, 1)), {}),
    ("movedim", (_randn(2, 3, 4), 0, -1), {}),
    ("reshape", (_randn(2, 3, 4), (4, -1)), {}),
    ("flatten", (_randn(2, 3, 4),), {"start_dim": 1}),
    ("squeeze", (_randn(2, 1, 3),), {}),
    ("squeeze", (_randn(2, 1, 3), 1), {}),
    ("unsqueeze", (_randn(2, 3), 1), {}),
    ("flip", (_randn(2, 3), (0, 1)), {}),
    ("roll", (_randn(2, 5), 2, 1), {}),
    ("roll", (_randn(2, 5), (1, -1), (0, 1)), {}),
    ("narrow", (_randn(4, 5), 1, 1, 3), {}),
    # Elementwise arithmetic and comparison.
    ("add", (_randn(3, 4), _randn(3, 4)), {"alpha": 2.0}),
    ("add", (_randn(3, 4), 1.5), {}),
    ("add", (_ints(-5, 5, 3, 4), _ints(-5, 5, 4)), {}),
    ("sub", (_randn(3, 4), _randn(3, 4)), {}),
    ("mul", (_randn(3, 4), _randn(3, 4)), {}),
    ("mul", (_complex(3, 4), 2.0), {}),
    ("div", (_randn(3, 4), _pos(3, 4)), {}),
    ("div", (4 * _randn(3, 4), _pos(3, 4)), {"rounding_mode": "floor"}),
    ("remainder", (5 * _randn(3, 4), _pos(3, 4)), {}),
    ("fmod", (5 * _randn(3, 4), _pos(3, 4)), {}),
    ("pow", (_pos(3, 4), 2.5), {}),
    ("pow", (_pos(3, 4), _randn(3, 4)), {}),
    ("pow", (_ints(0, 5, 3, 4), 3), {}),
    ("maximum", (_randn(3, 4), _randn(3, 4)), {}),
    ("minimum", (_randn(3, 4), _randn(4)), {}),
    ("atan2", (_randn(3, 4), _randn(3, 4)), {}),
    ("hypot", (_randn(3, 4), _randn(3, 4)), {}),
    ("logaddexp", (_randn(3, 4), _randn(3, 4)), {}),
    ("xlogy", (_randn(3, 4), _pos(3, 4)), {}),
    ("lerp", (_randn(3, 4), _randn(3, 4), 0.3), {}),
    ("lerp", (_randn(3, 4), _randn(3, 4), _uniform(0, 1, 3, 4)), {}),
    ("clamp", (_randn(3, 4),), {"min": -0.5, "max": 0.5}),
    ("clamp", (_randn(3, 4), _uniform(-1, 0, 3, 4), _uniform(0, 1, 3, 4)), {}),
    ("eq", (_ints(0, 3, 3, 4), _ints(0, 3, 3, 4)), {}),
    ("ne", (_ints(0, 3, 3, 4), 1), {}),
    ("lt", (_randn(3, 4), _randn(3, 4)), {}),
    ("le", (_randn(3, 4), 0.0), {}),
    ("gt", (_randn(3, 4), _randn(3, 4)), {}),
    ("ge", (_randn(3, 4), _randn(4)), {}),
    ("isclose", (np.array([1.0, 2.0, 3.0, np.nan]), np.array([1.0 + 1e-9, 2.1, 3.0, np.nan])), {}),
    (
        "isclose",
        (np.array([1.0, 2.0, np.nan]), np.array([1.05, 2.5, np.nan])),
        {"rtol": 0.1, "equal_nan": True},
    ),
    ("logical_and", (_bools(3, 4), _bools(3, 4)), {}),
    ("logical_or", (_bools(3, 4), _bools(3, 4)), {}),
    ("logical_xor", (_bools(3, 4), _ints(0, 2, 3, 4)), {}),
    ("logical_not", (_bools(3, 4),), {}),
    # Elementwise functions.
    ("abs", (_randn(3, 4),), {}),
    ("abs", (_complex(3, 4),), {}),
    ("neg", (_randn(3, 4),), {}),
    ("sign", (np.array([-2.0, 0.0, 3.5, -0.1]),), {}),
    ("reciprocal", (_pos(3, 4),), {}),
    ("square", (_randn(3, 4),), {}),
    ("sqrt", (_pos(3, 4),), {}),
    ("sqrt", (_complex(3, 4),), {}),
    ("rsqrt", (_pos(3, 4),), {}),
    ("exp", (_randn(3, 4),), {}),
    ("exp", (_complex(3, 4),), {}),
    ("expm1", (1e-3 * _randn(3, 4),), {}),
    ("log", (_pos(3, 4),), {}),
    ("log1p", (_pos(3, 4),), {}),
    ("log2", (_pos(3, 4),), {}),
    ("log10", (_pos(3, 4),), {}),
    ("sin", (_randn(3, 4),), {}),
    ("cos", (_randn(3, 4),), {}),
    ("tan", (_unit(3, 4),), {}),
    ("asin", (_unit(3, 4),), {}),
    ("acos", (_unit(3, 4),), {}),
    ("atan", (_randn(3, 4),), {}),
    ("sinh", (_randn(3, 4),), {}),
    ("cosh", (_randn(3, 4),), {}),
    ("tanh", (_randn(3, 4),), {}),
    ("asinh", (_randn(3, 4),), {}),
    ("acosh", (_uniform(1.1, 3.0, 3, 4),), {}),
    ("atanh", (_unit(3, 4),), {}),
    ("sigmoid", (_randn(3, 4),), {}),
    ("logit", (_uniform(0.05, 0.95, 3, 4),), {}),
    ("logit", (_uniform(0.0, 1.0, 3, 4),), {"eps": 1e-6}),
    ("erf", (_randn(3, 4),), {}),
    ("erfc", (_randn(3, 4),), {}),
    ("erfinv", (_unit(3, 4),), {}),
    ("lgamma", (_pos(3, 4),), {}),
    ("digamma", (_pos(3, 4),), {}),
    ("special.ndtr", (_randn(3, 4),), {}),
    ("special.ndtri", (_uniform(0.05, 0.95, 3, 4),), {}),
    ("special.log_ndtr", (_randn(3, 4),), {}),
    ("floor", (3 * _randn(3, 4),), {}),
    ("ceil", (3 * _randn(3, 4),), {}),
    ("round", (3 * _randn(3, 4),), {}),
    ("round", (_randn(3, 4),), {"decimals": 2}),
    ("trunc", (3 * _randn(3, 4),), {}),
    ("nan_to_num", (_specials(),), {}),
    ("nan_to_num", (_specials(),), {"nan": 0.5, "posinf": 9.0, "neginf": -9.0}),
    ("isfinite", (_specials(),), {}),
    ("isnan", (_specials(),), {}),
    ("isinf", (_specials(),), {}),
    # Complex numbers.
    ("real", (_complex(3, 4),), {}),
    ("imag", (_complex(3, 4),), {}),
    ("angle", (_complex(3, 4),), {}),
    ("angle", (_randn(3, 4),), {}),
    ("conj_physical", (_complex(3, 4),), {}),
    ("polar", (_pos(3, 4), _randn(3, 4)), {}),
    ("complex", (_randn(3, 4), _randn(3, 4)), {}),
    ("view_as_real", (_complex(3, 2),), {}),
    ("view_as_complex", (_randn(3, 2),), {}),
]

# Functions every client can count on.
REQUIRED = [
    "matmul",
    "bmm",
    "mm",
    "einsum",
    "tensordot",
    "outer",
    "kron",
    "linalg.solve",
    "linalg.inv",
    "linalg.det",
    "linalg.slogdet",
    "linalg.svd",
    "linalg.svdvals",
    "linalg.eigh",
    "linalg.eigvalsh",
    "linalg.eig",
    "linalg.qr",
    "linalg.cholesky",
    "linalg.lstsq",
    "linalg.norm",
    "linalg.vector_norm",
    "linalg.matrix_norm",
    "linalg.pinv",
    "linalg.matrix_exp",
    "linalg.matrix_rank",
    "fft.fft",
    "fft.ifft",
    "fft.rfft",
    "fft.irfft",
    "fft.fft2",
    "fft.ifft2",
    "fft.rfft2",
    "fft.fftn",
    "fft.ifftn",
    "fft.fftshift",
    "conv1d",
    "conv2d",
    "conv3d",
    "conv_transpose2d",
    "softmax",
    "log_softmax",
    "topk",
    "sort",
    "argsort",
    "cumsum",
    "cumprod",
    "sum",
    "mean",
    "std",
    "var",
    "amax",
    "amin",
    "argmax",
    "argmin",
    "logsumexp",
    "exp",
    "log",
    "sqrt",
    "sin",
    "cos",
    "tanh",
    "sigmoid",
    "abs",
    "clamp",
    "where",
    "add",
    "sub",
    "mul",
    "div",
    "pow",
    "cat",
    "stack",
    "transpose",
    "permute",
    "reshape",
    "cdist",
    "cosine_similarity",
    "trace",
    "diag",
    "tril",
    "triu",
    "nn.functional.relu",
    "nn.functional.gelu",
    "nn.functional.layer_norm",
    "nn.functional.interpolate",
    "nn.functional.pad",
    "nn.functional.max_pool2d",
    "nn.functional.avg_pool2d",
    "nn.functional.mse_loss",
    "nn.functional.cross_entropy",
]

# Functions that must never be reachable: they allocate from a scalar alone, are random,
# change global state, touch files, take callables, or work in place.
FORBIDDEN = [
    "zeros",
    "ones",
    "empty",
    "full",
    "arange",
    "linspace",
    "logspace",
    "eye",
    "rand",
    "randn",
    "randint",
    "randperm",
    "normal",
    "bernoulli",
    "multinomial",
    "zeros_like",
    "ones_like",
    "empty_like",
    "full_like",
    "rand_like",
    "randn_like",
    "tril_indices",
    "triu_indices",
    "fft.fftfreq",
    "fft.rfftfreq",
    "manual_seed",
    "seed",
    "set_num_threads",
    "set_default_dtype",
    "set_default_device",
    "set_grad_enabled",
    "use_deterministic_algorithms",
    "load",
    "save",
    "from_file",
    "compile",
    "jit.script",
    "jit.trace",
    "vmap",
    "func.vmap",
    "cond",
    "nn.functional.dropout",
    "nn.functional.embedding",
    "nn.functional.batch_norm",
    "nn.functional.instance_norm",
    "nn.functional.one_hot",
    "nn.functional.binary_cross_entropy",
    "combinations",
    "cartesian_prod",
    "repeat_interleave",
    "tile",
    "broadcast_to",
    "split",
    "chunk",
    "unbind",
]

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


def _public_torch(name: str) -> Callable[..., Any]:
    """The public torch function ``name`` names, resolved here independently of the registry."""
    fn: Callable[..., Any] = functools.reduce(getattr, name.split("."), torch)
    return fn


def _to_torch(value: Any) -> Any:
    """A case argument as the engine hands it over: arrays as (fresh) CPU tensors, tuples and
    lists as lists, everything else unchanged."""
    if isinstance(value, np.ndarray):
        return torch.from_numpy(value.copy())
    if isinstance(value, list | tuple):
        return [_to_torch(v) for v in value]
    return value


def _torch_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any]
) -> tuple[list[Any], dict[str, Any]]:
    return [_to_torch(a) for a in args], {
        k: _TORCH_DTYPES[v] if k == "dtype" else _to_torch(v) for k, v in kwargs.items()
    }


def _reference(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """What the public torch function returns for a case, computed locally on the CPU."""
    targs, tkwargs = _torch_arguments(args, kwargs)
    return _public_torch(name)(*targs, **tkwargs)


def _assert_same(actual: Any, expected: Any, where: str = "result") -> None:
    """Equality of torch results: type, structure, dtype, shape and values."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: {type(actual).__name__}"
        # Floating point results may differ in the last bit between two identical calls (LAPACK
        # and vectorized kernels can depend on threading and alignment); the rest is exact.
        exact = not (expected.is_floating_point() or expected.is_complex())
        tol = 0.0 if exact else 1e-10
        torch.testing.assert_close(
            actual, expected, rtol=tol, atol=tol, equal_nan=True, check_stride=False, msg=where
        )
    elif isinstance(expected, tuple | list):
        assert type(actual) is type(expected), f"{where}: {type(actual)} != {type(expected)}"
        assert len(actual) == len(expected), where
        for i, (a, e) in enumerate(zip(actual, expected, strict=True)):
            _assert_same(a, e, f"{where}[{i}]")
    else:
        assert actual == expected or (
            isinstance(expected, float) and math.isnan(expected) and math.isnan(actual)
        ), where


def _tensors(result: Any) -> list[torch.Tensor]:
    if isinstance(result, torch.Tensor):
        return [result]
    if isinstance(result, tuple | list):
        return [t for r in result for t in _tensors(r)]
    return []


# ---------------------------------------------------------------------------------------------
# The registry itself.


def test_registry_shape() -> None:
    assert len(FUNCTIONS) >= 60
    for name, function in FUNCTIONS.items():
        assert isinstance(function, Function)
        assert function.name == name
        assert callable(function.fn), name
        assert not name.endswith("_"), name
        assert not name.startswith("torch."), name
        description = function.description
        assert description.strip() == description and description, name
        assert "\n" not in description and len(description) <= 100, name


def test_registry_is_read_only() -> None:
    with pytest.raises(TypeError):
        FUNCTIONS["zeros"] = Function("zeros", torch.zeros, "x")  # type: ignore[index]


def test_required_functions_are_listed() -> None:
    missing = [name for name in REQUIRED if name not in FUNCTIONS]
    assert not missing


def test_forbidden_functions_are_not_listed() -> None:
    present = [name for name in FORBIDDEN if name in FUNCTIONS]
    assert not present


def test_entries_are_the_public_torch_function_unless_wrapped() -> None:
    wrapped = {name for name, f in FUNCTIONS.items() if f.fn is not _public_torch(name)}
    # Only the guarded entries differ from torch's own callable.
    assert wrapped == {
        "nn.functional.relu",
        "nn.functional.leaky_relu",
        "nn.functional.elu",
        "nn.functional.silu",
        "nn.functional.scaled_dot_product_attention",
        "nn.functional.cross_entropy",
        "nn.functional.nll_loss",
        "gather",
        "index_select",
    }


def test_no_python_entry_takes_an_inplace_flag_or_a_callable() -> None:
    for name, function in FUNCTIONS.items():
        try:
            signature = inspect.signature(function.fn)
        except (TypeError, ValueError):
            continue  # a builtin without a Python signature
        assert "inplace" not in signature.parameters, name
        assert "dropout_p" not in signature.parameters, name
        for parameter in signature.parameters.values():
            assert "Callable" not in str(parameter.annotation), (name, parameter)


@pytest.mark.parametrize("name", ["nn.functional.relu", "nn.functional.silu"])
def test_activation_wrappers_refuse_inplace(name: str) -> None:
    x = torch.randn(4, dtype=torch.float64)
    before = x.clone()
    with pytest.raises(TypeError):
        FUNCTIONS[name].fn(x, inplace=True)
    with pytest.raises(TypeError):
        FUNCTIONS[name].fn(x, True)
    assert torch.equal(x, before)


def test_leaky_relu_and_elu_refuse_inplace() -> None:
    x = torch.randn(4, dtype=torch.float64)
    before = x.clone()
    with pytest.raises(TypeError):
        FUNCTIONS["nn.functional.leaky_relu"].fn(x, 0.1, True)
    with pytest.raises(TypeError):
        FUNCTIONS["nn.functional.elu"].fn(x, inplace=True)
    assert torch.equal(x, before)


def test_attention_refuses_dropout() -> None:
    q = torch.randn(1, 2, 3, 4, dtype=torch.float64)
    with pytest.raises(TypeError):
        FUNCTIONS["nn.functional.scaled_dot_product_attention"].fn(q, q, q, dropout_p=0.5)
    with pytest.raises(TypeError):
        FUNCTIONS["nn.functional.scaled_dot_product_attention"].fn(q, q, q, None, 0.5)


@pytest.mark.parametrize("loss", ["nn.functional.cross_entropy", "nn.functional.nll_loss"])
@pytest.mark.parametrize("bad", [5, -1, 100])
def test_losses_check_class_indices_before_torch(loss: str, bad: int) -> None:
    logits = torch.randn(3, 5, dtype=torch.float64)
    target = torch.tensor([0, bad, 4])
    with pytest.raises(IndexError, match="class index outside"):
        FUNCTIONS[loss].fn(logits, target)
    # The ignored index is not a class and passes.
    FUNCTIONS[loss].fn(logits, torch.tensor([0, -100, 4]))
    FUNCTIONS[loss].fn(logits, torch.tensor([0, bad, 4]), ignore_index=bad)


@pytest.mark.parametrize("bad", [4, -1])
def test_gather_and_index_select_check_indices_before_torch(bad: int) -> None:
    x = torch.randn(3, 4, dtype=torch.float64)
    with pytest.raises(IndexError, match="out of range"):
        FUNCTIONS["gather"].fn(x, 1, torch.tensor([[0, bad]] * 3))
    with pytest.raises(IndexError, match="out of range"):
        FUNCTIONS["index_select"].fn(x, 1, torch.tensor([0, bad]))
    with pytest.raises(IndexError, match="out of range"):
        FUNCTIONS["index_select"].fn(x, 0, torch.tensor([3]))


# ---------------------------------------------------------------------------------------------
# The cases.


def test_every_function_has_a_case() -> None:
    untested = sorted(set(FUNCTIONS) - {name for name, _, _ in CASES})
    assert not untested


def test_every_case_names_a_function() -> None:
    unknown = sorted({name for name, _, _ in CASES} - set(FUNCTIONS))
    assert not unknown


@pytest.mark.parametrize(("name", "args", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_call_matches_torch(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    targs, tkwargs = _torch_arguments(args, kwargs)
    before = [t.clone() for t in _tensors((targs, list(tkwargs.values())))]

    actual = FUNCTIONS[name].fn(*targs, **tkwargs)

    # No input was modified.
    after = _tensors((targs, list(tkwargs.values())))
    for b, a in zip(before, after, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
    _assert_same(actual, _reference(name, args, kwargs))
    # The cases are meaningful: every floating point result is finite.
    for t in _tensors(actual):
        if t.is_floating_point() or t.is_complex():
            assert bool(torch.isfinite(t).all()), f"{name}: non-finite result"


# ---------------------------------------------------------------------------------------------
# The same cases through the server.


def _to_numpy(result: Any) -> Any:
    if isinstance(result, torch.Tensor):
        return result.detach().cpu().resolve_conj().resolve_neg().numpy()
    if isinstance(result, tuple | list):
        return tuple(_to_numpy(r) for r in result)
    return np.asarray(result)


def _svd(out: tuple[np.ndarray, ...], args: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    u, s, vh = out
    k = s.shape[-1]
    return ((u[..., :k] * s[..., None, :]) @ vh[..., :k, :], s)


def _eigh(out: tuple[np.ndarray, ...], args: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    w, v = out
    return (w, (v * w[..., None, :]) @ np.conj(np.swapaxes(v, -1, -2)))


def _eig(out: tuple[np.ndarray, ...], args: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    w, v = out
    return (np.sort_complex(w), (v * w[..., None, :]) @ np.linalg.inv(v))


def _qr(out: tuple[np.ndarray, ...], args: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    q, r = out
    return (q @ r,)


def _mode(out: tuple[np.ndarray, ...], args: tuple[Any, ...]) -> tuple[np.ndarray, ...]:
    return (out[0],)  # which index of a repeated value comes back is up to the device


# Results that are unique only up to signs, phases or tie-breaking, as invariants, so that a
# server on a GPU compares too. A server on the CPU gives identical results anyway.
_CANONICAL: dict[
    str, Callable[[tuple[np.ndarray, ...], tuple[Any, ...]], tuple[np.ndarray, ...]]
] = {
    "linalg.svd": _svd,
    "linalg.eigh": _eigh,
    "linalg.eig": _eig,
    "linalg.eigvals": lambda out, args: (np.sort_complex(out[0]),),
    "linalg.qr": _qr,
    "mode": _mode,
}


def _assert_matches(got: np.ndarray, expected: np.ndarray, where: str) -> None:
    got = np.asarray(got)
    assert got.dtype == expected.dtype, f"{where}: dtype {got.dtype} != {expected.dtype}"
    assert got.shape == expected.shape, f"{where}: shape {got.shape} != {expected.shape}"
    if expected.dtype.kind in "fc":
        rtol = 1e-6 if expected.dtype in (np.float64, np.complex128) else 1e-4
        scale = float(np.nanmax(np.abs(expected), initial=1.0))
        np.testing.assert_allclose(got, expected, rtol=rtol, atol=1e-9 * scale, err_msg=where)
    else:
        np.testing.assert_array_equal(got, expected, err_msg=where)


@pytest.mark.parametrize(("name", "args", "kwargs"), CASES, ids=[c[0] for c in CASES])
def test_call_matches_torch_over_grpc(
    client: Any, name: str, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    got = client.call(name, *args, **kwargs)
    expected = _to_numpy(_reference(name, args, kwargs))

    if isinstance(expected, tuple):
        assert isinstance(got, tuple), f"{name}: expected a tuple, got {type(got).__name__}"
        assert len(got) == len(expected), name
        canonical = _CANONICAL.get(name)
        if canonical is not None:
            got, expected = canonical(got, args), canonical(expected, args)
        for i, (g, e) in enumerate(zip(got, expected, strict=True)):
            _assert_matches(g, e, f"{name}[{i}]")
    else:
        canonical = _CANONICAL.get(name)
        if canonical is not None:
            (got,), (expected,) = canonical((got,), args), canonical((expected,), args)
        _assert_matches(got, expected, name)
