"""Typed results and callbacks of the client: server description, gradients, progress."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: dtype None means any; shape None means any rank and
    -1 marks a dimension of any size."""

    name: str
    dtype: str | None
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class ModelInfo:
    """A model the server serves, with its signature."""

    name: str
    kind: str
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variadic: bool
    parameter_count: int


@dataclass(frozen=True)
class DeviceInfo:
    """The server's device and its memory in bytes."""

    name: str
    description: str
    total_memory_bytes: int
    free_memory_bytes: int


@dataclass(frozen=True)
class ServerInfo:
    """What Info reports: versions, device, models by name, Call functions by name."""

    server_version: str
    torch_version: str
    device: DeviceInfo
    models: dict[str, ModelInfo]
    functions: dict[str, str]


@dataclass(frozen=True)
class GradResult:
    """Outputs and gradients from ``grad``/``call_grad``.

    ``grads`` is keyed by input name (for ``call_grad``, the argument position as a
    string: "0", "1"); ``param_grads`` by qualified parameter name.
    """

    outputs: dict[str, np.ndarray]
    grads: dict[str, np.ndarray]
    param_grads: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class Progress:
    """How far one transfer of a call has got, in tensor payload bytes.

    ``stage`` is "upload" (the request) or "download" (the response). A streamed
    transfer reports after every chunk; a small one at its start and its end.
    """

    stage: Literal["upload", "download"]
    done: int
    total: int

    @property
    def fraction(self) -> float:
        """``done / total``, and 1.0 for a transfer with nothing to move."""
        return self.done / self.total if self.total else 1.0


#: A progress callback: called with each Progress; an exception it raises ends the call.
ProgressCallback = Callable[[Progress], None]
