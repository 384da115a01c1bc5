"""The Call allowlist: torch functions clients may run by name, and nothing else."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Final

import torch
import torch.nn.functional as F

from tensorwire_server.engine import numpy_functions


@dataclass(frozen=True)
class Function:
    """One allowlisted function."""

    name: str  # wire name: the torch path without "torch.", e.g. "linalg.svd"
    fn: Callable[..., Any]  # the torch callable itself (or a tiny wrapper only where needed)
    description: str  # one line
    # Raises for arguments on which ``fn`` would hang or crash the process instead of
    # raising (torch bugs); takes ``fn``'s arguments. None for almost every function.
    check: Callable[..., None] | None = None

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """``fn`` on the arguments, once ``check`` has passed them."""
        if self.check is not None:
            self.check(*args, **kwargs)
        return self.fn(*args, **kwargs)


# The allowlist, as (wire name, one-line description). Rules for adding an entry:
#   - nothing that takes a callable, a file path or a code string, or reads or writes files;
#   - nothing that allocates from a scalar argument alone (zeros, ones, empty, full, arange,
#     eye, randn, fftfreq, tril_indices...): every result must be derived from input tensors;
#   - nothing random or that changes global state (manual_seed, set_num_threads,
#     set_default_dtype, dropout, multinomial...);
#   - nothing that mutates its inputs: no trailing-underscore names (rejected below), no
#     functions with an in-place side effect (batch_norm running stats, embedding max_norm);
#     an `inplace` flag is removed by a wrapper in _WRAPPERS;
#   - nothing whose bad indices trip a CUDA device-side assert, which poisons the CUDA context
#     for the whole server: index-taking functions are wrapped to check indices first.
_ALLOWLIST: Final[tuple[tuple[str, str], ...]] = (
    # Matrix and tensor products.
    ("matmul", "Matrix product of two tensors, with broadcasting."),
    ("mm", "Matrix product of two 2-D tensors."),
    ("bmm", "Batched matrix product of two 3-D tensors."),
    ("mv", "Matrix-vector product."),
    ("dot", "Dot product of two 1-D tensors."),
    ("vdot", "Dot product of two 1-D tensors, conjugating the first."),
    ("inner", "Inner product over the last dimension of two tensors."),
    ("outer", "Outer product of two 1-D tensors."),
    ("kron", "Kronecker product of two tensors."),
    ("einsum", "Einstein summation over tensors given an equation string."),
    ("tensordot", "Contraction of two tensors over the given dimensions."),
    ("addmm", "beta * input + alpha * (mat1 @ mat2)."),
    ("baddbmm", "beta * input + alpha * (batch1 @ batch2), batched."),
    ("linalg.multi_dot", "Product of a list of matrices in the cheapest order."),
    ("linalg.vecdot", "Dot product of vectors along a dimension, with broadcasting."),
    ("linalg.cross", "Cross product of 3-vectors along a dimension."),
    # Linear algebra.
    ("linalg.solve", "Solution X of the linear system A X = B."),
    ("linalg.solve_triangular", "Solution X of a triangular linear system A X = B."),
    ("linalg.lstsq", "Least-squares solution of A X = B."),
    ("linalg.inv", "Inverse of a square matrix."),
    ("linalg.pinv", "Moore-Penrose pseudo-inverse of a matrix."),
    ("linalg.det", "Determinant of a square matrix."),
    ("linalg.slogdet", "Sign and log of the absolute value of the determinant."),
    ("linalg.svd", "Singular value decomposition U, S, Vh of a matrix."),
    ("linalg.svdvals", "Singular values of a matrix."),
    ("linalg.eigh", "Eigenvalues and eigenvectors of a Hermitian or symmetric matrix."),
    ("linalg.eigvalsh", "Eigenvalues of a Hermitian or symmetric matrix."),
    ("linalg.eig", "Eigenvalues and eigenvectors of a square matrix."),
    ("linalg.eigvals", "Eigenvalues of a square matrix."),
    ("linalg.qr", "QR decomposition of a matrix."),
    ("linalg.cholesky", "Cholesky decomposition of a Hermitian positive-definite matrix."),
    ("linalg.lu", "LU decomposition with partial pivoting: P, L, U."),
    ("linalg.lu_factor", "Compact LU factorization and pivots of a matrix."),
    ("linalg.norm", "Vector or matrix norm."),
    ("linalg.vector_norm", "Vector norm."),
    ("linalg.matrix_norm", "Matrix norm."),
    ("linalg.cond", "Condition number of a matrix."),
    ("linalg.matrix_rank", "Numerical rank of a matrix."),
    ("linalg.matrix_exp", "Matrix exponential of a square matrix."),
    ("linalg.matrix_power", "Integer power of a square matrix."),
    ("trace", "Sum of the diagonal of a 2-D tensor."),
    ("diag", "Diagonal of a matrix, or a diagonal matrix from a vector."),
    ("diagonal", "View of the diagonal of a tensor along two dimensions."),
    ("diag_embed", "Matrices with the last dimension of the input on their diagonal."),
    ("block_diag", "Block-diagonal matrix from the given tensors."),
    ("tril", "Lower triangle of a matrix, the rest zeroed."),
    ("triu", "Upper triangle of a matrix, the rest zeroed."),
    # Fourier transforms.
    ("fft.fft", "One-dimensional discrete Fourier transform."),
    ("fft.ifft", "One-dimensional inverse discrete Fourier transform."),
    ("fft.rfft", "One-dimensional Fourier transform of a real signal."),
    ("fft.irfft", "Inverse of fft.rfft: a real signal from its one-sided spectrum."),
    ("fft.hfft", "One-dimensional Fourier transform of a Hermitian-symmetric signal."),
    ("fft.ihfft", "Inverse of fft.hfft."),
    ("fft.fft2", "Two-dimensional discrete Fourier transform."),
    ("fft.ifft2", "Two-dimensional inverse discrete Fourier transform."),
    ("fft.rfft2", "Two-dimensional Fourier transform of a real signal."),
    ("fft.irfft2", "Inverse of fft.rfft2."),
    ("fft.fftn", "N-dimensional discrete Fourier transform."),
    ("fft.ifftn", "N-dimensional inverse discrete Fourier transform."),
    ("fft.rfftn", "N-dimensional Fourier transform of a real signal."),
    ("fft.irfftn", "Inverse of fft.rfftn."),
    ("fft.fftshift", "Moves the zero-frequency term to the center of the spectrum."),
    ("fft.ifftshift", "Inverse of fft.fftshift."),
    # Convolutions, pooling and resampling.
    ("conv1d", "1-D convolution over an input of several planes."),
    ("conv2d", "2-D convolution over an input of several planes."),
    ("conv3d", "3-D convolution over an input of several planes."),
    ("conv_transpose1d", "1-D transposed convolution."),
    ("conv_transpose2d", "2-D transposed convolution."),
    ("conv_transpose3d", "3-D transposed convolution."),
    ("nn.functional.max_pool1d", "1-D max pooling."),
    ("nn.functional.max_pool2d", "2-D max pooling."),
    ("nn.functional.avg_pool1d", "1-D average pooling."),
    ("nn.functional.avg_pool2d", "2-D average pooling."),
    ("nn.functional.interpolate", "Resamples a tensor to a size or by a scale factor."),
    ("nn.functional.pad", "Pads a tensor with a constant, reflection, replication or wrap."),
    # Neural-network layers, activations and losses.
    ("softmax", "Softmax along a dimension."),
    ("log_softmax", "Log of the softmax along a dimension."),
    ("nn.functional.relu", "Rectified linear unit, max(0, x)."),
    ("nn.functional.leaky_relu", "Leaky rectified linear unit."),
    ("nn.functional.elu", "Exponential linear unit."),
    ("nn.functional.gelu", "Gaussian error linear unit."),
    ("nn.functional.silu", "Sigmoid linear unit, x * sigmoid(x)."),
    ("nn.functional.softplus", "Softplus, log(1 + exp(x)), smoothed ReLU."),
    ("nn.functional.logsigmoid", "Log of the logistic sigmoid."),
    ("nn.functional.glu", "Gated linear unit along a dimension."),
    ("nn.functional.linear", "Affine map x @ weight.T + bias."),
    ("nn.functional.layer_norm", "Layer normalization over the trailing dimensions."),
    ("nn.functional.group_norm", "Group normalization."),
    ("nn.functional.normalize", "Divides by the Lp norm along a dimension."),
    ("nn.functional.scaled_dot_product_attention", "Scaled dot-product attention, no dropout."),
    ("nn.functional.mse_loss", "Mean squared error loss."),
    ("nn.functional.l1_loss", "Mean absolute error loss."),
    ("nn.functional.smooth_l1_loss", "Smooth L1 loss."),
    ("nn.functional.huber_loss", "Huber loss."),
    ("nn.functional.cross_entropy", "Cross-entropy loss between logits and targets."),
    ("nn.functional.nll_loss", "Negative log-likelihood loss of log-probabilities."),
    ("nn.functional.binary_cross_entropy_with_logits", "Binary cross-entropy on logits."),
    ("nn.functional.kl_div", "Kullback-Leibler divergence loss."),
    ("nn.functional.pairwise_distance", "Lp distance between rows of two tensors."),
    # Distances and statistics.
    ("cdist", "Lp distances between every pair of rows of two batches of matrices."),
    ("cosine_similarity", "Cosine similarity along a dimension."),
    ("dist", "Lp norm of the difference of two tensors."),
    ("cov", "Covariance matrix of variables in rows."),
    ("corrcoef", "Pearson correlation matrix of variables in rows."),
    # Reductions.
    ("sum", "Sum of elements, optionally along dimensions."),
    ("nansum", "Sum of elements, treating NaN as zero."),
    ("prod", "Product of elements, optionally along a dimension."),
    ("mean", "Mean of elements, optionally along dimensions."),
    ("nanmean", "Mean of the non-NaN elements."),
    ("std", "Standard deviation, optionally along dimensions."),
    ("var", "Variance, optionally along dimensions."),
    ("std_mean", "Standard deviation and mean."),
    ("var_mean", "Variance and mean."),
    ("amax", "Maximum along dimensions."),
    ("amin", "Minimum along dimensions."),
    ("aminmax", "Minimum and maximum, optionally along a dimension."),
    ("max", "Maximum; with a dimension, values and indices; with two tensors, elementwise."),
    ("min", "Minimum; with a dimension, values and indices; with two tensors, elementwise."),
    ("argmax", "Index of the maximum, optionally along a dimension."),
    ("argmin", "Index of the minimum, optionally along a dimension."),
    ("logsumexp", "Log of the sum of exponentials along dimensions, computed stably."),
    ("median", "Median; with a dimension, values and indices."),
    ("nanmedian", "Median ignoring NaN; with a dimension, values and indices."),
    ("quantile", "q-th quantiles, optionally along a dimension."),
    ("nanquantile", "q-th quantiles ignoring NaN."),
    ("mode", "Most frequent value and its index along a dimension."),
    ("kthvalue", "k-th smallest value and its index along a dimension."),
    ("all", "Whether all elements are true, optionally along a dimension."),
    ("any", "Whether any element is true, optionally along a dimension."),
    ("count_nonzero", "Number of non-zero elements, optionally along dimensions."),
    # Scans and differences.
    ("cumsum", "Cumulative sum along a dimension."),
    ("cumprod", "Cumulative product along a dimension."),
    ("cummax", "Cumulative maximum and its indices along a dimension."),
    ("cummin", "Cumulative minimum and its indices along a dimension."),
    ("logcumsumexp", "Log of the cumulative sum of exponentials along a dimension."),
    ("diff", "n-th forward difference along a dimension."),
    ("trapezoid", "Trapezoidal rule integral along a dimension."),
    ("cumulative_trapezoid", "Cumulative trapezoidal rule integral along a dimension."),
    # Sorting, searching and selection.
    ("sort", "Sorted values and their indices along a dimension."),
    ("argsort", "Indices that sort a tensor along a dimension."),
    ("topk", "k largest (or smallest) values and their indices along a dimension."),
    ("unique", "Sorted unique elements, optionally with inverse indices and counts."),
    ("nonzero", "Indices of non-zero elements."),
    ("argwhere", "Indices of non-zero elements, one row per element."),
    ("searchsorted", "Indices where values would be inserted to keep a sequence sorted."),
    ("bucketize", "Bucket index of each value given sorted boundaries."),
    ("histc", "Histogram with equal-width bins between min and max."),
    ("bincount", "Count of each non-negative integer value."),
    ("masked_select", "1-D tensor of the elements where a boolean mask is true."),
    ("gather", "Values along a dimension at the given indices."),
    ("index_select", "Entries along a dimension at the given 1-D indices."),
    ("where", "Elementwise choice between two tensors by a condition."),
    # Shape and layout.
    ("cat", "Concatenation of tensors along an existing dimension."),
    ("stack", "Stacks tensors along a new dimension."),
    ("hstack", "Stacks tensors horizontally (column-wise)."),
    ("vstack", "Stacks tensors vertically (row-wise)."),
    ("transpose", "Swaps two dimensions."),
    ("permute", "Reorders the dimensions."),
    ("movedim", "Moves dimensions to new positions."),
    ("reshape", "Same elements in a new shape."),
    ("flatten", "Flattens a range of dimensions into one."),
    ("squeeze", "Removes dimensions of size 1."),
    ("unsqueeze", "Inserts a dimension of size 1."),
    ("flip", "Reverses the order of elements along dimensions."),
    ("roll", "Rolls elements along dimensions, wrapping around."),
    ("narrow", "A slice of given start and length along a dimension."),
    # Elementwise arithmetic and comparison.
    ("add", "Elementwise sum, input + alpha * other."),
    ("sub", "Elementwise difference, input - alpha * other."),
    ("mul", "Elementwise product."),
    ("div", "Elementwise quotient, optionally rounded."),
    ("remainder", "Elementwise Python-style modulus."),
    ("fmod", "Elementwise C-style remainder."),
    ("pow", "Elementwise power."),
    ("maximum", "Elementwise maximum of two tensors."),
    ("minimum", "Elementwise minimum of two tensors."),
    ("atan2", "Elementwise arctangent of input / other, by quadrant."),
    ("hypot", "Elementwise sqrt(input**2 + other**2)."),
    ("logaddexp", "Elementwise log(exp(input) + exp(other))."),
    ("xlogy", "Elementwise input * log(other), zero where input is zero."),
    ("lerp", "Linear interpolation, input + weight * (end - input)."),
    ("clamp", "Clamps elements into [min, max]."),
    ("eq", "Elementwise equality."),
    ("ne", "Elementwise inequality."),
    ("lt", "Elementwise less-than."),
    ("le", "Elementwise less-or-equal."),
    ("gt", "Elementwise greater-than."),
    ("ge", "Elementwise greater-or-equal."),
    ("isclose", "Elementwise closeness within tolerances."),
    ("logical_and", "Elementwise logical AND."),
    ("logical_or", "Elementwise logical OR."),
    ("logical_xor", "Elementwise logical XOR."),
    ("logical_not", "Elementwise logical NOT."),
    # Elementwise functions.
    ("abs", "Elementwise absolute value."),
    ("neg", "Elementwise negation."),
    ("sign", "Elementwise sign, -1, 0 or 1."),
    ("reciprocal", "Elementwise 1 / x."),
    ("square", "Elementwise x**2."),
    ("sqrt", "Elementwise square root."),
    ("rsqrt", "Elementwise 1 / sqrt(x)."),
    ("exp", "Elementwise exponential."),
    ("expm1", "Elementwise exp(x) - 1, accurate near zero."),
    ("log", "Elementwise natural logarithm."),
    ("log1p", "Elementwise log(1 + x), accurate near zero."),
    ("log2", "Elementwise base-2 logarithm."),
    ("log10", "Elementwise base-10 logarithm."),
    ("sin", "Elementwise sine."),
    ("cos", "Elementwise cosine."),
    ("tan", "Elementwise tangent."),
    ("asin", "Elementwise arcsine."),
    ("acos", "Elementwise arccosine."),
    ("atan", "Elementwise arctangent."),
    ("sinh", "Elementwise hyperbolic sine."),
    ("cosh", "Elementwise hyperbolic cosine."),
    ("tanh", "Elementwise hyperbolic tangent."),
    ("asinh", "Elementwise inverse hyperbolic sine."),
    ("acosh", "Elementwise inverse hyperbolic cosine."),
    ("atanh", "Elementwise inverse hyperbolic tangent."),
    ("sigmoid", "Elementwise logistic sigmoid."),
    ("logit", "Elementwise log(p / (1 - p)), optionally clamped by eps."),
    ("erf", "Elementwise error function."),
    ("erfc", "Elementwise complementary error function."),
    ("erfinv", "Elementwise inverse error function."),
    ("lgamma", "Elementwise log of the absolute value of the gamma function."),
    ("digamma", "Elementwise logarithmic derivative of the gamma function."),
    ("special.ndtr", "Elementwise standard normal cumulative distribution function."),
    ("special.ndtri", "Elementwise inverse of the standard normal CDF."),
    ("special.log_ndtr", "Elementwise log of the standard normal CDF."),
    ("floor", "Elementwise floor."),
    ("ceil", "Elementwise ceiling."),
    ("round", "Elementwise rounding, half to even, optionally to decimals."),
    ("trunc", "Elementwise truncation toward zero."),
    ("nan_to_num", "Replaces NaN and infinities with finite numbers."),
    ("isfinite", "Elementwise test for finite values."),
    ("isnan", "Elementwise test for NaN."),
    ("isinf", "Elementwise test for positive or negative infinity."),
    # Complex numbers.
    ("real", "Real part of a complex tensor."),
    ("imag", "Imaginary part of a complex tensor."),
    ("angle", "Elementwise argument (phase) in radians."),
    ("conj_physical", "Elementwise complex conjugate."),
    ("polar", "Complex tensor from magnitudes and angles."),
    ("complex", "Complex tensor from real and imaginary parts."),
    ("view_as_real", "Real view of a complex tensor, with a trailing dimension of 2."),
    ("view_as_complex", "Complex view of a real tensor whose last dimension is 2."),
)


def _check_indices(index: Any, size: int, what: str) -> None:
    """Raise IndexError unless every element of ``index`` lies in [0, size).

    On CUDA an out-of-range index is a device-side assert that breaks the CUDA context
    for every later request, so the check has to happen before the kernel runs."""
    if (
        isinstance(index, torch.Tensor)
        and index.numel()
        and bool(((index < 0) | (index >= size)).any())
    ):
        raise IndexError(f"{what}: an index is out of range for a dimension of size {size}")


def _check_targets(input: Any, target: Any, ignore_index: int) -> None:
    """Check class-index targets of a classification loss against the class count."""
    if not isinstance(input, torch.Tensor) or not isinstance(target, torch.Tensor):
        return
    if target.is_floating_point() or target.is_complex() or input.dim() == 0 or not target.numel():
        return
    classes = input.shape[1] if input.dim() >= 2 else input.shape[0]
    bad = (target != ignore_index) & ((target < 0) | (target >= classes))
    if bool(bad.any()):
        raise IndexError(f"target holds a class index outside [0, {classes})")


def _relu(input: torch.Tensor) -> torch.Tensor:
    return F.relu(input)


def _leaky_relu(input: torch.Tensor, negative_slope: float = 0.01) -> torch.Tensor:
    return F.leaky_relu(input, negative_slope)


def _elu(input: torch.Tensor, alpha: float = 1.0) -> torch.Tensor:
    return F.elu(input, alpha)


def _silu(input: torch.Tensor) -> torch.Tensor:
    return F.silu(input)


def _scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    *,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> torch.Tensor:
    # No dropout_p: dropout is random and draws from the global generator.
    return F.scaled_dot_product_attention(
        query, key, value, attn_mask, 0.0, is_causal, scale=scale, enable_gqa=enable_gqa
    )


def _cross_entropy(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    _check_targets(input, target, ignore_index)
    return F.cross_entropy(
        input, target, weight, size_average, ignore_index, reduce, reduction, label_smoothing
    )


def _nll_loss(
    input: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor | None = None,
    size_average: bool | None = None,
    ignore_index: int = -100,
    reduce: bool | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    _check_targets(input, target, ignore_index)
    return F.nll_loss(input, target, weight, size_average, ignore_index, reduce, reduction)


def _gather(input: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    if isinstance(input, torch.Tensor) and input.dim() > 0:
        _check_indices(index, input.size(dim), "gather")
    return torch.gather(input, dim, index)


def _index_select(input: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    if isinstance(input, torch.Tensor):
        _check_indices(index, input.size(dim) if input.dim() > 0 else 1, "index_select")
    return torch.index_select(input, dim, index)


def _argument(args: tuple[Any, ...], kwargs: Mapping[str, Any], position: int, name: str) -> Any:
    """The argument a function call passes at ``position`` or as ``name``, if any."""
    return args[position] if position < len(args) else kwargs.get(name)


def _check_int32(value: Any, what: str) -> None:
    """Raise ValueError if ``value`` (an int or a list of ints) leaves C int's range."""
    for item in value if isinstance(value, list | tuple) else (value,):
        if isinstance(item, int) and not -(2**31) <= item < 2**31:
            raise ValueError(f"{what} {item} is out of range [-2**31, 2**31)")


