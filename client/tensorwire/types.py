"""The client's public types: arguments (timeouts, inputs), results (server description,
gradients, programs, sessions) and the progress callback."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Generic, Literal, TypeVar

import numpy as np

from tensorwire.wire.codec import Handle, Ref

T = TypeVar("T")


class UseClientDefault:
    """The type of USE_CLIENT_DEFAULT."""

    def __repr__(self) -> str:
        return "USE_CLIENT_DEFAULT"


#: Passed as ``timeout`` (the default), it means "use the client's timeout".
USE_CLIENT_DEFAULT: Final = UseClientDefault()

#: A call's deadline in seconds: a number, None for no deadline, or USE_CLIENT_DEFAULT.
Timeout = float | None | UseClientDefault

#: A model's inputs: one array, a sequence bound by position, or a mapping by name;
#: each an array or a remote tensor.
Inputs = np.ndarray | Sequence[Any] | Mapping[str, Any]


@dataclass(frozen=True)
class TensorSpec:
    """A model input or output: dtype None means any; shape None means any rank and
    -1 marks a dimension of any size."""

    name: str
    dtype: str | None
    shape: tuple[int, ...] | None


@dataclass(frozen=True)
class VersionStatistics:
    """What one version of a model has done since it was loaded.

    ``requests`` counts Infer and Grad requests answered, ``failures`` those answered
    with an error (``rejected``: refused for a full queue, ``expired``: deadline passed
    in the queue, both included). ``inferences`` counts rows run (whole requests for a
    model without a batch dimension), ``executions`` forward passes (a batch once).
    ``queue_seconds`` and ``compute_seconds`` are totals; ``batch_sizes`` maps a batch
    size in rows to the number of forward passes run with it.
    """

    model: str
    version: int
    requests: int = 0
    failures: int = 0
    inferences: int = 0
    executions: int = 0
    queue_seconds: float = 0.0
    compute_seconds: float = 0.0
    batch_sizes: dict[int, int] = field(default_factory=dict)
    rejected: int = 0
    expired: int = 0


@dataclass(frozen=True)
class ModelVersion:
    """One version of a model: ``state`` "READY" (serving, with its ``statistics``)
    or "FAILED" (not loaded; ``reason`` says why)."""

    version: int
    state: str
    reason: str = ""
    statistics: VersionStatistics | None = None


@dataclass(frozen=True)
class DynamicBatching:
    """How a model groups concurrent requests into one forward pass: the first
    request of a batch waits up to ``max_queue_delay`` seconds for others to join,
    and a batch of one of ``preferred_batch_sizes`` rows runs at once."""

    max_queue_delay: float
    preferred_batch_sizes: tuple[int, ...] = ()


@dataclass(frozen=True)
class ModelInfo:
    """A model the server serves, with its signature and how it is served.

    ``state`` is "READY" when at least one version serves, else "FAILED" with the
    ``reason``; ``versions`` lists the serving versions newest first, then the failed.
    ``max_batch_size`` is the most rows one forward pass takes (0: no batch dimension);
    ``dynamic_batching`` None: requests never grouped. ``instances`` names the device
    of each copy of the model, ``precision`` its compute dtype, and ``max_queue_size``
    how many requests may wait for it at once (0: unknown). ``execution`` says how the
    newest version runs (eager, exported, compiled, aotinductor or torchscript; empty
    from an older server); a compiled one's ``compiled_graphs`` were compiled in
    warm-up and its ``recompilations`` since, while serving (none expected).
    """

    name: str
    kind: str
    description: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    variadic: bool
    parameter_count: int
    state: str = "READY"
    reason: str = ""
    versions: tuple[ModelVersion, ...] = ()
    max_batch_size: int = 0
    dynamic_batching: DynamicBatching | None = None
    instances: tuple[str, ...] = ()
    precision: str = ""
    max_queue_size: int = 0
    execution: str = ""
    compiled_graphs: int = 0
    recompilations: int = 0


@dataclass(frozen=True)
class DeviceInfo:
    """The server's device and its memory in bytes."""

    name: str
    description: str
    total_memory_bytes: int
    free_memory_bytes: int


@dataclass(frozen=True)
class SessionsSummary:
    """The server's sessions: how many are open (``count``, at most ``max_sessions``),
    the device memory they hold (``bytes``), each one's ``quota_bytes`` and idle
    ``ttl_seconds``, and the ``losses`` and ``optimizers`` trainers may use."""

    count: int
    bytes: int
    quota_bytes: int
    ttl_seconds: float
    max_sessions: int
    losses: tuple[str, ...] = ()
    optimizers: tuple[str, ...] = ()


@dataclass(frozen=True)
class ServerInfo:
    """What Info reports: versions, device, models by name, Call functions by name,
    and sessions (None: a server from before sessions)."""

    server_version: str
    torch_version: str
    device: DeviceInfo
    models: dict[str, ModelInfo]
    functions: dict[str, str]
    sessions: SessionsSummary | None = None


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


@dataclass(frozen=True)
class SessionInfo:
    """What a client's session on the server holds: its ``handles`` (id, dtype name,
    shape) in the order they were made, its ``trainers`` by id, the device memory
    they hold (``bytes``) and may hold (``quota_bytes``), and the seconds it may go
    unused before the server frees it (``ttl_seconds``)."""

    session: str
    handles: tuple[Handle, ...]
    trainers: tuple[str, ...]
    bytes: int
    quota_bytes: int
    ttl_seconds: float


@dataclass(frozen=True)
class RemoteGradResult(Generic[T]):
    """``grad(..., keep=True)``: outputs and gradients as remote tensors, keyed as in
    GradResult."""

    outputs: dict[str, T]
    grads: dict[str, T]
    param_grads: dict[str, T] = field(default_factory=dict)


def ref_name(ref: Ref | str) -> str:
    """The wire name of a program ref given as a Ref or a string."""
    return ref.name if isinstance(ref, Ref) else str(ref)


@dataclass(frozen=True)
class ProgramResult(Generic[T]):
    """What ``run`` returns: ``outputs`` named by their refs (``result[ref]`` reads
    one), the loss's gradients named as in ``wrt``, and the remote tensors of the refs
    in ``kept`` (RemoteTensors, or AsyncRemoteTensors from an AsyncClient)."""

    outputs: dict[str, T]
    grads: dict[str, T] = field(default_factory=dict)
    kept: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, ref: Ref | str) -> T:
        return self.outputs[ref_name(ref)]
