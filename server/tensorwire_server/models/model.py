"""Models the server runs: their signatures, the built-ins, and loading users' models."""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

import torch
from torch import nn

from tensorwire.wire.dtypes import WIRE_BY_NAME
from tensorwire_server.device.tensors import dtype_name


@dataclass(frozen=True)
class IOSpec:
    """One input or output: a name, a dtype name (None: any) and a shape with -1 for a
    free dimension (None: any rank)."""

    name: str
    dtype: str | None = None
    shape: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in WIRE_BY_NAME:
            raise ValueError(f"spec {self.name!r}: unknown dtype {self.dtype!r}")


@dataclass
class Model:
    """A named callable with its signature. ``module`` is called with the inputs in
    ``inputs`` order (or, when ``variadic``, with keyword arguments of any names)."""

    name: str
    module: nn.Module
    inputs: tuple[IOSpec, ...] = ()
    outputs: tuple[IOSpec, ...] = ()
    kind: str = "python"
    description: str = ""
    variadic: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trainable parameters by qualified name."""
        return trainable(self.module)

    def parameter_count(self) -> int:
        """How many trainable scalars the model has."""
        return sum(p.numel() for _, p in self.named_parameters())


def trainable(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``module``'s parameters that take gradients, by qualified name."""
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)


# ----------------------------------------------------------------------------- built-ins


class Identity(nn.Module):
    """Returns its input unchanged."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return input


class Echo(nn.Module):
    """Returns every input under its own name."""

    def forward(self, **inputs: torch.Tensor) -> dict[str, torch.Tensor]:
        return dict(inputs)


class MLP(nn.Module):
    """A small tanh multilayer perceptron with fixed, seeded weights."""

    def __init__(
        self, sizes: tuple[int, ...] = (16, 32, 32, 4), dtype: torch.dtype = torch.float32
    ) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(0)
        layers: list[nn.Module] = []
        for i, (fan_in, fan_out) in enumerate(pairwise(sizes)):
            linear = nn.Linear(fan_in, fan_out, dtype=dtype)
            with torch.no_grad():
                bound = fan_in**-0.5
                linear.weight.uniform_(-bound, bound, generator=generator)
                linear.bias.uniform_(-bound, bound, generator=generator)
            layers.append(linear)
            if i < len(sizes) - 2:
                layers.append(nn.Tanh())
        self.layers = nn.Sequential(*layers)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(input)
        return out


def builtin_models() -> dict[str, Model]:
    """The models every server serves with no configuration, freshly built."""
    any_tensor = IOSpec("input")
    models = [
        Model(
            "identity",
            Identity(),
            (any_tensor,),
            (IOSpec("output"),),
            "builtin",
            "Returns its one input unchanged, any dtype and shape.",
        ),
        Model(
            "echo",
            Echo(),
            (),
            (),
            "builtin",
            "Returns every input under its own name, any number, dtype and shape.",
            variadic=True,
        ),
    ]
    for name, dtype in (("mlp", "float32"), ("mlp64", "float64")):
        mlp = MLP(dtype=getattr(torch, dtype))
        models.append(
            Model(
                name,
                mlp,
                (IOSpec("input", dtype, (-1, 16)),),
                (IOSpec("output", dtype, (-1, 4)),),
                "builtin",
                f"A 16-32-32-4 tanh MLP in {dtype} with fixed seeded weights.",
            )
        )
    return {m.name: m for m in models}


# ----------------------------------------------------------------------------- loading


def load_model(name: str, source: str) -> Model:
    """Load ``source`` as model ``name``: a ``.pt2`` torch.export file, a TorchScript
    file, or ``package.module:factory`` (operator-trusted Python returning an
    ``nn.Module`` or a ``Model``). Raises ValueError naming the problem."""
    if source.endswith(".pt2"):
        return _load_export(name, source)
    if os.path.isfile(source):
        return _load_torchscript(name, source)
    if ":" in source and os.path.sep not in source:
        return _load_factory(name, source)
    raise ValueError(f"model {name!r}: {source!r} is not a file nor a module:factory")


def _load_torchscript(name: str, path: str) -> Model:
    try:
        module, inputs = read_torchscript(path)
    except Exception as exc:
        raise ValueError(f"model {name!r}: cannot load TorchScript {path!r}: {exc}") from exc
    return Model(name, module, inputs, (), "torchscript", f"TorchScript model from {path}")


def _load_export(name: str, path: str) -> Model:
    try:
        module, inputs = read_export(path)
    except Exception as exc:
        raise ValueError(f"model {name!r}: cannot load torch.export {path!r}: {exc}") from exc
    return Model(name, module, inputs, (), "export", f"torch.export program from {path}")


def read_torchscript(path: str | os.PathLike[str]) -> tuple[nn.Module, tuple[IOSpec, ...]]:
    """A TorchScript file's module (on the CPU) and its inputs, named after the
    arguments of its ``forward``; raises whatever loading raises."""
    module = torch.jit.load(path, map_location="cpu")  # type: ignore[no-untyped-call]
    arguments = module.forward.schema.arguments[1:]  # the first is self
    return module, tuple(IOSpec(a.name) for a in arguments)


def read_export(path: str | os.PathLike[str]) -> tuple[nn.Module, tuple[IOSpec, ...]]:
    """A torch.export file's module and its inputs, with the dtypes and shapes it was
    exported for; raises whatever loading raises."""
    program = torch.export.load(path)
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    inputs = tuple(
        _spec_from_meta(user_input, placeholders[user_input].meta.get("val"))
        for user_input in program.graph_signature.user_inputs
        if isinstance(user_input, str)
    )
    return program.module(), inputs


def _spec_from_meta(name: str, value: Any) -> IOSpec:
    if not isinstance(value, torch.Tensor):
        return IOSpec(name)
    dtype = dtype_name(value)
    shape = tuple(d if isinstance(d, int) else -1 for d in value.shape)
    return IOSpec(name, dtype if dtype in WIRE_BY_NAME else None, shape)


def forward_signature(module: nn.Module) -> tuple[tuple[IOSpec, ...], bool]:
    """A Python module's inputs, named after the positional arguments of its
    ``forward``, and whether it takes keyword arguments of any names (variadic)."""
    parameters = inspect.signature(module.forward).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return (), True
    inputs = tuple(
        IOSpec(p.name)
        for p in parameters
        if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    )
    return inputs, False


def _load_factory(name: str, target: str) -> Model:
    module_name, _, attr = target.partition(":")
    try:
        factory: Callable[[], Any] = getattr(importlib.import_module(module_name), attr)
        made = factory()
    except Exception as exc:
        raise ValueError(f"model {name!r}: {target} failed: {type(exc).__name__}: {exc}") from exc
    if isinstance(made, Model):
        made.name = name
        return made
    if not isinstance(made, nn.Module):
        raise ValueError(f"model {name!r}: {target} returned {type(made).__name__}, not a Module")
    inputs, variadic = forward_signature(made)
    description = f"Python model from {target}"
    return Model(name, made, inputs, (), "python", description, variadic=variadic)


def parse_model_option(option: str) -> tuple[str, str]:
    """Split a ``NAME=SOURCE`` command-line option."""
    name, sep, source = option.partition("=")
    if not sep or not name or not source:
        raise ValueError(f"--model expects NAME=SOURCE, got {option!r}")
    return name, source


def load_models(options: Mapping[str, str], builtins: bool = True) -> dict[str, Model]:
    """The built-ins (when asked for) plus each named model; later names replace earlier."""
    models = builtin_models() if builtins else {}
    for name, source in options.items():
        models[name] = load_model(name, source)
    return models