def _check_max_pool1d(*args: Any, **kwargs: Any) -> None:
    # On the CPU without autograd, a kernel_size of 2**32 or more runs for hours (torch
    # truncates it to 32 bits in one place only) and 2**63-1 crashes the process.
    for position, name in enumerate(("kernel_size", "stride", "padding", "dilation"), start=1):
        _check_int32(_argument(args, kwargs, position, name), f"max_pool1d: {name}")


def _check_matrix_power(*args: Any, **kwargs: Any) -> None:
    # n = -2**63 has no positive counterpart: torch loops on it forever.
    n = _argument(args, kwargs, 1, "n")
    if isinstance(n, int) and n < -(2**63 - 1):
        raise ValueError(f"linalg.matrix_power: n must be greater than {-(2**63)}")


# Entries torch hangs on or crashes with, for some arguments, instead of raising: their
# arguments are checked before torch sees them.
_CHECKS: Final[Mapping[str, Callable[..., None]]] = {
    "nn.functional.max_pool1d": _check_max_pool1d,
    "linalg.matrix_power": _check_matrix_power,
}


# Entries whose torch callable needs a guard: an `inplace` flag removed, dropout removed, or
# indices checked before they can reach a CUDA kernel.
_WRAPPERS: Final[Mapping[str, Callable[..., Any]]] = {
    "nn.functional.relu": _relu,
    "nn.functional.leaky_relu": _leaky_relu,
    "nn.functional.elu": _elu,
    "nn.functional.silu": _silu,
    "nn.functional.scaled_dot_product_attention": _scaled_dot_product_attention,
    "nn.functional.cross_entropy": _cross_entropy,
    "nn.functional.nll_loss": _nll_loss,
    "gather": _gather,
    "index_select": _index_select,
}


