"""A served model and its signature: ``Model``, its inputs and outputs (``IOSpec``), and
the signature a Python module's ``forward`` tells."""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from tensorwire.wire.dtypes import WIRE_BY_NAME


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


#: How each kind of model runs when it is not compiled, as Info's ``execution`` says.
EXECUTIONS = {
    "export": "exported",
    "torchscript": "torchscript",
    "aotinductor": "aotinductor",
}


@dataclass
class CompileStats:
    """torch.compile's work for one version: its mode, the graphs compiled in warm-up
    and those compiled afterwards, while serving (none are expected)."""

    mode: str
    graphs: int = 0
    recompilations: int = 0
    #: Inductor's compile-cache lookups in warm-up (a warm restart's are all hits).
    cache_hits: int = 0
    cache_misses: int = 0


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
    #: torch.compile's mode for this model, when its factory chooses one (a
    #: repository's model.toml and --model-compile choose otherwise); None: not said.
    compile: str | None = None
    #: Why the model cannot take gradients (an inference-only artefact); empty: it can.
    inference_only: str = ""
    #: What torch.compile did for it in warm-up; None: it is not compiled.
    compile_stats: CompileStats | None = None

    @property
    def execution(self) -> str:
        """Which way the model runs: eager, exported, compiled, aotinductor or
        torchscript."""
        return "compiled" if self.compile_stats else EXECUTIONS.get(self.kind, "eager")

    def named_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """The trainable parameters by qualified name."""
        return trainable(self.module)

    def parameter_count(self) -> int:
        """How many trainable scalars the model has."""
        return sum(p.numel() for _, p in self.named_parameters())


def trainable(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """``module``'s parameters that take gradients, by qualified name."""
    return ((n, p) for n, p in module.named_parameters() if p.requires_grad)


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
