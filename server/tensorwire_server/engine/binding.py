"""A model's signature at work: inputs bound to it and checked (dtype, shape, names),
the module called with them, and its result named as outputs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from tensorwire.errors import FailedPreconditionError, InvalidArgumentError, listed, shown
from tensorwire.wire.dtypes import NAME_OF_DTYPE
from tensorwire_server.device.tensors import dtype_name
from tensorwire_server.models.model import IOSpec, Model
from tensorwire_server.named import Named


def first_duplicate(names: Sequence[str]) -> str | None:
    """The first name that occurs again, in linear time: a request may hold many."""
    seen: set[str] = set()
    for name in names:
        if name in seen:
            return name
        seen.add(name)
    return None


def bind(model: Model, inputs: Named[Any]) -> Named[Any]:
    """Inputs in the model's order, checked against its signature."""
    what = f"model {model.name!r}"
    names = [n for n, _ in inputs]
    if model.variadic:
        if not all(names):
            raise InvalidArgumentError(f"{what} takes named inputs only; give every input a name")
        duplicate = first_duplicate(names)
        if duplicate is not None:
            raise InvalidArgumentError(f"input {shown(duplicate)} given more than once")
        return list(inputs)
    specs = model.inputs

    def expected() -> str:  # built only for error messages: this runs on every request
        return ", ".join(s.name for s in specs) or "none"

    if any(names) and not all(names):
        raise InvalidArgumentError("inputs must be all named or all positional, not a mix")
    if not any(names):
        if len(inputs) != len(specs):
            raise InvalidArgumentError(
                f"{what} takes {len(specs)} input(s) ({expected()}), got {len(inputs)}"
            )
        ordered = [(s.name, arr) for s, (_, arr) in zip(specs, inputs, strict=True)]
    else:
        given = dict(inputs)
        if len(given) != len(inputs):
            duplicate = first_duplicate(names) or ""
            raise InvalidArgumentError(f"input {shown(duplicate)} given more than once")
        known = {s.name for s in specs}
        for name in names:
            if name not in known:
                raise InvalidArgumentError(
                    f"{what} has no input {shown(name)}; its inputs: {expected()}"
                )
        missing = [s.name for s in specs if s.name not in given]
        if missing:
            raise InvalidArgumentError(
                f"{what} is missing input(s) {', '.join(map(repr, missing))}"
            )
        ordered = [(s.name, given[s.name]) for s in specs]
    for spec, (_, arr) in zip(specs, ordered, strict=True):
        _check_spec(spec, arr, what)
    return ordered


def _check_spec(spec: IOSpec, arr: np.ndarray | torch.Tensor, what: str) -> None:
    if isinstance(arr, torch.Tensor):
        dtype = dtype_name(arr)
    else:  # NumPy computes a dtype's name anew on each access: look it up
        dtype = NAME_OF_DTYPE.get(arr.dtype) or arr.dtype.name
    if spec.dtype is not None and dtype != spec.dtype:
        raise InvalidArgumentError(
            f"input {spec.name!r} has dtype {dtype} but {what} expects {spec.dtype}"
        )
    if spec.shape is not None and (
        len(spec.shape) != arr.ndim
        or any(want not in (-1, got) for want, got in zip(spec.shape, arr.shape, strict=True))
    ):
        raise InvalidArgumentError(
            f"input {spec.name!r} has shape {list(arr.shape)} but {what} expects "
            f"{list(spec.shape)} (-1: any size)"
        )


def invoke(model: Model, module: torch.nn.Module, tensors: list[tuple[str, torch.Tensor]]) -> Any:
    """Call ``module`` with bound inputs: by name for a variadic model, else in order."""
    if model.variadic:
        return module(**dict(tensors))
    return module(*[t for _, t in tensors])


def declared_dtype(tensor: torch.Tensor, name: str, declared: tuple[IOSpec, ...]) -> torch.Tensor:
    """An output in the dtype its signature declares (autocast may compute it in a
    narrower one)."""
    for spec in declared:
        if spec.name == name and spec.dtype is not None and dtype_name(tensor) != spec.dtype:
            return tensor.to(getattr(torch, spec.dtype))
    return tensor


# Tuples, not ``X | Y``: a union with torch.Tensor is built anew at each isinstance, ~0.3 µs.
_NUMBER = (int, float, bool, complex)
_ONE_VALUE = (torch.Tensor, *_NUMBER)


def name_outputs(
    result: Any, declared: tuple[IOSpec, ...], what: str
) -> list[tuple[str, torch.Tensor]]:
    """Name a model's or function's result: a tensor, tuple, named tuple or dict."""
    if isinstance(result, _ONE_VALUE):
        return [(declared[0].name if len(declared) == 1 else "output", _as_tensor(result, what))]
    if isinstance(result, Mapping):
        return [(str(k), _as_tensor(v, what)) for k, v in result.items()]
    if isinstance(result, tuple | list):
        # A named tuple names its fields in _fields; torch's own structseqs
        # (linalg.svd's U, S, Vh; max's values, indices) in __match_args__.
        fields = getattr(result, "_fields", None) or getattr(type(result), "__match_args__", None)
        if fields is not None:
            names = list(fields)
        elif len(declared) == len(result):
            names = [s.name for s in declared]
        else:
            names = [f"output_{i}" for i in range(len(result))]
        return [(n, _as_tensor(v, what)) for n, v in zip(names, result, strict=True)]
    raise FailedPreconditionError(f"{what} returned a {type(result).__name__}, which cannot travel")


def _as_tensor(value: Any, what: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, _NUMBER):
        return torch.as_tensor(value)
    raise FailedPreconditionError(f"{what} returned a {type(value).__name__}, which cannot travel")


def select_outputs(named: Named[Any], wanted: Sequence[str], model: str) -> Named[Any]:
    if not wanted:
        return named
    outputs = dict(named)
    for name in wanted:
        if name not in outputs:
            raise InvalidArgumentError(
                f"model {model!r} has no output {shown(name)}; outputs: {listed(outputs)}"
            )
    return [(n, outputs[n]) for n in wanted]