def _resolve(name: str) -> Callable[..., Any]:
    """The torch attribute a dotted allowlist name names: "linalg.svd" -> torch.linalg.svd."""
    obj: Any = torch
    for part in name.split("."):
        obj = getattr(obj, part)
    if not callable(obj):
        raise TypeError(f"torch.{name} is not callable")
    return obj  # type: ignore[no-any-return]


def _build() -> dict[str, Function]:
    functions: dict[str, Function] = {}
    for name, description in _ALLOWLIST:
        if name.endswith("_") or name.startswith("_") or "._" in name:
            raise ValueError(f"{name!r}: in-place and private functions are not allowed")
        if name in functions:
            raise ValueError(f"{name!r} is listed twice")
        if not description or "\n" in description:
            raise ValueError(f"{name!r}: the description must be one non-empty line")
        fn = _WRAPPERS.get(name) or _resolve(name)
        functions[name] = Function(name, fn, description, _CHECKS.get(name))
    unused = (set(_WRAPPERS) | set(_CHECKS)) - set(functions)
    if unused:
        raise ValueError(f"wrappers or checks for names not on the allowlist: {sorted(unused)}")
    # The numpy.* entries: apply sees only the torch entries above, so it cannot nest.
    numpy_fns: dict[str, Callable[..., Any]] = {
        "numpy.cast": numpy_functions.cast,
        "numpy.index": numpy_functions.index,
        "numpy.apply": numpy_functions.make_apply(dict(functions)),
    }
    for name, description in numpy_functions.DESCRIPTIONS:
        functions[name] = Function(name, numpy_fns[name], description)
    return functions


FUNCTIONS: Final[Mapping[str, Function]] = MappingProxyType(_build())
