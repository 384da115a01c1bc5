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
from support.function_cases import CASES, FORBIDDEN, REQUIRED
from support.function_cases.numpy_entries import REFERENCES

from tensorwire_server.engine.functions import FUNCTIONS, Function

_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64, "int64": torch.int64}


def _public_torch(name: str) -> Callable[..., Any]:
    """The public torch function ``name`` names, resolved here independently of the registry
    (for a numpy.* entry, its reference implementation)."""
    if name in REFERENCES:
        return REFERENCES[name]
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
    wrapped -= set(REFERENCES)  # the numpy.* entries are tensorwire's own
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
